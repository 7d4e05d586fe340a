"""Attention over the paged KV cache for a flat batch of tokens (decode tokens first, then prefill chunks)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..kernels.paged_attention_torch import prefill_attention
from .kv_quant import QuantKV, gather_blocks, packed_dim, write_slots
from .linear import FusedLinear, Linear
from .rotary import apply_rotary


@dataclass
class PrefillChunk:
    tok_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already cached
    ctx_blocks: Optional[torch.Tensor]  # [nb] the sequence's block ids; None when start_pos == 0


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_blocks: torch.Tensor  # [T] cache block each new token's K/V goes to
    slot_offsets: torch.Tensor  # [T] position inside that block
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_ctx_lens: Optional[torch.Tensor] = None  # [Bd]
    decode_block_tables: Optional[torch.Tensor] = None  # [Bd, max_blocks] (for the GPU kernel)
    # [Bd] this step's rows of each row's sequence up to and including it (1; drafts 2, 3, ...): the GPU's
    # fused RoPE + attention kernel reads the rows of this step from q/k/v, not the cache (rope_decode_triton)
    decode_fresh: Optional[torch.Tensor] = None
    prefills: List[PrefillChunk] = field(default_factory=list)
    seq_lens: Optional[torch.Tensor] = None  # [T] length of each token's sequence (dynamic NTK only)
    cos: Optional[torch.Tensor] = None  # [T, D]
    sin: Optional[torch.Tensor] = None
    # for the native CPU step (kernels/fused_decode.py): one row per sequence, in batch order
    spans: Optional[torch.Tensor] = None  # int32 [S, 3]: first token row, tokens, position of the first
    span_block_tables: Optional[torch.Tensor] = None  # int32 [S, max_blocks]


class KVCache:
    """All layers' K and V blocks: [layers, 2, num_blocks, kv_heads, block_size, head_dim].

    Block-major with heads before slots: gathering whole blocks copies large contiguous chunks, and a
    gathered [B, blocks, KVH, block_size, D] tensor feeds the batched matmuls without re-layout.
    With ``quant_policy`` 8 or 4 the blocks hold unsigned integers (two per byte at 4 bits) and a
    per-token, per-head (scale, min) pair beside them (see kv_quant.py).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, quant_policy: int = 0, static: Optional[torch.Tensor] = None):
        """``static``: per-head (scale, min) pairs [layers, 2, kv_heads, 2] (kv_quant.load_kv_qparams) for a
        quantized cache, written into every slot here; writers then put only the codes."""
        self.num_blocks, self.block_size, self.quant_policy = num_blocks, block_size, quant_policy
        if static is not None and (not quant_policy or tuple(static.shape) != (num_layers, 2, kv_heads, 2)):
            raise ValueError(f"kv_qparams: static parameters need quant_policy 8 or 4 and the shape "
                             f"[{num_layers}, 2, {kv_heads}, 2] (got quant_policy {quant_policy}, "
                             f"{list(static.shape)})")
        self.static = static is not None
        # the bits the native CPU kernels take: with KV_FIXED (0x100) where the slots' pairs are given
        self.native_bits = quant_policy | (0x100 if self.static else 0)
        self.dtype, self.head_dim = dtype, head_dim
        shape = (num_layers, 2, num_blocks, kv_heads, block_size)
        if quant_policy:
            self.data = _zeros(shape + (packed_dim(head_dim, quant_policy),), torch.uint8, device)
            self.params = _zeros(shape + (2,), kv_params_dtype(dtype), device)
            if static is not None:  # [layers, 2, kv_heads, 2] into every block and slot
                pairs = static.to(device=self.params.device, dtype=self.params.dtype)
                self.params.copy_(pairs[:, :, None, :, None, :].expand_as(self.params))
        else:
            self.data = _zeros(shape + (head_dim,), dtype, device)
            self.params = None
        # each layer's (K, V) views, made once: a batch-1 decode step asks for all of them (60 views for
        # SmolLM2 took about 0.4 ms of a 21 ms step)
        self._layers = [self._views(i) for i in range(num_layers)]
        # and their addresses for the native decode layers: each layer's K and V blocks (the integers of
        # quantized ones) and, quantized, their (scale, min) pairs (0 for dense blocks)
        q = bool(quant_policy)
        self.pointers = [(k.data.data_ptr(), v.data.data_ptr()) if q else (k.data_ptr(), v.data_ptr())
                         for k, v in self._layers]
        self.param_pointers = [(k.params.data_ptr(), v.params.data_ptr()) if q else (0, 0) for k, v in self._layers]
        # the same addresses as int64 arrays (every layer's K, V, K pairs, V pairs) for the native call that
        # takes a whole decode step (fused_decode's decode_layers_split)
        self.pointer_arrays = tuple(torch.tensor([p[j] for p in ptrs], dtype=torch.int64)
                                    for ptrs in (self.pointers, self.param_pointers) for j in (0, 1))

    def _views(self, i: int) -> Tuple:
        if self.quant_policy:
            return tuple(QuantKV(self.data[i, j], self.params[i, j], self.quant_policy, self.head_dim, self.dtype,
                                 self.static)
                         for j in (0, 1))
        return self.data[i, 0], self.data[i, 1]

    def layer(self, i: int) -> Tuple:
        return self._layers[i]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                        quant_policy: int = 0) -> int:
        vectors = num_layers * 2 * block_size * kv_heads
        if quant_policy:
            return vectors * (packed_dim(head_dim, quant_policy) + 2 * kv_params_dtype(dtype).itemsize)
        return vectors * head_dim * dtype.itemsize


