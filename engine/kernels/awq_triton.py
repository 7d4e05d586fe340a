"""W4A16 matmul in Triton: x [M, K] @ W [K, N] with W dequantized inside the kernel (never materialized), over
two layouts. The oracle is awq_torch.awq_matmul_reference.

- AutoAWQ's GEMM layout as loaded (``awq_matmul``): qweight int32 [K, N/8], a word holds 8 output columns
  of one input row. M > 1: tiles spread each word over its columns (tl.interleave) into tl.dot; M = 1:
  the words as they lie with their 8 nibbles as a third dimension, whole groups per program.
- K-packed (``kpack_matmul``, made once at load by ``repack_kpack``, as TurboMind converts AWQ weights to
  its own layout): qweight_k int32 [K/8, N], word (r, n) holds rows 8r..8r+7 of column n in nibbles 0..7;
  zeros float16 [K/G, N]. A thread's word meets 8 consecutive x values and adds into its own column, so
  consecutive threads read consecutive columns and nothing is reduced across threads inside a group.
  Its one-row kernel takes a ``GemvTile`` (columns and K rows per program, steps, unrolling, forms), picked
  per layer shape on the device at load by kernels/awq_tune.py.

Split-K (small M: the whole GPU streams the weight) meets the partial sums in a float32 workspace by atomic
adds; the last program of each output tile (a per-tile counter says which) takes the sum, writes the output
and zeroes the workspace behind it: one launch, no memset or reduction kernels, so it suits CUDA graphs.
The workspace and counters are allocated zeroed once per device and left zeroed.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    HAVE_TRITON = False

if HAVE_TRITON:
    @triton.jit
    def _split_k_finish(acc, ws_ptrs, out_ptrs, omask, cnt_ptr, tile, SPLIT_K: tl.constexpr):
        """Add this program's partial sums into the workspace; the tile's last program takes the total,
        writes it out and leaves the workspace and the tile's counter zeroed."""
        tl.atomic_add(ws_ptrs, acc, mask=omask)
        tl.debug_barrier()  # every thread's adds are in before the tile's counter moves
        done = tl.atomic_add(cnt_ptr + tile, 1)
        if done == SPLIT_K - 1:
            zero = tl.zeros_like(acc)
            total = tl.atomic_add(ws_ptrs, zero, mask=omask)  # an atomic read, from L2
            tl.store(ws_ptrs, zero, mask=omask)
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=omask)
            tl.store(cnt_ptr + tile, 0)

    @triton.jit
    def _store_out(acc, out_ptrs, ws_ptrs, omask, cnt_ptr, tile, SPLIT_K: tl.constexpr):
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=omask)
        else:
            _split_k_finish(acc, ws_ptrs, out_ptrs, omask, cnt_ptr, tile, SPLIT_K)

    @triton.jit
    def _dequant_dot(acc, x_ptr, offs_m, sxm, ks, xmask, q, z, sc):
        """acc + x[offs_m, ks] @ ((q - z) * sc): one dequantized [len(ks), BN] tile into the tiled kernels' sum."""
        x = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :], mask=xmask, other=0.0)
        return acc + tl.dot(x, ((q - z[None, :]) * sc[None, :]).to(x.dtype))

    @triton.jit
    def _tile_coords(M, N, BM: tl.constexpr, BN: tl.constexpr):
        """A tiled product's program: (its K split, rows, columns, their masks), over grid (N tiles, M tiles,
        splits)."""
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        return tl.program_id(2), offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def _store_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, mask_m, mask_n, som, N, SPLIT_K: tl.constexpr):
        """The tiled kernels' [BM, BN] output tile (through the split-K workspace when split; the tile's
        counter is its (M tile, N tile) program's of grid (N tiles, M tiles, splits))."""
        _store_out(acc, out_ptr + offs_m[:, None] * som + offs_n[None, :],
                   ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :], cnt_ptr,
                   tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), SPLIT_K)

    @triton.jit
    def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, G, KS,
                    sxm, sqk, szg, ssg, som,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        pk, offs_m, offs_n, mask_m, mask_n = _tile_coords(M, N, BM, BN)
        offs_p = tl.program_id(0) * (BN // 8) + tl.arange(0, BN // 8)  # packed columns
        offs_k = tl.arange(0, BK)
        mask_p = offs_p < N // 8
        # column n sits in nibble order [0, 4, 1, 5, 2, 6, 3, 7] of its word (AutoAWQ's packing)
        j = offs_n % 8
        shifts = ((j // 2) + (j % 2) * 4) * 4  # [BN]
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
    def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, sqk, szg, ssg,
                         BP: tl.constexpr, G: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr):
        """One row of x over AutoAWQ's layout, GROUPS whole groups per program (unrolled, so every group's
        words are asked for before the first is used). Inside a group the scale and zero are constant per
        column: sum_k x_k (q_kc - z_c) s_c = s_c (sum_k x_k q_kc - z_c sum_k x_k)."""
        pp = tl.program_id(0)
        pk = tl.program_id(1)
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
            x = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)  # [G]
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
                           BN: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr, UNROLL: tl.constexpr,
                           SPLIT_K: tl.constexpr, NIBBLE_LOOP: tl.constexpr, MAGIC: tl.constexpr):
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
        sum_k x_k (q_k - z) = 16 sum_k x_k (1 + q_k/16) - (16 + z) sum_k x_k."""
        pn = tl.program_id(0)
        pk = tl.program_id(1)
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
                    x = tl.load(x_ptr + rows[:, None] * 8 + i8[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
                    xsum = tl.sum(x, axis=1)
                    ev, od = tl.split(tl.reshape(x, (STEP // 8, 4, 2)))  # x values 0 2 4 6 | 1 3 5 7 of each row
                    e0, e1 = tl.split(tl.reshape(ev, (STEP // 8, 2, 2)))  # 0 4 | 2 6
                    o0, o1 = tl.split(tl.reshape(od, (STEP // 8, 2, 2)))  # 1 5 | 3 7
                    x0, x4 = tl.split(e0)
                    x2, x6 = tl.split(e1)
                    x1, x5 = tl.split(o0)
                    x3, x7 = tl.split(o1)
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
                        xi = tl.load(x_ptr + rows * 8 + i, mask=rmask, other=0.0).to(tl.float32)  # [STEP/8]
                        t += _nibble_mul(qw, i, xi, MAGIC)
                        xsum += xi
                else:
                    x = tl.load(x_ptr + rows[:, None] * 8 + i8[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
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


_SMS: Dict[str, int] = {}
_WORKSPACE: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def _sm_count(device: torch.device) -> int:
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _SMS[key]


def _workspace(device: torch.device, elems: int, tiles: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums and int32 tile counters, grown on demand; the kernel leaves them zeroed.

    CUDA graphs keep the addresses they captured, so the first allocation on a GPU is generous (32 MiB of
    sums, 64 Ki counters; K is split only while a product has fewer than 2 tiles per SM, so a split product
    has at most 264 x 64 x 256 outputs on a 132-SM GPU) and growing during a capture is refused: a
    reallocation would leave earlier graphs reading freed memory."""
    key = str(device)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < elems or cnt.numel() < tiles:
        if ws is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"W4A16 split-K workspace ({ws.numel()} sums, {cnt.numel()} counters) is too small "
                               f"for {elems} sums and {tiles} counters inside a CUDA graph capture")
        big = device.type == "cuda"
        n = max(elems, ws.numel() if ws is not None else 0, 1 << (23 if big else 16))
        t = max(tiles, cnt.numel() if cnt is not None else 0, 1 << (16 if big else 10))
        ws, cnt = torch.zeros(n, dtype=torch.float32, device=device), torch.zeros(t, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def _split_for(tiles: int, k_tiles: int, sms: int) -> int:
    """Split K until the programs fill the device twice over, each keeping at least two K tiles."""
    split = 1
    while tiles * split < 2 * sms and split < 16 and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


def pick_config(M: int, N: int, K: int, G: int, sms: int) -> Tuple[int, int, int, int]:
    """(BM, BN, BK, split_k) of the tiled kernels: tiles of 16 to 64 rows."""
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN, BK = 64, min(128, G)
    return BM, BN, BK, _split_for(-(-M // BM) * -(-N // BN), -(-K // BK), sms)


# One-row tiles, the fastest of those tried on an H200 (docs/benchmarks.md): AutoAWQ layout (packed columns,
# K rows per program, warps); K-packed (columns, K rows per program, warps). K rows are whole groups.
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
             block_p: int = 0, block_k: int = 0, num_warps: int = 0) -> torch.Tensor:
    """x [1, K] -> [1, N] over AutoAWQ's layout: ``block_p`` packed columns and ``block_k`` rows (whole
    groups) per program; 0 takes GEMV_TILE's (rows capped at K)."""
    K, N, G = x.shape[1], scales.shape[1], x.shape[1] // scales.shape[0]
    BP, BK, warps = block_p or GEMV_TILE[0], block_k or max(G, min(GEMV_TILE[1], K) // G * G), num_warps or GEMV_TILE[2]
    groups = _groups(BK, G)
    grid = (triton.cdiv(N // 8, BP), -(-(K // G) // groups))
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    ws, cnt = _workspace(x.device, N, grid[0]) if grid[1] > 1 else (out, out)
    _awq_gemv_kernel[grid](x, qweight, qzeros, scales, out, ws, cnt, N, K, qweight.stride(0), qzeros.stride(0),
                           scales.stride(0), BP=BP, G=G, GROUPS=groups, SPLIT_K=grid[1], num_warps=warps)
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


def kpack_gemv(x: torch.Tensor, qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               tile: Optional[GemvTile] = None) -> torch.Tensor:
    """x [1, K] -> [1, N] over the K-packed layout with ``tile``; None takes this shape's tuned tile, else
    KPACK_GEMV_TILE (its K rows capped at K)."""
    K, N, G = x.shape[1], scales.shape[1], x.shape[1] // scales.shape[0]
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
        scales.stride(0), BN=tile.block_n, G=G, STEP=step, UNROLL=unroll, SPLIT_K=split,
        NIBBLE_LOOP=tile.nibble_loop, MAGIC=tile.magic, num_warps=tile.warps)
    return out


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


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               split_k: int = 0, block_n: int = 0, block_k: int = 0) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype over AutoAWQ's layout. ``split_k``, ``block_n``, ``block_k``: 0 picks
    from the shape. Unless a tile is asked for: float16 runs the tensor-core kernel (awq_tc.py), but one row
    only where the tuner picked it for this shape; other one-row products go to awq_gemv."""
    x = _check(x)
    K, N = x.shape[1], scales.shape[1]
    if not (split_k or block_n or block_k):
        from .awq_tc import TC_TILES, awq_tc_matmul
        if x.dtype == torch.float16 and (x.shape[0] > 1 or (K, N, K // scales.shape[0]) in TC_TILES):
            return awq_tc_matmul(x, qweight, qzeros, scales)
        if x.shape[0] == 1:
            return awq_gemv(x, qweight, qzeros, scales)
    return _tiled(_awq_kernel, x, qweight, qzeros, scales, split_k, block_n, block_k, K, N, K // scales.shape[0])


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
                 split_k: int = 0, block_n: int = 0, block_k: int = 0, nibble_dots: int = -1) -> torch.Tensor:
    """awq_matmul over the K-packed layout (repack_kpack); ``nibble_dots`` -1: KPACK_NIBBLE_DOTS (used where
    the K tile is 128 or more). Unless a tile or form is asked for: one row runs the tuned one-row kernel
    (the tensor-core one where the tuner found it faster for this shape, else kpack_gemv); from
    DEQUANT_MIN_ROWS rows on the weight is dequantized and multiplied by torch; float16 between runs on
    tensor cores (awq_tc.kpack_tc_matmul)."""
    x = _check(x)
    K, N = x.shape[1], scales.shape[1]
    if not (split_k or block_n or block_k or nibble_dots >= 0):
        from .awq_tc import KPACK_TC_TILES, kpack_tc_matmul
        if x.shape[0] == 1:
            tc = KPACK_TC_TILES.get((K, N, K // scales.shape[0])) if x.dtype == torch.float16 else None
            return kpack_tc_matmul(x, qweight_k, zeros, scales, tc) if tc else kpack_gemv(x, qweight_k, zeros, scales)
        if x.shape[0] >= DEQUANT_MIN_ROWS:
            return x @ kpack_dequantize(qweight_k, zeros, scales, x.dtype)
        if x.dtype == torch.float16:
            return kpack_tc_matmul(x, qweight_k, zeros, scales)
    return _tiled(_kpack_kernel, x, qweight_k, zeros, scales, split_k, block_n, block_k, K, N, K // scales.shape[0],
                  NIBBLE_DOTS=KPACK_NIBBLE_DOTS if nibble_dots < 0 else nibble_dots)
