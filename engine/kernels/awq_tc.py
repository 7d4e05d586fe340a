"""W4A16 on tensor cores, float16, over AutoAWQ's layout and over the K-packed one: each weight tile is
made float16 two weights at a time and multiplied by ``tl.dot`` (x's rows padded to the 16 an MMA takes, so
one decode row costs the same as 16).

A word of AutoAWQ's qweight holds 8 columns of one input row in nibble order 0 2 4 6 1 3 5 7, so nibbles i
and i + 4 hold columns 2i and 2i + 1, and one shift and one AND-OR turn both into float16 at once (the
"magic number" conversion of FasterTransformer, TurboMind and Marlin). Two forms:

- exact (``fold`` 0): ``((w >> 4i) & 0x000F000F) | 0x64006400`` is 1024 + q; (1024 + q) - (1024 + z) = q - z
  is exact in float16, and one multiply by the scale gives the float16 value ``dequantize_awq(...,
  torch.float16)`` gives, so the dot's inputs are the float16 reference's;
- folded (``fold`` 1): the nibbles go to mantissa bits 6..9, 1 + q/16, straight into the dot (nothing else
  per weight), and each K tile's scale and zero apply per column after it,
  s (16 sum_k x_k (1 + q_k/16) - (16 + z) sum_k x_k) = s sum_k x_k (q_k - z).

Over the K-packed layout (a word holds 8 consecutive input rows of one column) nibbles i and i + 4 are
rows 8r + i and 8r + i + 4, made 1 + q/16 the same way and placed at their rows (folded form only).

Counted statically (bench/sass_gemv.py, sm_90, 128-256 columns x 128 K rows x 4 warps, split-K epilogue
included): 21-26 instructions per packed word folded over AutoAWQ's layout, 34 exact, 24-29 over the
K-packed layout, against 34-44 for the one-row FMA kernels and 49-88 for the tiled kernels that dequantize
in float32.

Split-K (small M: the whole GPU streams the weight) meets its partial sums inside the kernel as the other
W4A16 kernels do (awq_common._store_tile).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .awq_common import HAVE_TRITON, _sm_count, _split_for, _workspace
from .awq_input import Norm, x_input

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .awq_common import _awq_shift, _columns8, _store_tile, _tile_coords
    from .awq_input import _tile_input, _tile_x

    @triton.jit
    def _pairs(w, i: tl.constexpr):
        """Nibbles i and i + 4 of each word (columns 2i and 2i + 1) as float16 1024 + q: (low, high)."""
        v = ((w >> (4 * i)) & 0x000F000F) | 0x64006400
        return (v.to(tl.int16).to(tl.float16, bitcast=True),
                (v >> 16).to(tl.int16).to(tl.float16, bitcast=True))

    @triton.jit
    def _dequant(w, zw, sa, sb, i: tl.constexpr):
        """Columns 2i and 2i + 1 of each packed column, their scales sa and sb:
        ((1024 + q) - (1024 + z)) * s, float16."""
        q0, q1 = _pairs(w, i)
        z0, z1 = _pairs(zw, i)
        return (q0 - z0[None, :]) * sa[None, :], (q1 - z1[None, :]) * sb[None, :]

    @triton.jit
    def _unit_pairs(w, i: tl.constexpr):
        """Nibbles i and i + 4 of each word (AutoAWQ's layout: columns 2i and 2i + 1; K-packed: rows 8r + i
        and 8r + i + 4) as float16 1 + q/16: one shift puts both at mantissa bits 6..9 of their halves, one
        AND-OR makes them 1 + q/16 (exact)."""
        if i < 2:
            v = w << (6 - 4 * i)
        else:
            v = w >> (4 * i - 6)
        v = (v & 0x03C003C0) | 0x3C003C00
        return (v.to(tl.int16).to(tl.float16, bitcast=True),
                (v >> 16).to(tl.int16).to(tl.float16, bitcast=True))

    @triton.jit
    def _awq_tc_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KS,
                       sxm, sqk, szg, ssg, som, UP, r_ptr, nw_ptr, res_ptr, eps, G: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                       FOLD: tl.constexpr, XMODE: tl.constexpr, ROW1: tl.constexpr):
        """x [M, K] float16 @ the AutoAWQ weight -> [M, N]; a program takes BM rows, BN columns and K rows
        [pk KS, pk KS + KS) in tiles of BK (BK divides G: one group per tile). FOLD 0: each tile dequantized
        to float16 ((1024 + q) - (1024 + z)) * s, then one dot into the sum; FOLD 1: the dot takes the
        nibbles as 1 + q/16 (a shift and an AND-OR per two weights, nothing else), and each tile's scale
        and zero apply to its dot per column: s (16 t - (16 + z) sum_k x_k). XMODE: how the input is made
        from x (awq_input.py); ROW1: M is 1 and XMODE > 0 (the input made once per K tile, not for each
        padding row; x as it is loads faster as a masked tile)."""
        pk, offs_m, offs_n, mask_m, mask_n = _tile_coords(M, N, BM, BN)
        rstd = _tile_input(x_ptr, r_ptr, res_ptr, offs_m, mask_m, sxm, K, eps, (tl.program_id(0) == 0) & (pk == 0),
                           XMODE, ROW1)
        offs_p = tl.program_id(0) * (BN // 8) + tl.arange(0, BN // 8)  # packed columns
        offs_k = tl.arange(0, BK)
        mask_p = offs_p < N // 8
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pk * KS
        k_hi = tl.minimum(k_lo + KS, K)
        for k0 in range(k_lo, k_hi, BK):
            ks = k0 + offs_k
            w = tl.load(qw_ptr + ks[:, None] * sqk + offs_p[None, :], mask=mask_p[None, :], other=0,
                        eviction_policy="evict_first")  # [BK, BN/8]
            g = k0 // G
            if FOLD:
                c0, c1 = _unit_pairs(w, 0)
                c2, c3 = _unit_pairs(w, 1)
                c4, c5 = _unit_pairs(w, 2)
                c6, c7 = _unit_pairs(w, 3)
            else:
                zw = tl.load(qz_ptr + g * szg + offs_p, mask=mask_p, other=0)  # [BN/8]
                s8 = tl.load(s_ptr + g * ssg + offs_p[:, None] * 8 + tl.arange(0, 8)[None, :],
                             mask=mask_p[:, None], other=0.0)  # [BN/8, 8]
                s0, s1, s2, s3, s4, s5, s6, s7 = _columns8(s8)
                c0, c1 = _dequant(w, zw, s0, s1, 0)
                c2, c3 = _dequant(w, zw, s2, s3, 1)
                c4, c5 = _dequant(w, zw, s4, s5, 2)
                c6, c7 = _dequant(w, zw, s6, s7, 3)
            # [BK, BN/8, 2, 2, 2] -> columns 8p + 0..7 in order -> [BK, BN]
            t = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
            wt = tl.reshape(tl.permute(t, (0, 1, 4, 3, 2)), (BK, BN))
            x = _tile_x(x_ptr, offs_m, mask_m, ks, ks < K, sxm, UP, r_ptr, nw_ptr, rstd, XMODE, ROW1)
            if FOLD:
                d = tl.dot(x, wt)  # sum_k x (1 + q/16), float32
                zw = tl.load(qz_ptr + g * szg + offs_n // 8, mask=mask_n, other=0)
                z = ((zw >> _awq_shift(offs_n)) & 0xF).to(tl.float32)
                sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                xs = tl.sum(x.to(tl.float32), axis=1)  # [BM]
                acc += (sc * 16.0)[None, :] * d
                acc += (-(z + 16.0) * sc)[None, :] * xs[:, None]
            else:
                acc = tl.dot(x, wt, acc)
        _store_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, som, N, SPLIT_K)

    @triton.jit
    def _kpack_tc_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KS,
                         sxm, sqw, szg, ssg, som, UP, r_ptr, nw_ptr, res_ptr, eps, G: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                         XMODE: tl.constexpr, ROW1: tl.constexpr):
        """The folded form over the K-packed layout (word (r, n): rows 8r..8r+7 of column n): nibbles i and
        i + 4 are rows 8r + i and 8r + i + 4, two float16 1 + q/16 per shift and AND-OR as above, placed at
        their rows of the [BK, BN] tile; scale and zero (float16 [K/G, N]) apply per column after each dot.
        XMODE: as _awq_tc_kernel's."""
        pk, offs_m, offs_n, mask_m, mask_n = _tile_coords(M, N, BM, BN)
        rstd = _tile_input(x_ptr, r_ptr, res_ptr, offs_m, mask_m, sxm, K, eps, (tl.program_id(0) == 0) & (pk == 0),
                           XMODE, ROW1)
        offs_r = tl.arange(0, BK // 8)
        offs_k = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pk * KS
        k_hi = tl.minimum(k_lo + KS, K)
        for k0 in range(k_lo, k_hi, BK):
            rows = k0 // 8 + offs_r
            w = tl.load(qw_ptr + rows[:, None] * sqw + offs_n[None, :], mask=mask_n[None, :], other=0,
                        eviction_policy="evict_first")  # [BK/8, BN]
            c0, c4 = _unit_pairs(w, 0)
            c1, c5 = _unit_pairs(w, 1)
            c2, c6 = _unit_pairs(w, 2)
            c3, c7 = _unit_pairs(w, 3)
            # [BK/8, BN, 2, 2, 2] with nibble 4a + 2b + c -> [BK/8, 2, 2, 2, BN]: rows 8r + 0..7 -> [BK, BN]
            t = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
            wt = tl.reshape(tl.permute(t, (0, 2, 3, 4, 1)), (BK, BN))
            ks = k0 + offs_k
            x = _tile_x(x_ptr, offs_m, mask_m, ks, ks < K, sxm, UP, r_ptr, nw_ptr, rstd, XMODE, ROW1)
            d = tl.dot(x, wt)  # sum_k x (1 + q/16), float32
            g = k0 // G
            z = tl.load(z_ptr + g * szg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            xs = tl.sum(x.to(tl.float32), axis=1)  # [BM]
            acc += (sc * 16.0)[None, :] * d
            acc += (-(z + 16.0) * sc)[None, :] * xs[:, None]
        _store_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, som, N, SPLIT_K)


class TcTile(NamedTuple):
    """The tensor-core kernel's tile: ``block_n`` columns, ``block_k`` K rows per step (capped at the group
    size), ``warps``, ``split_k`` (0: split until the programs fill the device twice over), the form and
    the pipelining depth."""
    block_n: int
    block_k: int
    warps: int
    split_k: int = 0
    fold: int = 0  # 1: the dot takes 1 + q/16, scale and zero after it (_awq_tc_kernel's FOLD)
    stages: int = 0  # Triton's software pipelining depth of the K loop (0: Triton's default)


TC_TILE = TcTile(128, 128, 4, 0, 1)  # the fewest instructions per word in the static count; not yet timed
# (K, N, group size) -> the tile picked for one row on this device (kernels/awq_tune.py): over AutoAWQ's
# layout; over the K-packed one where it beats the FMA kernel there
TC_TILES: Dict[Tuple[int, int, int], TcTile] = {}
KPACK_TC_TILES: Dict[Tuple[int, int, int], TcTile] = {}


def tc_plan(tile: TcTile, M: int, K: int, N: int, G: int, sms: int) -> Tuple[int, int, int]:
    """-> (rows per program, K rows per step, split) of ``tile`` at this shape; ValueError where it does not
    fit."""
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BK = min(tile.block_k, G)
    if G % BK or K % BK or BK < 16:
        raise ValueError(f"W4A16 tensor-core matmul: K rows per step {BK} must divide the group size {G} and "
                         f"K {K}, and be 16 or more")
    if N % 8 or tile.block_n % 8:
        raise ValueError(f"W4A16 tensor-core matmul: N {N} and the N tile {tile.block_n} must be multiples of 8")
    split = tile.split_k or _split_for(-(-M // BM) * -(-N // tile.block_n), K // BK, sms)
    return BM, BK, split


def _launch(kernel, tuned: Dict[Tuple[int, int, int], TcTile], x: torch.Tensor, qweight: torch.Tensor,
            zeros: torch.Tensor, scales: torch.Tensor, tile: Optional[TcTile], forms: bool,
            gated: bool, norm: Optional[Norm]) -> torch.Tensor:
    """One tensor-core product: checks, the tile (``tile``, else ``tuned``'s for one row, else TC_TILE), the
    split and its workspace, the launch (``forms``: the kernel takes the tile's FOLD; ``gated``, ``norm``:
    how the input is made from x, awq_input.py)."""
    if not HAVE_TRITON:
        raise RuntimeError("W4A16 matmul: triton is not installed")
    if x.dtype != torch.float16:
        raise ValueError(f"W4A16 tensor-core matmul: x must be float16, not {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    K, xmode, xargs = x_input(x, gated, norm)
    M, N = x.shape[0], scales.shape[1]
    G = K // scales.shape[0]
    tile = tile or (tuned.get((K, N, G)) if M == 1 else None) or TC_TILE
    BM, BK, split = tc_plan(tile, M, K, N, G, _sm_count(x.device))
    KS = -(-K // (split * BK)) * BK  # each split's share of K, whole steps
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, tile.block_n), triton.cdiv(M, BM), -(-K // KS))
    ws, cnt = _workspace(x.device, M * N, grid[0] * grid[1]) if grid[2] > 1 else (out, out)
    kernel[grid](x, qweight, zeros, scales, out, ws, cnt, M, N, K, KS, x.stride(0), qweight.stride(0),
                 zeros.stride(0), scales.stride(0), out.stride(0), *xargs, G=G, BM=BM, BN=tile.block_n,
                 BK=BK, SPLIT_K=grid[2], XMODE=xmode, ROW1=M == 1 and xmode > 0, num_warps=tile.warps,
                 **({"num_stages": tile.stages} if tile.stages else {}),
                 **({"FOLD": tile.fold} if forms else {}))
    return out


def awq_tc_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  tile: Optional[TcTile] = None, gated: bool = False, norm: Optional[Norm] = None) -> torch.Tensor:
    """x [M, K] float16 -> [M, N] float16 over AutoAWQ's layout on tensor cores; ``tile`` None takes the
    shape's tuned tile for one row, else TC_TILE; ``gated``: x is [M, 2K], fused gate/up outputs, and the
    product's input SiLU(gate) * up; ``norm``: the input is RMSNorm(x + residual) * weight (awq_input.py)."""
    return _launch(_awq_tc_kernel if HAVE_TRITON else None, TC_TILES, x, qweight, qzeros, scales, tile, True, gated,
                   norm)


def kpack_tc_matmul(x: torch.Tensor, qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                    tile: Optional[TcTile] = None, gated: bool = False, norm: Optional[Norm] = None) -> torch.Tensor:
    """x [M, K] float16 -> [M, N] float16 over the K-packed layout on tensor cores (always the folded form);
    ``tile`` None takes the shape's tuned tile for one row, else TC_TILE; ``gated``, ``norm`` as
    awq_tc_matmul's."""
    return _launch(_kpack_tc_kernel if HAVE_TRITON else None, KPACK_TC_TILES, x, qweight_k, zeros, scales, tile,
                   False, gated, norm)