def _zeros(shape: Tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """torch.zeros; on CPU in huge pages (host_memory.huge_empty), as attention reads blocks all over it."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    from ..host_memory import huge_empty
    return huge_empty(math.prod(shape), dtype).view(shape).zero_()


def kv_params_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


DecodeFn = Callable[..., torch.Tensor]


def torch_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [B, H, D]; caches [num_blocks, KVH, bs, D] -> [B, H, D], one softmax over all of a sequence's blocks."""
    _, kvh, bs, d = k_cache.shape
    B, H, _ = q.shape
    g = H // kvh
    bt = meta.decode_block_tables  # [B, nb]
    nb = bt.shape[1]
    k = gather_blocks(k_cache, bt).view(B, nb, kvh, bs, d)
    v = gather_blocks(v_cache, bt).view(B, nb, kvh, bs, d)
    qg = q.view(B, 1, kvh, g, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, nb, KVH, g, bs]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(B, kvh, g, nb * bs)  # [B, KVH, g, C]
    valid = torch.arange(nb * bs, device=q.device)[None, :] < meta.decode_ctx_lens[:, None]  # [B, C]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = probs.view(B, kvh, g, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, KVH, g, bs]
    out = torch.matmul(probs, v).sum(1)  # [B, KVH, g, D]
    return out.reshape(B, H, d)


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """cache [num_blocks, KVH, bs, D], block_ids [nb] -> the first ``length`` positions, [KVH, length, D]."""
    blocks = gather_blocks(cache, block_ids)  # [nb, KVH, bs, D]
    nb, kvh, bs, d = blocks.shape
    return blocks.permute(1, 0, 2, 3).reshape(kvh, nb * bs, d)[:, :length]


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.qkv = FusedLinear(hidden, [("q", num_heads * head_dim), ("k", num_kv_heads * head_dim),
                                        ("v", num_kv_heads * head_dim)], bias=qkv_bias)
        self.o = Linear(num_heads * head_dim, hidden, bias=o_bias)
        self.decode_fn: DecodeFn = torch_decode
        # decode steps: RoPE and the K/V write in one kernel, gpu_fused.rope_write (dense blocks) or
        # rope_write_quant (int8 / int4 blocks); set by LlamaModel.use_gpu_fused
        self.fused_rope = False
        # decode steps with decode_fresh, where decode_fn is the Triton kernel: RoPE, the K/V write and the
        # attention in one kernel (kernels/rope_decode_triton.py; set by LlamaModel.use_gpu_fused)
        self.fused_attend = False

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x), meta, k_cache, v_cache)

    def attend(self, qkv: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> torch.Tensor:
        """The layer after its q/k/v product: qkv [T, (H + 2 KVH) D] -> the o projection's output."""
        T = qkv.shape[0]
        if self.fused_rope and not meta.prefills:
            if self.fused_attend and meta.decode_fresh is not None:  # (dense blocks only: see use_gpu_fused)
                from ..kernels.rope_decode_triton import rope_decode
                out = rope_decode(qkv, meta.cos, meta.sin, k_cache, v_cache, meta, self.num_heads, self.num_kv_heads,
                                  self.scale)
            else:
                from ..kernels.gpu_fused import rope_write  # dense or int8 / int4 blocks
                q = rope_write(qkv, meta.cos, meta.sin, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets,
                               self.num_heads, self.num_kv_heads)
                out = self.decode_fn(q, k_cache, v_cache, meta, self.scale)
            return self.o(out.reshape(T, self.num_heads * self.head_dim))
        q, k, v = self.qkv.split(qkv)
        q = apply_rotary(q.reshape(T, self.num_heads, self.head_dim), meta.cos, meta.sin)
        k = apply_rotary(k.reshape(T, self.num_kv_heads, self.head_dim), meta.cos, meta.sin)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        # write this step's K/V into their slots: cache[block, :, offset] = k[token]
        write_slots(k_cache, meta.slot_blocks, meta.slot_offsets, k)
        write_slots(v_cache, meta.slot_blocks, meta.slot_offsets, v)
        parts = []
        nd = meta.num_decode
        if nd:
            parts.append(self.decode_fn(q[:nd], k_cache, v_cache, meta, self.scale))
        for p in meta.prefills:
            sl = slice(p.tok_start, p.tok_start + p.num_tokens)
            if p.ctx_blocks is None:
                kc, vc = k[sl].transpose(0, 1), v[sl].transpose(0, 1)  # [KVH, n, D]
            else:
                ctx = p.start_pos + p.num_tokens
                kc, vc = gather_context(k_cache, p.ctx_blocks, ctx), gather_context(v_cache, p.ctx_blocks, ctx)
            parts.append(prefill_attention(q[sl], kc, vc, p.start_pos, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o(out.reshape(T, self.num_heads * self.head_dim))
