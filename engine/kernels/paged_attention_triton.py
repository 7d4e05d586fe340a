"""Triton paged-decode attention: one program per (sequence, KV head), online softmax over blocks.

Oracle: ``paged_attention_torch.paged_decode_attention``. Runs on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency on Linux x86_64
    HAVE_TRITON = False


if HAVE_TRITON:
    @triton.jit
    def _softmax_start(G_PAD: tl.constexpr, W: tl.constexpr):
        """The online softmax's empty state: max -inf and sum 0 [G_PAD], two output planes [G_PAD, W] at 0."""
        return (tl.full([G_PAD], float("-inf"), tl.float32), tl.zeros([G_PAD], tl.float32),
                tl.zeros([G_PAD, W], tl.float32), tl.zeros([G_PAD, W], tl.float32))

    @triton.jit
    def _softmax_update(m, l, s):
        """One block of the online softmax: running max m and sum l [G], scores s [G, S] (-inf where masked)
        -> (max, sum, p = exp(s - max) [G, S], alpha [G], the factor the running output is rescaled by)."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        return m_new, l * alpha + tl.sum(p, axis=1), p, alpha

    @triton.jit
    def _partial_base(rh, SPLITS: tl.constexpr, G_PAD: tl.constexpr, W: tl.constexpr):
        """Where row and KV head ``rh`` (row * KVH + head) keep their splits' partial softmaxes in the workspace:
        SPLITS records of (max, sum [G_PAD], two output planes [G_PAD, W]) (split_plan sizes it)."""
        return rh.to(tl.int64) * (SPLITS * (2 * G_PAD + 2 * G_PAD * W))

    @triton.jit
    def _store_partial(m, l, o0, o1, ws_ptr, cnt_ptr, rh, sp, offs_g, offs_c, SPLITS: tl.constexpr,
                       G_PAD: tl.constexpr, W: tl.constexpr):
        """Split ``sp`` of row and KV head ``rh``'s context: its partial softmax into the workspace, then their
        counter moved -> how many splits were in before (SPLITS - 1: this program merges, _combine_splits)."""
        b = _partial_base(rh, SPLITS, G_PAD, W) + sp * (2 * G_PAD + 2 * G_PAD * W)
        tl.store(ws_ptr + b + offs_g, m)
        tl.store(ws_ptr + b + G_PAD + offs_g, l)
        a = b + 2 * G_PAD + offs_g[:, None] * (2 * W) + offs_c[None, :]
        tl.store(ws_ptr + a, o0)
        tl.store(ws_ptr + a + W, o1)
        tl.debug_barrier()  # every thread's partials are out before the counter moves
        return tl.atomic_add(cnt_ptr + rh, 1)

    @triton.jit
    def _combine_splits(ws_ptr, cnt_ptr, rh, offs_g, offs_c, SPLITS: tl.constexpr, G_PAD: tl.constexpr,
                        W: tl.constexpr):
        """The last split's program: row and KV head ``rh``'s SPLITS partial softmaxes (_store_partial) merged
        -> the output planes [G_PAD, W] x 2; their counter back to zero for the next launch. Read past the L1
        cache (".cg"): other programs wrote them."""
        S: tl.constexpr = 2 * G_PAD + 2 * G_PAD * W
        base = _partial_base(rh, SPLITS, G_PAD, W)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        for sp in range(SPLITS):
            m = tl.maximum(m, tl.load(ws_ptr + base + sp * S + offs_g, cache_modifier=".cg"))
        l = tl.zeros([G_PAD], tl.float32)
        o0 = tl.zeros([G_PAD, W], tl.float32)
        o1 = tl.zeros([G_PAD, W], tl.float32)
        for sp in range(SPLITS):
            b = base + sp * S
            w = tl.exp(tl.load(ws_ptr + b + offs_g, cache_modifier=".cg") - m)  # 0 for an empty split
            l += w * tl.load(ws_ptr + b + G_PAD + offs_g, cache_modifier=".cg")
            a = b + 2 * G_PAD + offs_g[:, None] * (2 * W) + offs_c[None, :]
            o0 += w[:, None] * tl.load(ws_ptr + a, cache_modifier=".cg")
            o1 += w[:, None] * tl.load(ws_ptr + a + W, cache_modifier=".cg")
        tl.store(cnt_ptr + rh, 0)
        return o0 / l[:, None], o1 / l[:, None]

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, scale,
                             s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_btb, s_ob, s_oh,
                             G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.load(ctx_ptr + b)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, BS)
        gmask = offs_g < G
        q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=gmask[:, None], other=0.0).to(tl.float32)  # [G_PAD, D]
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for i in range(0, tl.cdiv(ctx, BS)):
            blk = tl.load(bt_ptr + b * s_btb + i).to(tl.int64)
            smask = (i * BS + offs_s) < ctx
            k = tl.load(k_ptr + blk * s_kb + offs_s[:, None] * s_ks + h * s_kh + offs_d[None, :],
                        mask=smask[:, None], other=0.0).to(tl.float32)  # [BS, D]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BS]
            s = tl.where(smask[None, :], s, float("-inf"))
            m, l, p, alpha = _softmax_update(m, l, s)
            v = tl.load(v_ptr + blk * s_vb + offs_s[:, None] * s_vs + h * s_vh + offs_d[None, :],
                        mask=smask[:, None], other=0.0).to(tl.float32)  # [BS, D]
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        out = acc / l[:, None]
        tl.store(out_ptr + b * s_ob + (h * G + offs_g)[:, None] * s_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


# Cached positions per split of a long context (whole blocks): a row's context is split in as many parts as
# the block tables' width allows this many positions each, up to MAX_SPLITS (flash-decoding, vLLM's paged
# attention v2): one program per row and KV head leaves most SMs idle when a few sequences attend to
# thousands of positions. Tables of up to SPLIT_POSITIONS positions run unsplit. (rope_decode_triton and
# paged_attention_quant_triton split; this file's dense kernel serves the unfused path.)
SPLIT_POSITIONS, MAX_SPLITS = 1024, 8


def splits_for(max_blocks: int, block_size: int) -> int:
    return max(1, min(MAX_SPLITS, -(-max_blocks * block_size // SPLIT_POSITIONS)))


def split_plan(max_blocks: int, block_size: int, rows: int, kv_heads: int, g_pad: int, width: int,
               out: torch.Tensor, splits: int = 0):
    """For a kernel that splits each row's cached context (_store_partial / _combine_splits): -> (splits,
    positions per split (whole blocks), the partial softmaxes' workspace, the counters per row and KV head,
    which the kernel leaves zeroed). ``splits`` 0: splits_for the tables' width; one split needs neither
    buffer (``out`` stands in for both)."""
    S = splits or splits_for(max_blocks, block_size)
    chunk = -(-max_blocks // S) * block_size
    if S == 1:
        return S, chunk, out, out
    from .awq_common import _workspace
    ws = torch.empty(rows * kv_heads * S * (2 * g_pad + 2 * g_pad * width), dtype=torch.float32, device=out.device)
    return S, chunk, ws, _workspace(out.device, 1, rows * kv_heads)[1]


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as the torch reference: q [B, H, D]; caches [num_blocks, block_size, KVH, D]."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    B, H, D = q.shape
    nb, BS, KVH, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"k/v cache shape {tuple(k_cache.shape)} does not match q head_dim {D}")
    if H % KVH:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {KVH}")
    if not (_pow2(D) and _pow2(BS)):
        raise ValueError(f"head_dim ({D}) and block_size ({BS}) must be powers of two for the Triton kernel")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the last dimension of q and the caches must be contiguous")
    G = H // KVH
    out = torch.empty_like(q)
    bt = block_tables.to(torch.int32).contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    _paged_decode_kernel[(B, KVH)](
        q, k_cache, v_cache, bt, ctx, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        G=G, G_PAD=max(triton.next_power_of_2(G), 1), D=D, BS=BS)
    return out


def triton_decode(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """Attention-layer hook (see layers.attention.torch_decode); the engine's caches are [nb, KVH, bs, D]."""
    return paged_decode_attention_triton(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         meta.decode_block_tables, meta.decode_ctx_lens, scale)
