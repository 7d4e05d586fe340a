"""W4A16 matmul in Triton: x [M, K] @ W [K, N] with W dequantized inside the kernel (never materialized), over
two layouts, and the dispatch by row count. The oracle is awq_torch.awq_matmul_reference.

- AutoAWQ's GEMM layout as loaded (``awq_matmul``): qweight int32 [K, N/8], a word holds 8 output columns
  of one input row. float16 runs the tensor-core kernel (awq_tc.py); otherwise M > 1 runs the tiled kernel
  here (tiles spread each word over its columns with tl.interleave into tl.dot), M = 1 awq_gemv.py's.
- K-packed (``kpack_matmul``, made once at load by ``repack_kpack``, as TurboMind converts AWQ weights to
  its own layout): qweight_k int32 [K/8, N], word (r, n) holds rows 8r..8r+7 of column n in nibbles 0..7;
  zeros float16 [K/G, N]. One row runs awq_gemv.py's tuned kernel (or the tensor-core one where faster),
  float16 up to 255 rows the tensor-core kernel, other dtypes the tiled kernel here, and from 256 rows the
  weight is dequantized for cuBLAS.

Split-K partial sums meet inside the kernels (awq_common.py).
"""
from __future__ import annotations

from typing import Optional, Set, Tuple

import torch

