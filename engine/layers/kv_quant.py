"""Quantized KV cache blocks (LMDeploy's quant_policy 8 and 4): online, asymmetric, per token and per head.

Each cached vector x (one token, one KV head, head_dim values) is stored as unsigned integers
q = round((x - min) / scale) with scale = (max - min) / (2^bits - 1), and (scale, min) sit beside it in
the same block. int4 packs two values per byte: element 2j in the low nibble, 2j+1 in the high one.
Reads dequantize whole gathered blocks: x ~= q * scale + min.
"""
from __future__ import annotations

from typing import Tuple

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
    q = torch.round((xf - mn) / scale).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, torch.cat([scale, mn], dim=-1)


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

    def __init__(self, data: torch.Tensor, params: torch.Tensor, bits: int, head_dim: int, dtype: torch.dtype):
        self.data, self.params, self.bits, self.head_dim, self.dtype = data, params, bits, head_dim, dtype

    @property
    def shape(self):
        n, kvh, bs, _ = self.data.shape
        return torch.Size((n, kvh, bs, self.head_dim))

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        """x [T, kv_heads, D] into slots (blocks[t], offsets[t])."""
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
