"""One Triton kernel for a decode step's RoPE and K/V write into int8 / int4 cache blocks (quant_policy 8
and 4), the quantized counterpart of gpu_fused.rope_write: it rotates q and k (rotate-half, as Hugging Face
Llama), quantizes k and v per token and KV head as layers/kv_quant.quantize_vectors does (asymmetric:
scale = (max - min) / (2^bits - 1), codes round((x - min) / scale) to nearest-even, int4 two per byte,
element 2j in the low nibble), and writes the codes and (scale, min) into the step's slots (with static
per-head parameters, kv_quant.load_kv_qparams, the slots hold their pairs already: codes only). On a GPU
the torch path takes about a dozen small kernels per cache and layer for this.

Oracle: layers/rotary.apply_rotary and kv_quant.QuantKV.write (the tests). Runs on CPU under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from .gpu_fused import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gpu_fused import _rotate_q

    @triton.jit
    def _rint(y):
        """Round to nearest, ties to even (torch.round), for y >= 0."""
        r = tl.floor(y + 0.5)
        return tl.where((r - y == 0.5) & (r % 2 == 1), r - 1.0, r)

    @triton.jit
    def _quantize_store(e, o, data_ptr, par_ptr, slot, pslot, j, BITS: tl.constexpr, STATIC: tl.constexpr):
        """A vector given as its even and odd elements e, o [D/2] (float32, already in the model's dtype):
        codes and (scale, min) into the slot; STATIC: the slot holds its (scale, min) already (static
        per-head parameters), codes only."""
        qmax: tl.constexpr = 255.0 if BITS == 8 else 15.0
        if STATIC:
            scale = tl.load(par_ptr + pslot).to(tl.float32)
            mn = tl.load(par_ptr + pslot + 1).to(tl.float32)
        else:
            mn = tl.minimum(tl.min(e, axis=0), tl.min(o, axis=0))
            mx = tl.maximum(tl.max(e, axis=0), tl.max(o, axis=0))
            scale = tl.maximum(tl.div_rn(mx - mn, qmax), 1e-8)
        qe = tl.minimum(tl.maximum(_rint(tl.div_rn(e - mn, scale)), 0.0), qmax).to(tl.uint8)
        qo = tl.minimum(tl.maximum(_rint(tl.div_rn(o - mn, scale)), 0.0), qmax).to(tl.uint8)
        if BITS == 8:
            tl.store(data_ptr + slot + 2 * j, qe)
            tl.store(data_ptr + slot + 2 * j + 1, qo)
        else:
            tl.store(data_ptr + slot + j, qe | (qo << 4))
        if not STATIC:
            pdt = par_ptr.dtype.element_ty
            tl.store(par_ptr + pslot, scale.to(pdt))
            tl.store(par_ptr + pslot + 1, mn.to(pdt))

    @triton.jit
    def _rope_write_quant_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, kd_ptr, kp_ptr, vd_ptr, vp_ptr, blk_ptr,
                                 off_ptr, s_t, s_c, s_qt, s_qh, s_db, s_dh, s_ds, s_pb, s_ph, s_ps, H, KVH,
                                 HALF: tl.constexpr, BITS: tl.constexpr, STATIC: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)  # q heads first, then kv heads
        dt = qkv_ptr.dtype.element_ty
        if h < H:
            _rotate_q(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, t, h, s_t, s_c, s_qt, s_qh, HALF)
        else:
            kh = h - H
            j = tl.arange(0, HALF)  # pair j: elements 2j and 2j + 1
            ev, od = 2 * j, 2 * j + 1
            # rotate-half: element d's partner is d + HALF below HALF (subtracted), d - HALF above (added)
            pe = tl.where(ev < HALF, ev + HALF, ev - HALF)
            po = tl.where(od < HALF, od + HALF, od - HALF)
            se = tl.where(ev < HALF, -1.0, 1.0)
            so = tl.where(od < HALF, -1.0, 1.0)
            kb = qkv_ptr + t * s_t + (H + kh) * (2 * HALF)
            ce = tl.load(cos_ptr + t * s_c + ev)
            co = tl.load(cos_ptr + t * s_c + od)
            sn_e = tl.load(sin_ptr + t * s_c + ev)
            sn_o = tl.load(sin_ptr + t * s_c + od)
            ke = tl.load(kb + ev).to(tl.float32) * ce + se * tl.load(kb + pe).to(tl.float32) * sn_e
            ko = tl.load(kb + od).to(tl.float32) * co + so * tl.load(kb + po).to(tl.float32) * sn_o
            blk = tl.load(blk_ptr + t).to(tl.int64)
            off = tl.load(off_ptr + t).to(tl.int64)
            slot = blk * s_db + kh * s_dh + off * s_ds
            pslot = blk * s_pb + kh * s_ph + off * s_ps
            _quantize_store(ke.to(dt).to(tl.float32), ko.to(dt).to(tl.float32), kd_ptr, kp_ptr, slot, pslot, j,
                            BITS, STATIC)
            vb = qkv_ptr + t * s_t + (H + KVH + kh) * (2 * HALF)
            _quantize_store(tl.load(vb + ev).to(tl.float32), tl.load(vb + od).to(tl.float32), vd_ptr, vp_ptr, slot,
                            pslot, j, BITS, STATIC)


def rope_write_quant(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache, v_cache,
                     blocks: torch.Tensor, offsets: torch.Tensor, H: int, KVH: int) -> torch.Tensor:
    """gpu_fused.rope_write for QuantKV caches (kv_quant.py): qkv [T, (H + 2 KVH) D]; cos/sin [T, D]
    (float32, halves equal). Writes each row's rotated k and its v, quantized, into slot (blocks[t],
    offsets[t]); returns rotated q [T, H, D]."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    T = qkv.shape[0]
    D, bits = k_cache.head_dim, k_cache.bits
    half = D // 2
    if D % 2 or half & (half - 1):
        raise ValueError(f"rope_write_quant: head_dim / 2 ({half}) must be a power of two")
    kd, kp, vd, vp = k_cache.data, k_cache.params, v_cache.data, v_cache.params
    if kd.stride() != vd.stride() or kp.stride() != vp.stride() or kd.stride(-1) != 1 or kp.stride(-1) != 1:
        raise ValueError("rope_write_quant: K and V caches must share one layout, the last dimension contiguous")
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    q = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device)
    _rope_write_quant_kernel[(T, H + KVH)](
        qkv, cos, sin, q, kd, kp, vd, vp, blocks, offsets, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        kd.stride(0), kd.stride(1), kd.stride(2), kp.stride(0), kp.stride(1), kp.stride(2), H, KVH, HALF=half,
        BITS=bits, STATIC=bool(getattr(k_cache, "static", False)))
    return q
