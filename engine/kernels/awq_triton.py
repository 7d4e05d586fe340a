"""W4A16 matmul in Triton: x [M, K] @ W [K, N] where W is dequantized from the AutoAWQ GEMM layout inside
the kernel (never materialized). The oracle is awq_torch.awq_matmul_reference.

Each program loads a [BK, BN/8] tile of packed int32 words once, spreads every word over its 8 columns in
registers and dequantizes with the group's zeros and scales. For small M (decode) split-K spreads the
reduction over several programs so the whole GPU streams the weight; their partial sums meet in a float32
workspace by atomic adds, and the last program of each output tile (a per-tile counter says which) takes the
sum, zeroes the workspace behind it and writes the output: one launch, no memset or reduction kernels, so
it suits CUDA graphs. The workspace and counters are allocated zeroed once per device and left zeroed.
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
    def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, G, KS,
                    sxm, sqk, szg, ssg, som,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        pn = tl.program_id(0)
        pm = tl.program_id(1)
        pk = tl.program_id(2)
        offs_m = pm * BM + tl.arange(0, BM)
        offs_n = pn * BN + tl.arange(0, BN)
        offs_p = pn * (BN // 8) + tl.arange(0, BN // 8)
        offs_k = tl.arange(0, BK)
        mask_m, mask_n, mask_p = offs_m < M, offs_n < N, offs_p < N // 8
        # column n sits in nibble order [0, 4, 1, 5, 2, 6, 3, 7] of its word (AutoAWQ's packing)
        c = offs_n % 8
        shifts = ((c // 2) + (c % 2) * 4) * 4  # [BN]
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
            sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            q = ((qw >> shifts[None, :]) & 0xF).to(tl.float32)
            z = ((qz >> shifts) & 0xF).to(tl.float32)
            x = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :], mask=mask_m[:, None] & kmask[None, :],
                        other=0.0)
            w = ((q - z[None, :]) * sc[None, :]).to(x.dtype)
            acc += tl.dot(x, w)
        out_ptrs = out_ptr + offs_m[:, None] * som + offs_n[None, :]
        omask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            _split_k_finish(acc, ws_ptr + offs_m[:, None] * N + offs_n[None, :], out_ptrs, omask, cnt_ptr,
                            pm * tl.num_programs(0) + pn, SPLIT_K)


    @triton.jit
    def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, G, KS, sqk, szg, ssg,
                         BP: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        """One row of x (decode): works on the packed words as they lie, [BK, BP] int32, and on each of the
        8 nibbles of every word as a third dimension, so nothing is shuffled between threads in the loop.
        A nibble q becomes the float 2^23 + q by OR-ing it into the exponent bits of 2^23 (no int-to-float
        conversion); the zero point gets the same offset, so their difference is exact."""
        pp = tl.program_id(0)
        pk = tl.program_id(1)
        offs_p = pp * BP + tl.arange(0, BP)
        offs_k = tl.arange(0, BK)
        j = tl.arange(0, 8)
        shifts = j * 4  # nibble j of a word holds column 8p + [0, 2, 4, 6, 1, 3, 5, 7][j] (AutoAWQ's order)
        cols = offs_p[:, None] * 8 + ((j % 4) * 2 + j // 4)[None, :]  # [BP, 8]
        mask_p = offs_p < N // 8
        acc = tl.zeros((BK, BP, 8), dtype=tl.float32)
        k_lo = pk * KS
        k_hi = tl.minimum(k_lo + KS, K)
        for k0 in range(k_lo, k_hi, BK):
            ks = k0 + offs_k
            kmask = ks < K
            qw = tl.load(qw_ptr + ks[:, None] * sqk + offs_p[None, :], mask=kmask[:, None] & mask_p[None, :],
                         other=0)  # [BK, BP]
            g = k0 // G
            qz = tl.load(qz_ptr + g * szg + offs_p, mask=mask_p, other=0)  # [BP]
            sc = tl.load(s_ptr + g * ssg + cols, mask=mask_p[:, None], other=0.0).to(tl.float32)  # [BP, 8]
            z = (((qz[:, None] >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            q = (((qw[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            x = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)  # [BK]
            acc += x[:, None, None] * ((q - z[None, :, :]) * sc[None, :, :])
        res = tl.sum(acc, axis=0)  # [BP, 8]
        omask = mask_p[:, None]
        if SPLIT_K == 1:
            tl.store(out_ptr + cols, res.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            _split_k_finish(res, ws_ptr + cols, out_ptr + cols, omask, cnt_ptr, pp, SPLIT_K)

_SMS: Dict[str, int] = {}
_WORKSPACE: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def _sm_count(device: torch.device) -> int:
    key = str(device)
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _SMS[key]


def _workspace(device: torch.device, elems: int, tiles: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums and int32 tile counters, grown on demand; the kernel leaves them zeroed."""
    key = str(device)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < elems or cnt.numel() < tiles:
        n = max(elems, ws.numel() if ws is not None else 0, 1 << 16)
        t = max(tiles, cnt.numel() if cnt is not None else 0, 1024)
        ws, cnt = torch.zeros(n, dtype=torch.float32, device=device), torch.zeros(t, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def pick_config(M: int, N: int, K: int, G: int, sms: int) -> Tuple[int, int, int, int]:
    """(BM, BN, BK, split_k): tiles of 16 to 64 rows; split-K until the programs fill the device twice over."""
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN = 64
    BK = min(128, G)
    tiles = -(-M // BM) * -(-N // BN)
    k_tiles = -(-K // BK)
    split = 1
    while tiles * split < 2 * sms and split < 16 and k_tiles // (split * 2) >= 2:
        split *= 2
    return BM, BN, BK, split


def pick_gemv_config(N: int, K: int, G: int, sms: int, tile=None) -> Tuple[int, int, int, int]:
    """(BP packed columns, BK, split_k, num_warps) for one row: ``tile`` (BP, BK, warps), default
    GEMV_TILE, and split-K until the programs fill the device four times over."""
    BP, BK, warps = (tile or GEMV_TILE)[:3]
    BK = min(BK, G)
    tiles = -(-N // (8 * BP))
    split = 1
    while tiles * split < 4 * sms and split < 32 and -(-K // BK) // (split * 2) >= 2:
        split *= 2
    return BP, BK, split, warps


GEMV_TILE = (8, 128, 4)  # (BP, BK, num_warps): the fastest of those tried on an H200 (docs/benchmarks.md)


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             split_k: int = 0, block_p: int = 0, block_k: int = 0, num_warps: int = 0) -> torch.Tensor:
    """x [1, K] -> [1, N]: the decode path (one row) of awq_matmul."""
    K = x.shape[1]
    N = scales.shape[1]
    G = K // scales.shape[0]
    BP, BK, split, warps = pick_gemv_config(N, K, G, _sm_count(x.device))
    BP, BK, split, warps = block_p or BP, block_k or BK, split_k or split, num_warps or warps
    if G % BK or K % BK:
        raise ValueError(f"awq_gemv: group size {G} and K {K} must be multiples of the K tile {BK}")
    KS = -(-K // (split * BK)) * BK
    out = torch.empty(1, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N // 8, BP), split)
    ws, cnt = _workspace(x.device, N, grid[0]) if split > 1 else (out, out)
    _awq_gemv_kernel[grid](x, qweight, qzeros, scales, out, ws, cnt, N, K, G, KS, qweight.stride(0),
                           qzeros.stride(0), scales.stride(0), BP=BP, BK=BK, SPLIT_K=split, num_warps=warps)
    return out


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               split_k: int = 0, block_n: int = 0, block_k: int = 0) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. ``split_k``, ``block_n``, ``block_k``: 0 picks from the shape.
    One row (decode) goes to awq_gemv unless a tile is asked for."""
    if not HAVE_TRITON:
        raise RuntimeError("awq_matmul: triton is not installed")
    M, K = x.shape
    N = scales.shape[1]
    G = K // scales.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if M == 1 and not (split_k or block_n or block_k) and K % min(GEMV_TILE[1], G) == 0:
        return awq_gemv(x, qweight, qzeros, scales)
    BM, BN, BK, split = pick_config(M, N, K, G, _sm_count(x.device))
    BN, BK, split = block_n or BN, block_k or BK, split_k or split
    if G % BK or K % BK:
        raise ValueError(f"awq_matmul: group size {G} and K {K} must be multiples of the K tile {BK}")
    if N % 8 or BN % 8:
        raise ValueError(f"awq_matmul: N {N} and the N tile {BN} must be multiples of 8")
    KS = -(-K // (split * BK)) * BK  # each split's share of K, whole tiles
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
    ws, cnt = _workspace(x.device, M * N, grid[0] * grid[1]) if split > 1 else (out, out)
    _awq_kernel[grid](x, qweight, qzeros, scales, out, ws, cnt, M, N, K, G, KS,
                      x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
                      BM=BM, BN=BN, BK=BK, SPLIT_K=split)
    return out
