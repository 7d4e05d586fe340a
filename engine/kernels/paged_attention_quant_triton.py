"""Triton paged-decode attention over int8 / int4 KV blocks, dequantized inside the kernel.

The blocks are the engine's quantized layout (see layers/kv_quant.py): codes uint8 [num_blocks, KVH, bs, D']
(D' = D at int8, D/2 at int4 with element 2j in the low nibble and 2j+1 in the high one) and per-vector
(scale, min) [num_blocks, KVH, bs, 2]. One program per (sequence, KV head) with an online softmax over
blocks, like paged_attention_triton. int4 never interleaves nibbles: the even and odd halves of q, K and V
are handled as two D/2-wide planes, so q.k = q_even.k_even + q_odd.k_odd and the output is written back to
its even and odd columns.

Oracle: ``layers.attention.torch_decode`` on the same QuantKV caches (dequantize, then attend). Runs on CPU
under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from .paged_attention_triton import HAVE_TRITON, _pow2, split_plan

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .paged_attention_triton import _combine_splits, _softmax_start, _softmax_update, _store_partial

    @triton.jit
    def _dequant_plane(ptr, base, offs_s, offs_c, s_ds, scale, mn, smask, SHIFT: tl.constexpr,
                       MASK: tl.constexpr):
        codes = tl.load(ptr + base + offs_s[:, None] * s_ds + offs_c[None, :], mask=smask[:, None], other=0)
        codes = (codes.to(tl.int32) >> SHIFT) & MASK
        return codes.to(tl.float32) * scale[:, None] + mn[:, None]  # [BS, W]

    @triton.jit
    def _paged_decode_quant_kernel(q_ptr, kd_ptr, kp_ptr, vd_ptr, vp_ptr, bt_ptr, ctx_ptr, out_ptr, ws_ptr,
                                   cnt_ptr, sm_scale, CHUNK, s_qb, s_qh, s_db, s_dh, s_ds, s_pb, s_ph, s_ps, s_btb,
                                   s_ob, s_oh, KVH, G: tl.constexpr, G_PAD: tl.constexpr, W: tl.constexpr,
                                   BS: tl.constexpr, BITS: tl.constexpr, SPLITS: tl.constexpr):
        # W = width of one plane: D at int8 (one plane), D/2 at int4 (even plane, odd plane). SPLITS > 1: the
        # context in parts of CHUNK positions, one program each, merged by the last to finish
        # (paged_attention_triton._store_partial / _combine_splits)
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, ctx)
        offs_g = tl.arange(0, G_PAD)
        offs_c = tl.arange(0, W)
        offs_s = tl.arange(0, BS)
        gmask = offs_g < G
        STEP: tl.constexpr = 1 if BITS == 8 else 2
        MASK: tl.constexpr = 255 if BITS == 8 else 15
        q_rows = q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh
        q0 = tl.load(q_rows + (offs_c * STEP)[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        if BITS == 4:
            q1 = tl.load(q_rows + (offs_c * STEP + 1)[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        else:
            q1 = tl.zeros([G_PAD, W], tl.float32)
        m, l, acc0, acc1 = _softmax_start(G_PAD, W)
        for i in range(lo // BS, tl.cdiv(hi, BS)):
            blk = tl.load(bt_ptr + b * s_btb + i).to(tl.int64)
            smask = (i * BS + offs_s) < hi
            dbase = blk * s_db + h * s_dh
            pbase = blk * s_pb + h * s_ph + offs_s * s_ps
            ks = tl.load(kp_ptr + pbase, mask=smask, other=0.0).to(tl.float32)
            kz = tl.load(kp_ptr + pbase + 1, mask=smask, other=0.0).to(tl.float32)
            k0 = _dequant_plane(kd_ptr, dbase, offs_s, offs_c, s_ds, ks, kz, smask, 0, MASK)
            s = tl.sum(q0[:, None, :] * k0[None, :, :], axis=2)
            if BITS == 4:
                k1 = _dequant_plane(kd_ptr, dbase, offs_s, offs_c, s_ds, ks, kz, smask, 4, MASK)
                s += tl.sum(q1[:, None, :] * k1[None, :, :], axis=2)
            s = tl.where(smask[None, :], s * sm_scale, float("-inf"))  # [G_PAD, BS]; masked slots are 0 in V
            m, l, p, alpha = _softmax_update(m, l, s)
            vs = tl.load(vp_ptr + pbase, mask=smask, other=0.0).to(tl.float32)
            vz = tl.load(vp_ptr + pbase + 1, mask=smask, other=0.0).to(tl.float32)
            v0 = _dequant_plane(vd_ptr, dbase, offs_s, offs_c, s_ds, vs, vz, smask, 0, MASK)
            acc0 = acc0 * alpha[:, None] + tl.sum(p[:, :, None] * v0[None, :, :], axis=1)
            if BITS == 4:
                v1 = _dequant_plane(vd_ptr, dbase, offs_s, offs_c, s_ds, vs, vz, smask, 4, MASK)
                acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1[None, :, :], axis=1)
        o_rows = out_ptr + b * s_ob + (h * G + offs_g)[:, None] * s_oh
        odt = out_ptr.dtype.element_ty
        if SPLITS == 1:
            tl.store(o_rows + (offs_c * STEP)[None, :], (acc0 / l[:, None]).to(odt), mask=gmask[:, None])
            if BITS == 4:
                tl.store(o_rows + (offs_c * STEP + 1)[None, :], (acc1 / l[:, None]).to(odt), mask=gmask[:, None])
        else:
            rh = b * KVH + h
            last = _store_partial(m, l, acc0, acc1, ws_ptr, cnt_ptr, rh, sp, offs_g, offs_c, SPLITS, G_PAD, W)
            if last == SPLITS - 1:
                o0, o1 = _combine_splits(ws_ptr, cnt_ptr, rh, offs_g, offs_c, SPLITS, G_PAD, W)
                tl.store(o_rows + (offs_c * STEP)[None, :], o0.to(odt), mask=gmask[:, None])
                if BITS == 4:
                    tl.store(o_rows + (offs_c * STEP + 1)[None, :], o1.to(odt), mask=gmask[:, None])


def paged_decode_attention_quant_triton(q: torch.Tensor, k_data: torch.Tensor, k_params: torch.Tensor,
                                        v_data: torch.Tensor, v_params: torch.Tensor, block_tables: torch.Tensor,
                                        context_lens: torch.Tensor, scale: float, bits: int,
                                        splits: int = 0) -> torch.Tensor:
    """q [B, H, D]; codes [num_blocks, KVH, bs, D or D/2] uint8; params [num_blocks, KVH, bs, 2] -> [B, H, D].
    ``splits``: parts of each context attended by programs of their own (0: splits_for the tables' width)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    if bits not in (4, 8):
        raise ValueError(f"bits: {bits} is not supported; use 8 or 4")
    B, H, D = q.shape
    nb, KVH, BS, Dp = k_data.shape
    W = D if bits == 8 else D // 2
    if Dp != W or v_data.shape != k_data.shape or k_data.dtype != torch.uint8:
        raise ValueError(f"int{bits} cache codes must be uint8 [blocks, KVH, bs, {W}] for head_dim {D}; "
                         f"got {tuple(k_data.shape)} {k_data.dtype}")
    if k_params.shape != (nb, KVH, BS, 2) or v_params.shape != k_params.shape:
        raise ValueError(f"cache params must be [blocks, KVH, bs, 2]; got {tuple(k_params.shape)}")
    if H % KVH:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {KVH}")
    if not (_pow2(W) and _pow2(BS)):
        raise ValueError(f"head_dim ({D}) and block_size ({BS}) must be powers of two for the Triton kernel")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    for name, t in (("q", q), ("k codes", k_data), ("v codes", v_data), ("k params", k_params),
                    ("v params", v_params)):
        if t.stride(-1) != 1:
            raise ValueError(f"the last dimension of {name} must be contiguous")
    if k_data.stride() != v_data.stride() or k_params.stride() != v_params.stride():
        raise ValueError("K and V caches must share one layout")
    G, G_PAD = H // KVH, max(triton.next_power_of_2(H // KVH), 1)
    out = torch.empty_like(q)
    bt = block_tables.to(torch.int32).contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    S, chunk, ws, cnt = split_plan(bt.shape[1], BS, B, KVH, G_PAD, W, out, splits)
    _paged_decode_quant_kernel[(B, KVH, S)](
        q, k_data, k_params, v_data, v_params, bt, ctx, out, ws, cnt, scale, chunk,
        q.stride(0), q.stride(1), k_data.stride(0), k_data.stride(1), k_data.stride(2),
        k_params.stride(0), k_params.stride(1), k_params.stride(2), bt.stride(0), out.stride(0), out.stride(1), KVH,
        G=G, G_PAD=G_PAD, W=W, BS=BS, BITS=bits, SPLITS=S)
    return out


def triton_quant_decode(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """Attention-layer hook for QuantKV caches (see layers.attention.torch_decode)."""
    return paged_decode_attention_quant_triton(q, k_cache.data, k_cache.params, v_cache.data, v_cache.params,
                                               meta.decode_block_tables, meta.decode_ctx_lens, scale,
                                               k_cache.bits)