from . import awq_tc
from .awq_common import HAVE_TRITON, _sm_count, _split_for, _workspace  # noqa: F401 - HAVE_TRITON for callers
from .awq_gemv import awq_gemv, kpack_gemv
from .awq_input import Norm, gated_k, x_input

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .awq_common import _awq_shift, _store_tile, _tile_coords

    @triton.jit
    def _dequant_dot(acc, x_ptr, offs_m, sxm, ks, xmask, q, z, sc):
        """acc + x[offs_m, ks] @ ((q - z) * sc): one dequantized [len(ks), BN] tile into the tiled kernels' sum."""
        x = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :], mask=xmask, other=0.0)
        return acc + tl.dot(x, ((q - z[None, :]) * sc[None, :]).to(x.dtype))

    @triton.jit
    def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, G, KS,
                    sxm, sqk, szg, ssg, som,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        pk, offs_m, offs_n, mask_m, mask_n = _tile_coords(M, N, BM, BN)
        offs_p = tl.program_id(0) * (BN // 8) + tl.arange(0, BN // 8)  # packed columns
        offs_k = tl.arange(0, BK)
        mask_p = offs_p < N // 8
        shifts = _awq_shift(offs_n)  # [BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pk * KS
        k_hi = tl.minimum(k_lo + KS, K)
        for k0 in range(k_lo, k_hi, BK):
            ks = k0 + offs_k
            kmask = ks < K
            qw = tl.load(qw_ptr + ks[:, None] * sqk + offs_p[None, :], mask=kmask[:, None] & mask_p[None, :],
                         other=0)  # [BK, BN/8]
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)  # [BK, BN]: each word repeated over its 8 columns
            g = k0 // G  # BK divides G: the whole tile shares one group
            qz = tl.load(qz_ptr + g * szg + offs_p, mask=mask_p, other=0)
            qz = tl.interleave(qz, qz)
            qz = tl.interleave(qz, qz)
            qz = tl.interleave(qz, qz)  # [BN]
            q = ((qw >> shifts[None, :]) & 0xF).to(tl.float32)
            z = ((qz >> shifts) & 0xF).to(tl.float32)
            sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = _dequant_dot(acc, x_ptr, offs_m, sxm, ks, mask_m[:, None] & kmask[None, :], q, z, sc)
        _store_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, som, N, SPLIT_K)

    @triton.jit
    def _kpack_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, G, KS,
                      sxm, sqw, szg, ssg, som,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                      NIBBLE_DOTS: tl.constexpr):
        """M > 1 over the K-packed layout. NIBBLE_DOTS 0: the [BK/8, 8, BN] nibbles reshaped into the [BK, BN]
        tile of one tl.dot; 1: eight tl.dot over K = BK/8 each, nibble i of every word against x's columns
        k0 + 8r + i, so the words keep their own layout (where BK >= 128; the reshape below that)."""
        pk, offs_m, offs_n, mask_m, mask_n = _tile_coords(M, N, BM, BN)
        offs_r = tl.arange(0, BK // 8)
        offs_k = tl.arange(0, BK)
        i4 = tl.arange(0, 8) * 4
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pk * KS
        k_hi = tl.minimum(k_lo + KS, K)
        for k0 in range(k_lo, k_hi, BK):
            rows = k0 // 8 + offs_r
            qw = tl.load(qw_ptr + rows[:, None] * sqw + offs_n[None, :],
                         mask=(rows[:, None] < K // 8) & mask_n[None, :], other=0)  # [BK/8, BN]
            g = k0 // G
            z = tl.load(z_ptr + g * szg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if NIBBLE_DOTS and BK >= 128:  # tl.dot wants K >= 16
                for i in tl.static_range(8):
                    ks = k0 + offs_r * 8 + i  # [BK/8]: nibble i of every word
                    q = ((qw >> (4 * i)) & 0xF).to(tl.float32)
                    acc = _dequant_dot(acc, x_ptr, offs_m, sxm, ks, mask_m[:, None] & (ks < K)[None, :], q, z, sc)
            else:
                q = tl.reshape((qw[:, None, :] >> i4[None, :, None]) & 0xF, (BK, BN)).to(tl.float32)
                ks = k0 + offs_k
                acc = _dequant_dot(acc, x_ptr, offs_m, sxm, ks, mask_m[:, None] & (ks < K)[None, :], q, z, sc)
        _store_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, som, N, SPLIT_K)

    @triton.jit
    def _kpack_dequant_kernel(qw_ptr, z_ptr, s_ptr, w_ptr, N, K, G, sqw, szg, ssg, swk,
                              BR: tl.constexpr, BN: tl.constexpr):
        """The K-packed weight to a dense W^T [K, N] in the output's dtype, BR word rows (8 BR input rows)
        by BN columns per program."""
        pr = tl.program_id(0)
        pn = tl.program_id(1)
        rows = pr * BR + tl.arange(0, BR)
        offs_n = pn * BN + tl.arange(0, BN)
        mask = (rows[:, None] < K // 8) & (offs_n < N)[None, :]
        qw = tl.load(qw_ptr + rows[:, None] * sqw + offs_n[None, :], mask=mask, other=0)  # [BR, BN]
        for i in tl.static_range(8):
            k = rows * 8 + i
            g = k // G
            z = tl.load(z_ptr + g[:, None] * szg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(s_ptr + g[:, None] * ssg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            q = ((qw >> (4 * i)) & 0xF).to(tl.float32)
            tl.store(w_ptr + k[:, None] * swk + offs_n[None, :], ((q - z) * sc).to(w_ptr.dtype.element_ty),
                     mask=mask)


def pick_config(M: int, N: int, K: int, G: int, sms: int) -> Tuple[int, int, int, int]:
    """(BM, BN, BK, split_k) of the tiled kernels: tiles of 16 to 64 rows."""
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN, BK = 64, min(128, G)
    return BM, BN, BK, _split_for(-(-M // BM) * -(-N // BN), -(-K // BK), sms)


KPACK_NIBBLE_DOTS = 0  # _kpack_kernel's form for M > 1 (1 is untried on a GPU yet; bench/awq_gpu.py compares)


def _tiled(kernel, x, qw, z, scales, split_k, block_n, block_k, K, N, G, **extra):
    M = x.shape[0]
    BM, BN, BK, split = pick_config(M, N, K, G, _sm_count(x.device))
    BN, BK, split = block_n or BN, block_k or BK, split_k or split
    if G % BK or K % BK:
        raise ValueError(f"W4A16 matmul: group size {G} and K {K} must be multiples of the K tile {BK}")
    if N % 8 or BN % 8:
        raise ValueError(f"W4A16 matmul: N {N} and the N tile {BN} must be multiples of 8")
    KS = -(-K // (split * BK)) * BK  # each split's share of K, whole tiles
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
    ws, cnt = _workspace(x.device, M * N, grid[0] * grid[1]) if split > 1 else (out, out)
    kernel[grid](x, qw, z, scales, out, ws, cnt, M, N, K, G, KS, x.stride(0), qw.stride(0), z.stride(0),
                 scales.stride(0), out.stride(0), BM=BM, BN=BN, BK=BK, SPLIT_K=split, **extra)
    return out


def _check(x: torch.Tensor) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("W4A16 matmul: triton is not installed")
    return x if x.stride(1) == 1 else x.contiguous()


# (K, N, group size) of products whose input runs faster made by its own kernel than inside the product's:
# SiLU(gate) * up by silu_mul (UNGATED), RMSNorm(x + residual) * weight by add_rmsnorm (UNNORMED); the tuner
# times both ways for the model's shapes (awq_tune.tune_inputs)
UNGATED: Set[Tuple[int, int, int]] = set()
UNNORMED: Set[Tuple[int, int, int]] = set()


def _plain(x: torch.Tensor, gated: bool, norm: Optional[Norm]) -> torch.Tensor:
    """The product's input made by a kernel of its own, for a product that takes x as it is: SiLU(gate) * up
    (silu_mul), or RMSNorm(x + residual) * weight (add_rmsnorm; the residual sum copied into norm.res)."""
    from . import gpu_fused
    x_input(x, gated, norm)  # the same checks
    if gated:
        return gpu_fused.silu_mul(x)
    if norm is None:
        return x
    h, res = gpu_fused.norm_residual(x, norm.residual, norm.weight, norm.eps)
    if norm.residual is not None:
        norm.res.copy_(res)
    return h


def _inputs(x: torch.Tensor, scales: torch.Tensor, gated: bool, norm: Optional[Norm]):
    """-> (x, gated, norm, K, N, G) for the kernels: x with a contiguous last dimension, its input made apart
    first where the tuner found that faster for this shape, and the product's shape and group size."""
    x = _check(x)
    K, N = gated_k(x, gated), scales.shape[1]
    G = K // scales.shape[0]
    if (gated and (K, N, G) in UNGATED) or (norm is not None and (K, N, G) in UNNORMED):
        return _plain(x, gated, norm), False, None, K, N, G
    return x, gated, norm, K, N, G


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               split_k: int = 0, block_n: int = 0, block_k: int = 0, gated: bool = False,
               norm: Optional[Norm] = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype over AutoAWQ's layout. ``split_k``, ``block_n``, ``block_k``: 0 picks
    from the shape. Unless a tile is asked for: float16 runs the tensor-core kernel (awq_tc.py), but one row
    only where the tuner picked it for this shape; other one-row products go to awq_gemv.
    ``gated``: x is [M, 2K], the MLP's fused gate/up output, and the product's input is SiLU(gate) * up;
    ``norm``: the input is RMSNorm(x + residual) * weight, the residual sum written to norm.res. The one-row
    and tensor-core kernels make these as they load x (awq_input.py), the others (and shapes in UNGATED /
    UNNORMED) after a kernel of their own."""
    x, gated, norm, K, N, G = _inputs(x, scales, gated, norm)
    if not (split_k or block_n or block_k):
        if x.dtype == torch.float16 and (x.shape[0] > 1 or (K, N, G) in awq_tc.TC_TILES):
            return awq_tc.awq_tc_matmul(x, qweight, qzeros, scales, gated=gated, norm=norm)
        if x.shape[0] == 1:
            return awq_gemv(x, qweight, qzeros, scales, gated=gated, norm=norm)
    x = _plain(x, gated, norm)
    return _tiled(_awq_kernel, x, qweight, qzeros, scales, split_k, block_n, block_k, K, N, G)


def kpack_dequantize(qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """The K-packed weight as a dense W^T [K, N] in ``dtype`` (one kernel; awq_torch.dequantize_kpack is its
    oracle)."""
    if not HAVE_TRITON:
        raise RuntimeError("W4A16 dequantize: triton is not installed")
    K, N = qweight_k.shape[0] * 8, qweight_k.shape[1]
    w = torch.empty(K, N, device=qweight_k.device, dtype=dtype)
    BR, BN = 16, 128
    _kpack_dequant_kernel[(triton.cdiv(K // 8, BR), triton.cdiv(N, BN))](
        qweight_k, zeros, scales, w, N, K, K // scales.shape[0], qweight_k.stride(0), zeros.stride(0),
        scales.stride(0), w.stride(0), BR=BR, BN=BN)
    return w


# From this many rows on (prefill), dequantize the weight and let cuBLAS multiply: the tiled kernels run
# below cuBLAS already at 64 rows (docs/benchmarks.md), and the dequantization's cost is the weight's size,
# whatever M is. vLLM's AWQ path switches at 256 rows too.
DEQUANT_MIN_ROWS = 256


def kpack_matmul(x: torch.Tensor, qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 split_k: int = 0, block_n: int = 0, block_k: int = 0, nibble_dots: int = -1,
                 gated: bool = False, norm: Optional[Norm] = None) -> torch.Tensor:
    """awq_matmul over the K-packed layout (repack_kpack); ``nibble_dots`` -1: KPACK_NIBBLE_DOTS (used where
    the K tile is 128 or more). Unless a tile or form is asked for: one row runs the tuned one-row kernel
    (the tensor-core one where the tuner found it faster for this shape, else kpack_gemv); from
    DEQUANT_MIN_ROWS rows on the weight is dequantized and multiplied by torch; float16 between runs on
    tensor cores (awq_tc.kpack_tc_matmul). ``gated``, ``norm``: as awq_matmul's."""
    x, gated, norm, K, N, G = _inputs(x, scales, gated, norm)
    if not (split_k or block_n or block_k or nibble_dots >= 0):
        if x.shape[0] == 1:
            tc = awq_tc.KPACK_TC_TILES.get((K, N, G)) if x.dtype == torch.float16 else None
            return (awq_tc.kpack_tc_matmul(x, qweight_k, zeros, scales, tc, gated=gated, norm=norm) if tc
                    else kpack_gemv(x, qweight_k, zeros, scales, gated=gated, norm=norm))
        if x.shape[0] >= DEQUANT_MIN_ROWS:
            return _plain(x, gated, norm) @ kpack_dequantize(qweight_k, zeros, scales, x.dtype)
        if x.dtype == torch.float16:
            return awq_tc.kpack_tc_matmul(x, qweight_k, zeros, scales, gated=gated, norm=norm)
    x = _plain(x, gated, norm)
    return _tiled(_kpack_kernel, x, qweight_k, zeros, scales, split_k, block_n, block_k, K, N, G,
                  NIBBLE_DOTS=KPACK_NIBBLE_DOTS if nibble_dots < 0 else nibble_dots)
