"""How the W4A16 kernels make their input from what they are given, so that the small kernel which would
make it between two products of a decoder layer is not launched (XMODE, a compile-time constant of each
kernel):

- 0: x as it is;
- 1 (gated): x is the MLP's fused gate/up output [M, 2K] and the input is SiLU(gate) * up, made as
  gpu_fused.silu_mul makes it (the down projection);
- 2 (normed): the input is RMSNorm(x + residual) * weight, made as gpu_fused.add_rmsnorm makes it (the q/k/v
  and gate/up projections, reading the previous product's output): each program first sums the squares of
  its rows over all of K, and the programs of the first column tile and K split write x + residual out (the
  residual stream the layer carries on);
- 3: RMSNorm(x) * weight, without a residual (the first layer).

The roundings follow the kernels they replace, which follow torch: the residual sum, the normalised value,
its product by the weight, SiLU and its product by up are each rounded to x's dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .awq_common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gpu_fused import _scaled_by_weight, _silu_times

    @triton.jit
    def _residual_sum(x_ptr, r_ptr, offs, mask, XMODE: tl.constexpr):
        """x (+ the residual, XMODE 2) at offs, rounded to x's dtype, as float32."""
        v = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if XMODE == 2:
            v = (v.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(v.dtype)
        return v.to(tl.float32)

    @triton.jit
    def _input_rstd(x_ptr, r_ptr, rows, mask_m, sxm, K, eps, XMODE: tl.constexpr, BLOCK: tl.constexpr):
        """XMODE 2 and 3: 1 / RMS over K of each row of x (+ residual) [len(rows)]; otherwise 1."""
        acc = tl.zeros([rows.shape[0]], dtype=tl.float32)
        if XMODE >= 2:
            for k0 in range(0, K, BLOCK):
                ks = k0 + tl.arange(0, BLOCK)
                v = _residual_sum(x_ptr, r_ptr, rows[:, None] * sxm + ks[None, :],
                                  mask_m[:, None] & (ks < K)[None, :], XMODE)
                acc += tl.sum(v * v, axis=1)
            acc = tl.rsqrt(acc / K + eps)
        else:
            acc += 1.0
        return acc

    @triton.jit
    def _write_residual(x_ptr, r_ptr, res_ptr, rows, mask_m, sxm, K, writer, XMODE: tl.constexpr,
                        BLOCK: tl.constexpr):
        """XMODE 2, in the ``writer`` program: x + residual of its rows into res (laid out as x)."""
        if XMODE == 2:
            if writer:
                for k0 in range(0, K, BLOCK):
                    ks = k0 + tl.arange(0, BLOCK)
                    offs = rows[:, None] * sxm + ks[None, :]
                    mask = mask_m[:, None] & (ks < K)[None, :]
                    v = _residual_sum(x_ptr, r_ptr, offs, mask, XMODE)
                    tl.store(res_ptr + offs, v.to(res_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_input(x_ptr, r_ptr, res_ptr, K, eps, writer, XMODE: tl.constexpr):
        """The one-row kernels' prologue: 1 / RMS of the row ([1], XMODE 2 and 3) and, in the ``writer``
        program, the residual sum written out (XMODE 2)."""
        rows = tl.arange(0, 1)
        rstd = _input_rstd(x_ptr, r_ptr, rows, rows < 1, 0, K, eps, XMODE, 1024)
        _write_residual(x_ptr, r_ptr, res_ptr, rows, rows < 1, 0, K, writer, XMODE, 1024)
        return rstd

    @triton.jit
    def _tile_input(x_ptr, r_ptr, res_ptr, offs_m, mask_m, sxm, K, eps, writer, XMODE: tl.constexpr,
                    ROW1: tl.constexpr):
        """The tiled kernels' prologue: 1 / RMS of the tile's rows ([BM, 1]; ROW1, one row: [1]) for XMODE 2
        and 3 and, in the ``writer`` programs, their residual sums written out (XMODE 2)."""
        if ROW1:  # (a branch each: Triton compiles every return of a function, taken or not)
            rstd = _row_input(x_ptr, r_ptr, res_ptr, K, eps, writer, XMODE)
        else:
            rstd = _input_rstd(x_ptr, r_ptr, offs_m, mask_m, sxm, K, eps, XMODE, 256)[:, None]
            _write_residual(x_ptr, r_ptr, res_ptr, offs_m, mask_m, sxm, K, writer, XMODE, 256)
        return rstd

    @triton.jit
    def _tile_x(x_ptr, offs_m, mask_m, ks, kmask, sxm, up, r_ptr, nw_ptr, rstd, XMODE: tl.constexpr,
                ROW1: tl.constexpr):
        """The tiled kernels' x tile [BM, BK] at K indices ks. ROW1 (one row, the rest padding): the row made
        once as a [BK] vector and placed in row 0, so what making the input costs is not paid again for
        every padding row; else row by row."""
        if ROW1:
            xr = _load_x(x_ptr, ks, ks, kmask, up, r_ptr, nw_ptr, rstd, XMODE)
            x = tl.where(offs_m[:, None] == 0, xr[None, :], tl.zeros_like(xr)[None, :])
        else:
            x = _load_x(x_ptr, offs_m[:, None] * sxm + ks[None, :], offs_m[:, None] * 0 + ks[None, :],
                        mask_m[:, None], up, r_ptr, nw_ptr, rstd, XMODE)
        return x

    @triton.jit
    def _load_x(x_ptr, offs, koffs, mask, up, r_ptr, nw_ptr, rstd, XMODE: tl.constexpr):
        """The product's input at ``offs`` of x (its K indices ``koffs``, the same shape), in x's dtype, 0 where
        masked; ``rstd`` (XMODE 2 and 3) broadcasts against it. XMODE 1: offs address the gate half of the
        fused gate/up row, the up half ``up`` elements further on."""
        if XMODE == 1:
            return _silu_times(tl.load(x_ptr + offs, mask=mask, other=0.0),
                               tl.load(x_ptr + offs + up, mask=mask, other=0.0), x_ptr.dtype.element_ty)
        if XMODE >= 2:
            return _scaled_by_weight(_residual_sum(x_ptr, r_ptr, offs, mask, XMODE), rstd,
                                     tl.load(nw_ptr + koffs, mask=mask, other=0.0), x_ptr.dtype.element_ty)
        return tl.load(x_ptr + offs, mask=mask, other=0.0)


class Norm(NamedTuple):
    """RMSNorm(x + residual) * weight as a product's input (residual None: RMSNorm(x) * weight); the kernel
    writes x + residual into ``res`` (a tensor shaped and laid out as x)."""
    residual: Optional[torch.Tensor]
    weight: torch.Tensor
    eps: float
    res: Optional[torch.Tensor] = None


def gated_k(x: torch.Tensor, gated: bool) -> int:
    """A product's K: x's width, or half of it where x is a fused gate/up output the kernel gates itself."""
    if gated and x.shape[1] % 2:
        raise ValueError(f"W4A16 gated product: x has {x.shape[1]} columns, not gate and up halves")
    return x.shape[1] // 2 if gated else x.shape[1]


def x_input(x: torch.Tensor, gated: bool = False, norm: Optional[Norm] = None) -> Tuple[int, int, tuple]:
    """-> (K, XMODE, the kernel's runtime input arguments (up, residual, norm weight, residual out, eps))."""
    if gated and norm is not None:
        raise ValueError("W4A16 product: an input is gated or normed, not both")
    K = gated_k(x, gated)
    if norm is None:
        return K, int(gated), (K if gated else 0, x, x, x, 0.0)
    r, res = norm.residual, norm.res
    for name, t in (("residual", r), ("residual out", res)):
        if t is not None and (t.shape != x.shape or t.stride() != x.stride()):
            raise ValueError(f"W4A16 normed product: the {name} must be shaped and laid out as x {tuple(x.shape)}")
    if r is not None and res is None:
        raise ValueError("W4A16 normed product: a residual needs a tensor for the residual sum")
    if norm.weight.shape != (K,) or norm.weight.stride(0) != 1:
        raise ValueError(f"W4A16 normed product: the norm weight must be [{K}] and contiguous")
    return K, 2 if r is not None else 3, (0, x if r is None else r, norm.weight, x if res is None else res, norm.eps)
