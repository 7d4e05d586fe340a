"""Attention over the paged KV cache for a flat batch of tokens (decode tokens first, then prefill chunks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..kernels.paged_attention_torch import attend_padded, prefill_attention
from .linear import FusedLinear, Linear
from .rotary import apply_rotary


@dataclass
class PrefillChunk:
    tok_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already cached
    ctx_slots: Optional[torch.Tensor]  # [start_pos + num_tokens] cache slots; None when start_pos == 0


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_slots: Optional[torch.Tensor] = None  # [Bd, Cmax] slots of each decode sequence's context
    decode_ctx_lens: Optional[torch.Tensor] = None  # [Bd]
    decode_block_tables: Optional[torch.Tensor] = None  # [Bd, max_blocks] (for the GPU kernel)
    prefills: List[PrefillChunk] = field(default_factory=list)
    seq_lens: Optional[torch.Tensor] = None  # [T] length of each token's sequence (dynamic NTK only)
    cos: Optional[torch.Tensor] = None  # [T, D]
    sin: Optional[torch.Tensor] = None


class KVCache:
    """All layers' K and V blocks: [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


DecodeFn = Callable[..., torch.Tensor]


def torch_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    kvh, d = k_cache.shape[-2:]
    k = k_cache.view(-1, kvh, d)[meta.decode_slots]  # [Bd, Cmax, KVH, D]
    v = v_cache.view(-1, kvh, d)[meta.decode_slots]
    return attend_padded(q, k, v, meta.decode_ctx_lens, scale)


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

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv.split(self.qkv(x))
        q = apply_rotary(q.reshape(T, self.num_heads, self.head_dim), meta.cos, meta.sin)
        k = apply_rotary(k.reshape(T, self.num_kv_heads, self.head_dim), meta.cos, meta.sin)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        # write this step's K/V into their slots: caches viewed as [num_slots, KVH, D]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        parts = []
        nd = meta.num_decode
        if nd:
            parts.append(self.decode_fn(q[:nd], k_cache, v_cache, meta, self.scale))
        for p in meta.prefills:
            sl = slice(p.tok_start, p.tok_start + p.num_tokens)
            if p.ctx_slots is None:
                kc, vc = k[sl], v[sl]
            else:
                kc = k_cache.view(-1, self.num_kv_heads, self.head_dim)[p.ctx_slots]
                vc = v_cache.view(-1, self.num_kv_heads, self.head_dim)[p.ctx_slots]
            parts.append(prefill_attention(q[sl], kc, vc, p.start_pos, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o(out.reshape(T, self.num_heads * self.head_dim))
