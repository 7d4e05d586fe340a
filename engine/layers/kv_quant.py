"""Quantized KV cache blocks (LMDeploy's quant_policy 8 and 4): online, asymmetric, per token and per head.

Each cached vector x (one token, one KV head, head_dim values) is stored as unsigned integers
q = round((x - min) / scale) with scale = (max - min) / (2^bits - 1), and (scale, min) sit beside it in
the same block. int4 packs two values per byte: element 2j in the low nibble, 2j+1 in the high one.
Reads dequantize whole gathered blocks: x ~= q * scale + min.

Static parameters (``kv_qparams``, from ``python -m quant_jobs kv_qparams``): one (scale, min) per layer,
K or V, and KV head, calibrated offline, instead of each vector's own range. They are written into every
slot's pair once, when the cache is made, and writers then only write the codes (reads are unchanged).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

QUANT_POLICIES = (0, 4, 8)


def check_policy(quant_policy: int, head_dim: int) -> None:
    if quant_policy not in QUANT_POLICIES:
        raise ValueError(f"quant_policy: {quant_policy} is not supported; use 0 (off), 8 (int8) or 4 (int4)")
    if quant_policy == 4 and head_dim % 2:
        raise ValueError(f"quant_policy: int4 packs two values per byte, so head_dim must be even (got {head_dim})")


def packed_dim(head_dim: int, bits: int) -> int:
    return head_dim if bits == 8 else head_dim // 2


def quantize_vectors(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 [..., D or D/2], params [..., 2] = (scale, min) in x's dtype, float32 if lower)."""
    qmax = 2 ** bits - 1
    xf = x.float()
    mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((mx - mn) / qmax).clamp(min=1e-8)
    return quantize_with(xf, scale, mn, bits), torch.cat([scale, mn], dim=-1)


def quantize_with(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    """x [..., D] -> codes round((x - min) / scale) in [0, 2^bits - 1], uint8 [..., D or D/2] (int4: two a
    byte); scale and min broadcast against x."""
    q = torch.round((x.float() - mn) / scale).clamp_(0, 2 ** bits - 1).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q


def load_kv_qparams(path: str, bits: int, num_layers: int, num_kv_heads: int,
                    heads: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The kv_qparams job's per-layer, per-head parameters for ``bits`` as the cache's pairs: float32
    [layers, 2 (K, V), heads, 2 (scale, min)], min = zp - scale (2^bits - 1) / 2 (the job's zp is the middle
    of the calibrated range; symmetric parameters have zp 0). ``path``: the .safetensors file, its folder, or
    the job's work dir; ``heads``: the KV heads this cache holds (tensor parallel), all by default."""
    from safetensors import safe_open
    p = Path(path).expanduser()
    for cand in (p, p / "kv_qparams.safetensors", p / "kv_qparams" / "kv_qparams.safetensors"):
        if cand.is_file():
            p = cand
            break
    else:
        raise ValueError(f"kv_qparams: {path} is not a kv_qparams.safetensors file or a folder holding one "
                         "(python -m quant_jobs kv_qparams writes W/kv_qparams/kv_qparams.safetensors)")
    names = [f"int{bits}.{kind}_{what}" for kind in "kv" for what in ("scale", "zp")]
    with safe_open(str(p), "pt") as f:
        have = set(f.keys())
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"kv_qparams: {p} has no {', '.join(missing)} (parameters for int{bits})")
        t = {n: f.get_tensor(n).float() for n in names}
    for n, v in t.items():
        if tuple(v.shape) != (num_layers, num_kv_heads):
            raise ValueError(f"kv_qparams: {n} is {list(v.shape)}, but the model has {num_layers} layers of "
                             f"{num_kv_heads} KV heads (parameters of another model?)")
    qmax = 2 ** bits - 1
    pairs = []
    for kind in "kv":
        scale = t[f"int{bits}.{kind}_scale"].clamp(min=1e-8)
        pairs.append(torch.stack([scale, t[f"int{bits}.{kind}_zp"] - scale * qmax / 2], dim=-1))
    out = torch.stack(pairs, dim=1)
    return out[:, :, list(heads)] if heads is not None else out


def dequantize_vectors(q: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_vectors (up to rounding): -> [..., D] in ``dtype``."""
    if bits == 4:
        lo, hi = q & 0xF, q >> 4
        q = torch.stack([lo, hi], dim=-1).flatten(-2)
    p = params.float()
    return (q.float() * p[..., 0:1] + p[..., 1:2]).to(dtype)


class QuantKV:
    """One layer's K (or V) blocks: ``data`` uint8 [num_blocks, kv_heads, block_size, D'] and ``params``
    [num_blocks, kv_heads, block_size, 2]; quacks like the dense cache tensor where attention needs it."""

    def __init__(self, data: torch.Tensor, params: torch.Tensor, bits: int, head_dim: int, dtype: torch.dtype,
                 static: bool = False):
        self.data, self.params, self.bits, self.head_dim, self.dtype = data, params, bits, head_dim, dtype
        self.static = static  # params hold the static per-head pairs: writes put the codes only

    @property
    def shape(self):
        n, kvh, bs, _ = self.data.shape
        return torch.Size((n, kvh, bs, self.head_dim))

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        """x [T, kv_heads, D] into slots (blocks[t], offsets[t])."""
        if self.static:
            p = self.params[blocks, :, offsets].float()  # [T, kv_heads, 2]
            self.data[blocks, :, offsets] = quantize_with(x, p[..., 0:1], p[..., 1:2], self.bits)
            return
        q, p = quantize_vectors(x, self.bits)
        self.data[blocks, :, offsets] = q
        self.params[blocks, :, offsets] = p.to(self.params.dtype)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """-> dequantized blocks [len(block_ids), kv_heads, block_size, D]."""
        idx = block_ids.reshape(-1).long()
        return dequantize_vectors(self.data.index_select(0, idx), self.params.index_select(0, idx), self.bits,
                                  self.dtype)


def write_slots(cache, blocks: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
    if isinstance(cache, QuantKV):
        cache.write(blocks, offsets, x)
    else:
        cache[blocks, :, offsets] = x


def gather_blocks(cache, block_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(cache, QuantKV):
        return cache.gather(block_ids)
    return cache.index_select(0, block_ids.reshape(-1))
