"""One Triton kernel for a decode step's attention over dense paged blocks: rotary embedding of q and k, the
step's K/V written into their cache slots, and the paged decode attention (online softmax) of
paged_attention_triton.py, so a decoder layer launches one kernel between its q/k/v and o products, not two
(gpu_fused.rope_write, then the attention).

A program takes one row and one KV head. Rows of this step attend to each other (a sequence's speculative
drafts: each row sees the rows before it), and the programs of one launch cannot see each other's cache
writes, so a program reads from the cache only the positions earlier steps wrote (context less this step's
rows of its sequence, ``fresh``) and rotates the k of this step's rows itself from the q/k/v output, as
the cache would hold them (rounded to the cache's dtype).

Oracle: gpu_fused.rope_write followed by paged_attention_torch / layers.attention.torch_decode (the tests).
Runs on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from .paged_attention_triton import HAVE_TRITON, _pow2, split_plan

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gpu_fused import _rotated
    from .paged_attention_triton import _combine_splits, _softmax_start, _softmax_update, _store_partial

    @triton.jit
    def _rope_decode_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, blk_ptr, off_ptr, bt_ptr, ctx_ptr,
                            fresh_ptr, out_ptr, ws_ptr, cnt_ptr, scale, CHUNK, s_t, s_c, s_kb, s_kh, s_ks, s_btb,
                            s_ot, s_oh, H, KVH, G: tl.constexpr, G_PAD: tl.constexpr, HALF: tl.constexpr,
                            BS: tl.constexpr, SPLITS: tl.constexpr):
        """One program per (row, KV head, split of the cached context: CHUNK positions each, whole blocks).
        SPLITS > 1 (long contexts): each split's partial softmax goes to the workspace and the last split
        to finish (a counter per row and head says which, as the W4A16 split-K does) merges them; the step's
        own rows are the last split's, the K/V write the first's."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        d = tl.arange(0, HALF)
        offs_g = tl.arange(0, G_PAD)
        offs_s = tl.arange(0, BS)
        gmask = offs_g < G
        cos = tl.load(cos_ptr + t * s_c + d)
        sin = tl.load(sin_ptr + t * s_c + d)
        cdt = k_ptr.dtype.element_ty
        # q heads h G .. h G + G - 1, rotated and rounded as rope_write stores them: halves [G_PAD, HALF]
        qb = qkv_ptr + t * s_t + (h * G + offs_g)[:, None] * (2 * HALF) + d[None, :]
        x1 = tl.load(qb, mask=gmask[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(qb + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
        qdt = qkv_ptr.dtype.element_ty
        q1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(qdt).to(tl.float32)
        q2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(qdt).to(tl.float32)
        # this row's K (rotated) and V into its slot
        k1, k2 = _rotated(qkv_ptr + t * s_t + (H + h) * (2 * HALF), cos, sin, d, HALF)
        vsrc = qkv_ptr + t * s_t + (H + KVH + h) * (2 * HALF)
        if sp == 0:
            slot = tl.load(blk_ptr + t).to(tl.int64) * s_kb + h * s_kh + tl.load(off_ptr + t).to(tl.int64) * s_ks
            tl.store(k_ptr + slot + d, k1.to(cdt))
            tl.store(k_ptr + slot + HALF + d, k2.to(cdt))
            tl.store(v_ptr + slot + d, tl.load(vsrc + d).to(cdt))
            tl.store(v_ptr + slot + HALF + d, tl.load(vsrc + HALF + d).to(cdt))
        # this split's share of the positions earlier steps cached, block by block
        fresh = tl.load(fresh_ptr + t)
        cached = tl.load(ctx_ptr + t) - fresh
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, cached)
        m, l, acc1, acc2 = _softmax_start(G_PAD, HALF)
        for i in range(lo // BS, tl.cdiv(hi, BS)):
            blk = tl.load(bt_ptr + t * s_btb + i).to(tl.int64)
            smask = (i * BS + offs_s) < hi
            kb = k_ptr + blk * s_kb + h * s_kh + offs_s[:, None] * s_ks + d[None, :]
            ka = tl.load(kb, mask=smask[:, None], other=0.0).to(tl.float32)  # [BS, HALF]
            kz = tl.load(kb + HALF, mask=smask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q1[:, None, :] * ka[None, :, :], axis=2) + tl.sum(q2[:, None, :] * kz[None, :, :], axis=2)
            s = s * scale
            s = tl.where(smask[None, :], s, float("-inf"))  # [G_PAD, BS]
            m, l, p, alpha = _softmax_update(m, l, s)
            vb = v_ptr + blk * s_kb + h * s_kh + offs_s[:, None] * s_ks + d[None, :]
            va = tl.load(vb, mask=smask[:, None], other=0.0).to(tl.float32)
            vz = tl.load(vb + HALF, mask=smask[:, None], other=0.0).to(tl.float32)
            acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * va[None, :, :], axis=1)
            acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * vz[None, :, :], axis=1)
        # then this step's rows of the sequence (its drafts before this row, and this row), from q/k/v
        for j in range(0, tl.where(sp == SPLITS - 1, fresh, 0)):
            r = t - fresh + 1 + j
            rc = tl.load(cos_ptr + r * s_c + d)
            rs = tl.load(sin_ptr + r * s_c + d)
            a1, a2 = _rotated(qkv_ptr + r * s_t + (H + h) * (2 * HALF), rc, rs, d, HALF)
            a1 = a1.to(cdt).to(tl.float32)
            a2 = a2.to(cdt).to(tl.float32)
            vr = qkv_ptr + r * s_t + (H + KVH + h) * (2 * HALF)
            b1 = tl.load(vr + d).to(cdt).to(tl.float32)
            b2 = tl.load(vr + HALF + d).to(cdt).to(tl.float32)
            s = (tl.sum(q1 * a1[None, :], axis=1) + tl.sum(q2 * a2[None, :], axis=1)) * scale  # [G_PAD]
            m, l, p, alpha = _softmax_update(m, l, s[:, None])  # p [G_PAD, 1]
            acc1 = acc1 * alpha[:, None] + p * b1[None, :]
            acc2 = acc2 * alpha[:, None] + p * b2[None, :]
        ob = out_ptr + t * s_ot + (h * G + offs_g)[:, None] * s_oh + d[None, :]
        odt = out_ptr.dtype.element_ty
        if SPLITS == 1:
            tl.store(ob, (acc1 / l[:, None]).to(odt), mask=gmask[:, None])
            tl.store(ob + HALF, (acc2 / l[:, None]).to(odt), mask=gmask[:, None])
        else:
            rh = t * KVH + h
            if _store_partial(m, l, acc1, acc2, ws_ptr, cnt_ptr, rh, sp, offs_g, d, SPLITS, G_PAD, HALF) == SPLITS - 1:
                o1, o2 = _combine_splits(ws_ptr, cnt_ptr, rh, offs_g, d, SPLITS, G_PAD, HALF)
                tl.store(ob, o1.to(odt), mask=gmask[:, None])
                tl.store(ob + HALF, o2.to(odt), mask=gmask[:, None])


def rope_decode_ok(head_dim: int, block_size: int) -> bool:
    return HAVE_TRITON and head_dim % 2 == 0 and _pow2(head_dim // 2) and _pow2(block_size)


def rope_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta, H: int, KVH: int, scale: float, splits: int = 0) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) D], every row a decode row; cos/sin [T, D] (float32, halves equal); caches
    [num_blocks, KVH, bs, D] alike; ``meta``'s slot_blocks/slot_offsets (each row's slot), decode_block_tables,
    decode_ctx_lens (context with the row itself) and decode_fresh (this step's rows of the row's sequence up
    to and including it: 1, or 2, 3, ... for drafts). Writes each row's rotated k and its v into its slot;
    -> attention output [T, H, D]. ``splits``: parts of the cached context attended by programs of their own
    (0: paged_attention_triton.splits_for the tables' width, which a CUDA graph fixes at capture)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    T = qkv.shape[0]
    nb, kvh, bs, D = k_cache.shape
    if kvh != KVH or H % KVH or qkv.shape[1] != (H + 2 * KVH) * D:
        raise ValueError(f"rope_decode: q/k/v width {qkv.shape[1]} does not match {H} heads, {KVH} KV heads of "
                         f"{D} (caches {tuple(k_cache.shape)})")
    if not rope_decode_ok(D, bs):
        raise ValueError(f"rope_decode: head_dim / 2 ({D // 2}) and block_size ({bs}) must be powers of two")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("rope_decode: the caches' head_dim must be contiguous, K and V laid out alike")
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    bt, ctx, fresh = meta.decode_block_tables, meta.decode_ctx_lens, meta.decode_fresh
    if bt.shape[0] != T or ctx.shape != (T,) or fresh.shape != (T,):
        raise ValueError(f"rope_decode: {T} rows need [T, blocks] block tables, [T] context lengths and [T] fresh "
                         f"counts")
    bt = bt if bt.stride(-1) == 1 else bt.contiguous()
    G, G_PAD = H // KVH, max(triton.next_power_of_2(H // KVH), 1)
    out = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device)
    S, chunk, ws, cnt = split_plan(bt.shape[1], bs, T, KVH, G_PAD, D // 2, out, splits)
    _rope_decode_kernel[(T, KVH, S)](
        qkv, cos, sin, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets, bt, ctx, fresh, out, ws, cnt, scale,
        chunk, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
        out.stride(0), out.stride(1), H, KVH, G=G, G_PAD=G_PAD, HALF=D // 2, BS=bs, SPLITS=S)
    return out
