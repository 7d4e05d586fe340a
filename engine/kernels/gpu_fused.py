"""Fused elementwise Triton kernels for the GPU decoder layer: a decode step of a 7B model runs hundreds of
small kernels, so each one torch would split into several (RMSNorm is eight) is one launch here.

- ``rmsnorm(x, w)`` and ``add_rmsnorm(x, residual, w)`` (the residual sum, then its norm: both returned);
  ``norm_residual`` takes either by whether there is a residual
- ``silu_mul(gu)``: SiLU(gate) * up over the fused gate/up output
- ``rope_write(qkv, cos, sin, k_cache, v_cache, blocks, offsets)``: rotates q and k (rotate-half, as Hugging
  Face Llama) and writes this step's k and v into their cache slots; returns q [T, H, D]

Each matches its torch counterpart in layers/ (the tests' oracle) up to rounding: they compute in float32
and round once to the activation dtype. All run on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

if HAVE_TRITON:
    @triton.jit
    def _scaled_by_weight(xf, rstd, w, dt: tl.constexpr):
        """RMSNorm's last two roundings, as torch's layer makes them: x / RMS rounded to ``dt``, then times the
        weight rounded to ``dt``."""
        y = (xf * rstd).to(dt)
        return (y.to(tl.float32) * w.to(tl.float32)).to(dt)

    @triton.jit
    def _silu_times(g, u, dt: tl.constexpr):
        """SiLU(gate) * up as torch rounds it: SiLU rounded to ``dt``, then the product rounded to ``dt``."""
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
        return (s * u.to(tl.float32)).to(dt)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, N, sx, sr, so, sro, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
        if HAS_RES:  # the residual stream in the activation dtype, rounded as torch's add rounds it
            r = tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * sro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * so + cols, _scaled_by_weight(xf, tl.rsqrt(var + eps), w, out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, I, sx, so, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * sx + I + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * so + cols, _silu_times(g, u, out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotated(base, cos, sin, d, HALF: tl.constexpr):
        """The two halves of the head vector at ``base`` rotated (rotate-half, as Hugging Face Llama), float32."""
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def _rotate_q(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, t, h, s_t, s_c, s_qt, s_qh, HALF: tl.constexpr):
        """Head h of row t of the q/k/v output rotated into q_out [T, H, D]."""
        d = tl.arange(0, HALF)
        y1, y2 = _rotated(qkv_ptr + t * s_t + h * (2 * HALF), tl.load(cos_ptr + t * s_c + d),
                          tl.load(sin_ptr + t * s_c + d), d, HALF)
        dst = q_out_ptr + t * s_qt + h * s_qh
        tl.store(dst + d, y1.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, y2.to(q_out_ptr.dtype.element_ty))

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_ptr, v_ptr, blk_ptr, off_ptr,
                           s_t, s_c, s_qt, s_qh, s_kb, s_kh, s_ks, H, KVH, HALF: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)  # q heads first, then kv heads
        if h < H:
            _rotate_q(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, t, h, s_t, s_c, s_qt, s_qh, HALF)
        else:
            kh = h - H
            d = tl.arange(0, HALF)
            y1, y2 = _rotated(qkv_ptr + t * s_t + h * (2 * HALF), tl.load(cos_ptr + t * s_c + d),
                              tl.load(sin_ptr + t * s_c + d), d, HALF)
            blk = tl.load(blk_ptr + t).to(tl.int64)
            off = tl.load(off_ptr + t).to(tl.int64)
            slot = blk * s_kb + kh * s_kh + off * s_ks
            tl.store(k_ptr + slot + d, y1.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + slot + HALF + d, y2.to(k_ptr.dtype.element_ty))
            vsrc = qkv_ptr + t * s_t + (H + KVH + kh) * (2 * HALF)
            tl.store(v_ptr + slot + d, tl.load(vsrc + d))
            tl.store(v_ptr + slot + HALF + d, tl.load(vsrc + HALF + d))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels step rows by stride(0) and read each row's elements side by side (CPU products can
    hand back transposed views; GPU ones never do)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] -> RMSNorm(x) * weight in x's dtype."""
    x = _rows(x)
    T, N = x.shape
    out = torch.empty_like(x)
    _rmsnorm_kernel[(T,)](x, x, weight, out, out, N, x.stride(0), 0, out.stride(0), 0, eps,
                          HAS_RES=False, BLOCK=triton.next_power_of_2(N))
    return out


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (RMSNorm(x + residual) * weight, x + residual), both in the residual's dtype."""
    x, residual = _rows(x), _rows(residual)
    T, N = x.shape
    out = torch.empty_like(residual)
    res = torch.empty_like(residual)
    _rmsnorm_kernel[(T,)](x, residual, weight, out, res, N, x.stride(0), residual.stride(0), out.stride(0),
                          res.stride(0), eps, HAS_RES=True, BLOCK=triton.next_power_of_2(N))
    return out, res


def norm_residual(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """-> (RMSNorm(x + residual) * weight, the residual stream x + residual); without a residual (a model's
    first layer) RMSNorm(x) * weight and x itself."""
    if residual is None:
        return rmsnorm(x, weight, eps), x
    return add_rmsnorm(x, residual, weight, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate then up) -> SiLU(gate) * up [T, I]."""
    gu = _rows(gu)
    T, I2 = gu.shape
    I = I2 // 2
    out = torch.empty(T, I, dtype=gu.dtype, device=gu.device)
    BLOCK = 1024
    _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](gu, out, I, gu.stride(0), out.stride(0), BLOCK=BLOCK)
    return out


def rope_ok(head_dim: int) -> bool:
    half = head_dim // 2
    return HAVE_TRITON and head_dim % 2 == 0 and half > 0 and (half & (half - 1)) == 0


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, H: int, KVH: int) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) D]; cos/sin [T, D] (float32, halves equal); caches [num_blocks, KVH, bs, D].
    Writes rotated k and plain v into slot (blocks[t], offsets[t]); returns rotated q [T, H, D]. int8 / int4
    caches (kv_quant.QuantKV) go to rope_write_quant, which quantizes them as it writes."""
    from ..layers.kv_quant import QuantKV
    if isinstance(k_cache, QuantKV):
        from .rope_write_quant import rope_write_quant
        return rope_write_quant(qkv, cos, sin, k_cache, v_cache, blocks, offsets, H, KVH)
    T = qkv.shape[0]
    D = k_cache.shape[-1]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("rope_write: the caches' head_dim must be contiguous, K and V laid out alike")
    qkv = _rows(qkv)
    q = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kernel[(T, H + KVH)](qkv, cos, sin, q, k_cache, v_cache, blocks, offsets,
                                     qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
                                     k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, KVH, HALF=D // 2)
    return q
