"""AutoAWQ "GEMM" layout in torch: packing, unpacking and the dequantizing matmul reference.

qweight int32 [in, out/8]: nibble i of each word holds output column 8c + AWQ_ORDER[i] of input row r;
qzeros int32 [in/G, out/8] packed the same way; scales [in/G, out]. w[o, r] = (q - z) * s of r's group.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def pack_columns(v: torch.Tensor) -> torch.Tensor:
    """v [rows, cols] of 4-bit values -> int32 [rows, cols / 8] in AutoAWQ's nibble order."""
    rows, cols = v.shape
    if cols % 8:
        raise ValueError(f"packing: {cols} columns is not a multiple of 8")
    v = v.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64, device=v.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= v[:, :, col] << (4 * i)
    return _to_int32(packed)


def unpack_columns(p: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] -> int32 [rows, cols] of 4-bit values (inverse of pack_columns)."""
    shifts = torch.tensor([4 * AWQ_ORDER.index(c) for c in range(8)], dtype=torch.int32, device=p.device)
    return ((p[:, :, None] >> shifts) & 0xF).reshape(p.shape[0], -1)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> W^T [in, out] in ``dtype`` (the layout the matmul x @ W^T wants)."""
    q = unpack_columns(qweight)  # [in, out]
    z = unpack_columns(qzeros)  # [groups, out]
    group = q.shape[0] // z.shape[0]
    w = (q.view(z.shape[0], group, -1) - z[:, None, :]).to(dtype) * scales.to(dtype)[:, None, :]
    return w.view(q.shape[0], -1)


def awq_matmul_reference(x: torch.Tensor, qweight, qzeros, scales) -> torch.Tensor:
    """x [M, in] @ dequantized W^T -> [M, out] (the oracle of the Triton kernel)."""
    return x @ dequantize_awq(qweight, qzeros, scales, x.dtype)


def repack_kpack(qweight: torch.Tensor, qzeros: torch.Tensor):
    """AutoAWQ's tensors -> the K-packed layout of the GPU kernels (awq_triton.kpack_matmul): int32 [in/8, out]
    whose word (r, o) holds rows 8r..8r+7 of column o in nibbles 0..7, and the zeros as float16 [in/G, out]."""
    q = unpack_columns(qweight)  # [in, out]
    rows, cols = q.shape
    if rows % 8:
        raise ValueError(f"K-packing: {rows} input rows is not a multiple of 8")
    q = q.to(torch.int64).view(rows // 8, 8, cols)
    packed = torch.zeros(rows // 8, cols, dtype=torch.int64, device=q.device)
    for i in range(8):
        packed |= q[:, i] << (4 * i)
    return _to_int32(packed), unpack_columns(qzeros).to(torch.float16)


def dequantize_kpack(qweight_k: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K-packed tensors -> W^T [in, out] in ``dtype`` (the oracle of the K-packed kernels)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight_k.device)
    q = ((qweight_k[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight_k.shape[1])  # [in, out]
    group = q.shape[0] // zeros.shape[0]
    w = (q.view(zeros.shape[0], group, -1).to(dtype) - zeros.to(dtype)[:, None, :]) * scales.to(dtype)[:, None, :]
    return w.view(q.shape[0], -1)
