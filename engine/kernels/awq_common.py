"""What the W4A16 Triton kernels share (awq_triton.py's tiled kernels, awq_gemv.py's one-row ones,
awq_tc.py's tensor-core ones): the split-K meeting of partial sums, its workspace, a tiled program's
coordinates, and two register-level helpers.

Split-K (small M: the whole GPU streams the weight) meets the partial sums in a float32 workspace by atomic
adds; the last program of each output tile (a per-tile counter says which) takes the sum, writes the output
and zeroes the workspace behind it: one launch, no memset or reduction kernels, so it suits CUDA graphs.
The workspace and counters are allocated zeroed once per device and left zeroed.
"""
from __future__ import annotations

from typing import Dict, Tuple

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
    def _columns8(t):
        """t [R, 8] -> its 8 columns, each [R], by three splits in registers (no data moves between threads)."""
        ev, od = tl.split(tl.reshape(t, (t.shape[0], 4, 2)))  # columns 0 2 4 6 | 1 3 5 7
        e0, e1 = tl.split(tl.reshape(ev, (t.shape[0], 2, 2)))  # 0 4 | 2 6
        o0, o1 = tl.split(tl.reshape(od, (t.shape[0], 2, 2)))  # 1 5 | 3 7
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _awq_shift(n):
        """Where column n's nibble sits in its AutoAWQ word (nibble order 0 2 4 6 1 3 5 7): the bit shift."""
        j = n % 8
        return ((j // 2) + (j % 2) * 4) * 4


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
