"""Torch reference for attention over a paged KV cache (used on CPU and as the Triton oracle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached context.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D];
    block_tables: [B, max_blocks] int (padding entries may hold any valid block id);
    context_lens: [B] int. Returns [B, H, D].
    """
    B, H, D = q.shape
    _, bs, KVH, _ = k_cache.shape
    max_ctx = block_tables.shape[1] * bs
    # slot index of every context position: [B, max_ctx]
    slots = (block_tables[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(B, max_ctx)
    k = k_cache.reshape(-1, KVH, D)[slots]  # [B, max_ctx, KVH, D]
    v = v_cache.reshape(-1, KVH, D)[slots]
    return attend_padded(q, k, v, context_lens, scale)


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """q: [B, H, D]; k, v: [B, C, KVH, D] with positions >= context_lens masked. Returns [B, H, D]."""
    B, H, D = q.shape
    C, KVH = k.shape[1], k.shape[2]
    g = H // KVH
    qg = q.view(B, KVH, g, D)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, KVH, g, C]
    valid = torch.arange(C, device=q.device)[None, :] < context_lens[:, None]  # [B, C]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, KVH, g, D]
    return out.reshape(B, H, D)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, scale: float) -> torch.Tensor:
    """Causal attention for one sequence's chunk.

    q: [n, H, D] at positions start_pos..start_pos+n; k, v: [KVH, start_pos+n, D] (the whole context,
    head-major). Returns [n, H, D].
    """
    n, H, D = q.shape
    ctx = k.shape[1]
    qh, kh, vh = q.transpose(0, 1)[None], k[None], v[None]
    if start_pos == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        qpos = torch.arange(start_pos, start_pos + n, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # [n, ctx]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
