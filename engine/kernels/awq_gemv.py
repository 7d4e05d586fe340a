"""The W4A16 one-row (decode) kernels in Triton, x [1, K] @ W [K, N], over both layouts (awq_triton.py's
docstring describes them); the oracle is awq_torch.awq_matmul_reference.

- AutoAWQ's layout (``awq_gemv``): the words as they lie with their 8 nibbles as a third dimension, whole
  groups per program, a fixed tile.
- K-packed (``kpack_gemv``): a thread's word meets 8 consecutive x values and adds into its own column. Its
  ``GemvTile`` (columns and K rows per program, steps, unrolling, forms) is picked per layer shape on the
  device at load by kernels/awq_tune.py.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .awq_common import HAVE_TRITON, _workspace
from .awq_input import Norm, x_input

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .awq_common import _columns8, _store_out
    from .awq_input import _load_x, _row_input

    @triton.jit
    def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, sqk, szg, ssg,
                         UP, r_ptr, nw_ptr, res_ptr, eps,
                         BP: tl.constexpr, G: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
                         XMODE: tl.constexpr):
        """One row of x over AutoAWQ's layout, GROUPS whole groups per program (unrolled, so every group's
        words are asked for before the first is used). Inside a group the scale and zero are constant per
        column: sum_k x_k (q_kc - z_c) s_c = s_c (sum_k x_k q_kc - z_c sum_k x_k). XMODE: how the input is
        made from x (awq_input.py)."""
        pp = tl.program_id(0)
        pk = tl.program_id(1)
        rstd = _row_input(x_ptr, r_ptr, res_ptr, K, eps, (pp == 0) & (pk == 0), XMODE)
        offs_p = pp * BP + tl.arange(0, BP)
        offs_g = tl.arange(0, G)
        j = tl.arange(0, 8)
        shifts = j * 4  # nibble j of a word holds column 8p + [0, 2, 4, 6, 1, 3, 5, 7][j] (AutoAWQ's order)
        cols = offs_p[:, None] * 8 + ((j % 4) * 2 + j // 4)[None, :]  # [BP, 8]
        mask_p = offs_p < N // 8
        acc = tl.zeros((BP, 8), dtype=tl.float32)
        for gi in tl.static_range(GROUPS):
            g = pk * GROUPS + gi
            ks = g * G + offs_g
            kmask = ks < K
            qw = tl.load(qw_ptr + ks[:, None] * sqk + offs_p[None, :], mask=kmask[:, None] & mask_p[None, :],
                         other=0)  # [G, BP]
            x = _load_x(x_ptr, ks, ks, kmask, UP, r_ptr, nw_ptr, rstd, XMODE).to(tl.float32)  # [G]
            # nibble -> exact float: 2^23 + q by OR-ing q into 2^23's mantissa, less 2^23
            q = (((qw[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            d = tl.sum((q - 8388608.0) * x[:, None, None], axis=0)  # [BP, 8]
            gmask = mask_p & ((offs_p * 0 + g * G) < K)  # a group past K (the last split's unroll)
            qz = tl.load(qz_ptr + g * szg + offs_p, mask=gmask, other=0)
            z = ((qz[:, None] >> shifts[None, :]) & 0xF).to(tl.float32)
            sc = tl.load(s_ptr + g * ssg + cols, mask=gmask[:, None], other=0.0).to(tl.float32)
            acc += sc * (d - z * tl.sum(x, axis=0))
        _store_out(acc, out_ptr + cols, ws_ptr + cols, mask_p[:, None], cnt_ptr, pp, SPLIT_K)

    @triton.jit
    def _nibble_bits(qw, i: tl.constexpr, MAGIC: tl.constexpr):
        """Nibble i of every word as a float32: MAGIC 0: 2^23 + q (q OR-ed into 2^23's mantissa); MAGIC 1:
        1 + q/16 (q moved to the top mantissa bits of 1.0: a shift and one AND-OR, no subtraction; the sum
        over 1 + q/16 then leaves 16 x Sum x, not 2^23 x Sum x, to cancel against the zero's term)."""
        if MAGIC:
            if 4 * i <= 19:
                b = qw << (19 - 4 * i)
            else:
                b = qw >> (4 * i - 19)
            return ((b & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        return (((qw >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble_mul(qw, i: tl.constexpr, xi, MAGIC: tl.constexpr):
        """Nibble i of each word [R, BN] times xi [R] (less 2^23 in the exact form); added up, the compiler
        fuses the adds into FMAs."""
        if MAGIC:
            return _nibble_bits(qw, i, MAGIC) * xi[:, None]
        return (_nibble_bits(qw, i, MAGIC) - 8388608.0) * xi[:, None]

    @triton.jit
    def _kpack_gemv_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, ITERS, sqw, szg, ssg,
                           UP, r_ptr, nw_ptr, res_ptr, eps,
                           BN: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr, UNROLL: tl.constexpr,
                           SPLIT_K: tl.constexpr, NIBBLE_LOOP: tl.constexpr, MAGIC: tl.constexpr,
                           XMODE: tl.constexpr):
        """One row of x over the K-packed layout. A program takes BN columns and ITERS x UNROLL steps of STEP
        input rows (STEP divides G, so a step lies in one group; the UNROLL steps of an iteration are unrolled,
        so all their words are asked for before the first is used). Each word's 8 nibbles meet 8 consecutive
        x values inside its thread; zero and scale apply once per word row and step:
        sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k).
        NIBBLE_LOOP 0: the nibbles as a third dimension [STEP/8, 8, BN] summed over; 1: a loop over the 8
        nibbles, each [STEP/8, BN] in the words' own layout, into one sum (no third dimension in registers),
        x loaded per nibble; 2: the same sum, x loaded once per step as [STEP/8, 8] and split into its 8
        columns.
        MAGIC 1 (with the loop) sums (1 + q/16) x, since
        sum_k x_k (q_k - z) = 16 sum_k x_k (1 + q_k/16) - (16 + z) sum_k x_k.
        XMODE: how the input is made from x (awq_input.py)."""
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rstd = _row_input(x_ptr, r_ptr, res_ptr, K, eps, (pn == 0) & (pk == 0), XMODE)
        offs_n = pn * BN + tl.arange(0, BN)
        offs_r = tl.arange(0, STEP // 8)
        i8 = tl.arange(0, 8)
        mask_n = offs_n < N
        acc = tl.zeros((STEP // 8, BN), dtype=tl.float32)
        for it in range(ITERS):
            for u in tl.static_range(UNROLL):
                k0 = ((pk * ITERS + it) * UNROLL + u) * STEP
                rows = k0 // 8 + offs_r
                rmask = rows < K // 8
                qw = tl.load(qw_ptr + rows[:, None] * sqw + offs_n[None, :], mask=rmask[:, None] & mask_n[None, :],
                             other=0, eviction_policy="evict_first")  # [STEP/8, BN]
                if NIBBLE_LOOP == 2:
                    xo = rows[:, None] * 8 + i8[None, :]
                    x = _load_x(x_ptr, xo, xo, rmask[:, None], UP, r_ptr, nw_ptr, rstd, XMODE).to(tl.float32)
                    xsum = tl.sum(x, axis=1)
                    x0, x1, x2, x3, x4, x5, x6, x7 = _columns8(x)
                    t = _nibble_mul(qw, 0, x0, MAGIC) + _nibble_mul(qw, 1, x1, MAGIC)
                    t += _nibble_mul(qw, 2, x2, MAGIC)
                    t += _nibble_mul(qw, 3, x3, MAGIC)
                    t += _nibble_mul(qw, 4, x4, MAGIC)
                    t += _nibble_mul(qw, 5, x5, MAGIC)
                    t += _nibble_mul(qw, 6, x6, MAGIC)
                    t += _nibble_mul(qw, 7, x7, MAGIC)
                elif NIBBLE_LOOP:
                    t = tl.zeros((STEP // 8, BN), dtype=tl.float32)
                    xsum = tl.zeros((STEP // 8,), dtype=tl.float32)
                    for i in tl.static_range(8):
                        xo = rows * 8 + i
                        xi = _load_x(x_ptr, xo, xo, rmask, UP, r_ptr, nw_ptr, rstd, XMODE).to(tl.float32)  # [STEP/8]
                        t += _nibble_mul(qw, i, xi, MAGIC)
                        xsum += xi
                else:
                    xo = rows[:, None] * 8 + i8[None, :]
                    x = _load_x(x_ptr, xo, xo, rmask[:, None], UP, r_ptr, nw_ptr, rstd, XMODE).to(tl.float32)
                    q = (((qw[:, None, :] >> (i8 * 4)[None, :, None]) & 0xF) | 0x4B000000).to(tl.float32,
                                                                                             bitcast=True)
                    t = tl.sum((q - 8388608.0) * x[:, :, None], axis=1)  # [STEP/8, BN]: each word's 8 rows
                    xsum = tl.sum(x, axis=1)
                g = k0 // G
                gmask = mask_n & ((offs_n * 0 + k0) < K)  # a step past K (the last program's unroll)
                z = tl.load(z_ptr + g * szg + offs_n, mask=gmask, other=0.0).to(tl.float32)
                sc = tl.load(s_ptr + g * ssg + offs_n, mask=gmask, other=0.0).to(tl.float32)
                if MAGIC and NIBBLE_LOOP:  # per column once: 16 s and -(16 + z) s; then two FMAs a word
                    c1, c2 = sc * 16.0, -(z + 16.0) * sc
                else:
                    c1, c2 = sc, -z * sc
                acc += c1[None, :] * t
                acc += c2[None, :] * xsum[:, None]
        _store_out(tl.sum(acc, axis=0), out_ptr + offs_n, ws_ptr + offs_n, mask_n, cnt_ptr, pn, SPLIT_K)


# AutoAWQ's layout: (packed columns, K rows per program (whole groups), warps), the fastest of those tried on
# an H200 (docs/benchmarks.md)
GEMV_TILE = (8, 512, 4)


class GemvTile(NamedTuple):
    """The K-packed one-row kernel's form: ``block_n`` columns and ``block_k`` input rows per program (0: all
    of K, no split), ``warps``, ``nibble_loop`` and ``magic`` (the kernel's forms), ``step`` input rows per
    unrolled step (a divisor of the group size; 0: the group size, capped at block_k) and ``unroll`` steps
    per loop iteration."""
    block_n: int
    block_k: int
    warps: int
    nibble_loop: int = 0
    step: int = 0
    unroll: int = 0  # 0: the whole program's K in one iteration
    magic: int = 0


KPACK_GEMV_TILE = GemvTile(256, 128, 4, 0)  # the fastest on an H200 of those timed (docs/benchmarks.md)
# (K, N, group size, x dtype) -> the tile picked for that shape on this device (kernels/awq_tune.py)
KPACK_GEMV_TILES: Dict[Tuple[int, int, int, torch.dtype], GemvTile] = {}


def _groups(block_k: int, G: int) -> int:
    if block_k % G:
        raise ValueError(f"W4A16 one-row kernel: K rows per program ({block_k}) must be whole groups of {G}")
    return block_k // G


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             block_p: int = 0, block_k: int = 0, num_warps: int = 0, gated: bool = False,
             norm: Optional[Norm] = None) -> torch.Tensor:
    """x [1, K] -> [1, N] over AutoAWQ's layout: ``block_p`` packed columns and ``block_k`` rows (whole
    groups) per program; 0 takes GEMV_TILE's (rows capped at K). ``gated``: x is [1, 2K], a fused gate/up
    output, and the product's input SiLU(gate) * up; ``norm``: the input is RMSNorm(x + residual) * weight
    (awq_input.py)."""
    K, xmode, xargs = x_input(x, gated, norm)
    N, G = scales.shape[1], K // scales.shape[0]
    BP, BK, warps = block_p or GEMV_TILE[0], block_k or max(G, min(GEMV_TILE[1], K) // G * G), num_warps or GEMV_TILE[2]
    groups = _groups(BK, G)
    grid = (triton.cdiv(N // 8, BP), -(-(K // G) // groups))
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    ws, cnt = _workspace(x.device, N, grid[0]) if grid[1] > 1 else (out, out)
    _awq_gemv_kernel[grid](x, qweight, qzeros, scales, out, ws, cnt, N, K, qweight.stride(0), qzeros.stride(0),
                           scales.stride(0), *xargs, BP=BP, G=G, GROUPS=groups, SPLIT_K=grid[1], XMODE=xmode,
                           num_warps=warps)
    return out


def gemv_plan(tile: GemvTile, K: int, N: int, G: int) -> Tuple[int, int, int, int, int]:
    """-> (step, unroll, iterations, split, programs over N) of ``tile`` at this shape; ValueError for a
    tile that does not fit it."""
    step = tile.step or min(G, tile.block_k or G)
    if G % step or step % 8:
        raise ValueError(f"W4A16 one-row kernel: step {step} must be a multiple of 8 dividing the group size {G}")
    steps = -(-K // step)
    if tile.block_k:  # K rows per program: whole steps, split into iterations of ``unroll`` steps
        if tile.block_k % step:
            raise ValueError(f"W4A16 one-row kernel: K rows per program ({tile.block_k}) must be whole steps "
                             f"of {step}")
        per, unroll = tile.block_k // step, tile.unroll or tile.block_k // step
        if per % unroll:
            raise ValueError(f"W4A16 one-row kernel: {per} steps per program do not split into {unroll}")
    else:  # all of K in one program, rounded up to whole iterations (the steps past K are masked)
        unroll = tile.unroll or steps
        per = -(-steps // unroll) * unroll
    return step, unroll, per // unroll, -(-steps // per), triton.cdiv(N, tile.block_n)


def nibble_form(tile: GemvTile, xmode: int) -> int:
    """The kernel's NIBBLE_LOOP for ``tile``: where the input is made as x is loaded (XMODE > 0) the nibble
    loop loads x once per step and splits it (form 2), so each x value is made once per thread, not once
    per nibble (statically 62-98 -> 33-57 instructions per word gated or normed over the candidates, within
    -9 to +12 of each tile's plain form; sm_90, bench/sass_gemv.py)."""
    return 2 if tile.nibble_loop == 1 and xmode else tile.nibble_loop


def kpack_gemv(x: torch.Tensor, qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               tile: Optional[GemvTile] = None, gated: bool = False, norm: Optional[Norm] = None) -> torch.Tensor:
    """x [1, K] -> [1, N] over the K-packed layout with ``tile``; None takes this shape's tuned tile, else
    KPACK_GEMV_TILE (its K rows capped at K). ``gated``, ``norm``: as awq_gemv's."""
    K, xmode, xargs = x_input(x, gated, norm)
    N, G = scales.shape[1], K // scales.shape[0]
    if tile is None:
        tile = KPACK_GEMV_TILES.get((K, N, G, x.dtype))
        if tile is None:
            t = KPACK_GEMV_TILE
            tile = t._replace(block_k=max(G, min(t.block_k or K, K) // G * G))
    step, unroll, iters, split, programs = gemv_plan(tile, K, N, G)
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    ws, cnt = _workspace(x.device, N, programs) if split > 1 else (out, out)
    _kpack_gemv_kernel[(programs, split)](
        x, qweight_k, zeros, scales, out, ws, cnt, N, K, iters, qweight_k.stride(0), zeros.stride(0),
        scales.stride(0), *xargs, BN=tile.block_n, G=G, STEP=step, UNROLL=unroll, SPLIT_K=split,
        NIBBLE_LOOP=nibble_form(tile, xmode), MAGIC=tile.magic, XMODE=xmode, num_warps=tile.warps)
    return out
