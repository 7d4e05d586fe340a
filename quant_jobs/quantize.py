"""Group-wise asymmetric integer quantization of weights and the AutoAWQ "GEMM" packing.

Weights are [out, in]; a group is ``group_size`` consecutive input channels of one output row.
Scales are rounded to float16 before the integers are computed, so the fake-quantized weights equal the
dequantized packed checkpoint bit for bit.
"""
from __future__ import annotations

from typing import Tuple

import torch

from engine.kernels.awq_torch import AWQ_ORDER, pack_columns, unpack_columns  # noqa: F401 (re-exported)

GROUP_SIZES = (32, 64, 128)


def check_group(name: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        ok = [g for g in GROUP_SIZES if in_features % g == 0]
        raise ValueError(f"w_group_size: {group_size} does not divide {name}'s input size {in_features}; "
                         f"group sizes that work for it: {ok or 'none of ' + str(list(GROUP_SIZES))}")


def quant_params(w: torch.Tensor, bits: int, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (scales, zeros) [out, in / group_size]; scales float16-representable, zeros integers."""
    qmax = 2 ** bits - 1
    g = w.float().reshape(w.shape[0], -1, group_size)
    mx, mn = g.amax(-1), g.amin(-1)
    scales = ((mx - mn).clamp(min=1e-5) / qmax).half().float()
    zeros = (-torch.round(mn / scales)).clamp(0, qmax)
    return scales, zeros


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """-> integers [out, in] in [0, 2^bits - 1] (int32)."""
    qmax = 2 ** bits - 1
    out, n_groups = scales.shape
    g = w.float().reshape(out, n_groups, -1)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, qmax)
    return q.reshape(out, -1).to(torch.int32)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out, n_groups = scales.shape
    g = q.float().reshape(out, n_groups, -1)
    return ((g - zeros[..., None]) * scales[..., None]).reshape(out, -1)


def fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize and dequantize (same dtype as w)."""
    scales, zeros = quant_params(w, bits, group_size)
    return dequantize(quantize(w, scales, zeros, bits), scales, zeros).to(w.dtype)


def pack_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """q [out, in], scales/zeros [out, groups] -> qweight int32 [in, out/8], qzeros int32 [groups, out/8],
    scales float16 [groups, out]."""
    return pack_columns(q.t()), pack_columns(zeros.t().to(torch.int64)), scales.t().contiguous().half()


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> the dequantized weight [out, in] (float32)."""
    q = unpack_columns(qweight).t()  # [out, in]
    z = unpack_columns(qzeros).t().float()  # [out, groups]
    s = scales.float().t()  # [out, groups]
    if q.shape[1] % s.shape[1]:
        raise ValueError(f"qweight: input size {q.shape[1]} is not a multiple of the {s.shape[1]} scale groups")
    return dequantize(q, s, z)
