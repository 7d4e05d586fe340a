"""W4A16 matmul in Triton: x [M, K] @ W [K, N] where W is dequantized from the AutoAWQ GEMM layout inside
the kernel (never materialized). Split-K spreads the reduction for small M (decode), where one program
per output tile would leave most of the GPU idle. The oracle is awq_torch.awq_matmul_reference.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    HAVE_TRITON = False

if HAVE_TRITON:
    @triton.jit
    def _awq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, G,
                    sxm, sxk, sqk, szg, ssg, som, son, sos,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        pid = tl.program_id(0)
        pk = tl.program_id(1)
        n_tiles = tl.cdiv(N, BN)
        pm, pn = pid // n_tiles, pid % n_tiles
        offs_m = pm * BM + tl.arange(0, BM)
        offs_n = pn * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        mask_m, mask_n = offs_m < M, offs_n < N
        # nibble of column n inside its int32: AutoAWQ order [0, 2, 4, 6, 1, 3, 5, 7] inverted
        shifts = (((offs_n % 8) // 2) + (offs_n % 2) * 4) * 4
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(pk * BK, K, BK * SPLIT_K):
            ks = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :] * sxk,
                        mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
            qw = tl.load(qw_ptr + ks[:, None] * sqk + (offs_n // 8)[None, :],
                         mask=(ks[:, None] < K) & mask_n[None, :], other=0)
            g = k0 // G  # BK divides G: the whole tile shares one group
            qz = tl.load(qz_ptr + g * szg + offs_n // 8, mask=mask_n, other=0)
            sc = tl.load(s_ptr + g * ssg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            q = ((qw >> shifts[None, :]) & 0xF).to(tl.float32)
            z = ((qz >> shifts) & 0xF).to(tl.float32)
            w = (q - z[None, :]) * sc[None, :]
            acc += tl.dot(x.to(tl.float32), w)
        tl.store(out_ptr + pk * sos + offs_m[:, None] * som + offs_n[None, :] * son, acc,
                 mask=mask_m[:, None] & mask_n[None, :])


def pick_split_k(M: int, N: int, K: int, BN: int = 64, sms: int = 132) -> int:
    """Enough programs to fill the device when there are few output tiles (small M)."""
    tiles = -(-M // 16) * -(-N // BN)
    split = 1
    while tiles * split < 2 * sms and split < 16 and K // (32 * split * 2) >= 2:
        split *= 2
    return split


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               split_k: int = 0) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. ``split_k`` 0 picks one from the shape."""
    if not HAVE_TRITON:
        raise RuntimeError("awq_matmul: triton is not installed")
    M, K = x.shape
    N = scales.shape[1]
    G = K // scales.shape[0]
    BM, BN, BK = 16, 64, 32
    if G % BK or K % BK:
        raise ValueError(f"awq_matmul: group size {G} and K {K} must be multiples of {BK}")
    split_k = split_k or pick_split_k(M, N, K, BN)
    part = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split_k)
    _awq_kernel[grid](x, qweight, qzeros, scales, part, M, N, K, G,
                      x.stride(0), x.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                      part.stride(1), part.stride(2), part.stride(0), BM=BM, BN=BN, BK=BK, SPLIT_K=split_k)
    out = part[0] if split_k == 1 else part.sum(0)
    return out.to(x.dtype)
