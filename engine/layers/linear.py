"""Linear layers whose parameters know how to load (a shard of) a checkpoint tensor.

A fused layer (q/k/v, gate/up) holds its parts stacked along the output dimension; each part is
loaded by name, so architectures with separate or packed checkpoint tensors load the same module.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_gemm
from ..kernels.cpu_native import skinny_linear_t


CPU_WX_MAX_TOKENS = 1024  # measured on the 2-core AVX2 machine: no gain beyond this
CPU_NATIVE_MAX_TOKENS = 8  # the native skinny kernel streams weights at ~2x MKL's gemv rate up to here
# beside oneDNN's packed products it wins only up to 4 tokens (30 SmolLM2 layers on the 2-core AVX-512 EPYC:
# 10.0 vs 10.8 ms at 1 token, 11.3 vs 11.0 at 4, 18.2 vs 12.9 at 8)
CPU_NATIVE_MAX_TOKENS_ONEDNN = 4
# the panel products (cpu_gemm's native backend) match the skinny kernel's weight stream at 1 token and beat
# it from 2 on (30 SmolLM2 layers' shapes on that machine: 3072x576 at 4 tokens 361 -> 216 us)
CPU_NATIVE_MAX_TOKENS_PANELS = 1
CPU_WIDE_CHUNK = 1024  # weight rows per slice for very wide layers (forward_wide)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed = None  # a packed copy of the weight (kernels/cpu_gemm.py), set after loading on CPU
        self.released = False  # the row-major weight freed: the packed copy takes every product

    def packed_for(self, x: torch.Tensor):
        """The packed weight when it serves x: CPU, 2-D, beyond the native skinny kernel's few tokens (any
        number of them once the row-major weight is released)."""
        if self.packed is None or x.dim() != 2 or x.device.type != "cpu":
            return None
        if self.released:
            return self.packed
        few = CPU_NATIVE_MAX_TOKENS_PANELS if isinstance(self.packed, cpu_gemm.Panels) else CPU_NATIVE_MAX_TOKENS_ONEDNN
        return self.packed if x.shape[0] > few else None

    def load(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        _copy(getattr(self, name).data, tensor, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out] (a transposed view on the MKL CPU path)."""
        packed = self.packed_for(x)
        if packed is not None:
            return cpu_gemm.linear(x.contiguous(), packed, self.bias)
        return self.forward_t(x).t()

    def forward_t(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> y^T: [out, tokens]; contiguous on the MKL CPU path, so row slices stay contiguous."""
        packed = self.packed_for(x)
        if packed is not None:
            return cpu_gemm.linear(x.contiguous(), packed, self.bias).t()
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= CPU_NATIVE_MAX_TOKENS:
            y = skinny_linear_t(x.contiguous(), self.weight, self.bias)
            if y is not None:
                return y
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= CPU_WX_MAX_TOKENS:
            # MKL runs W @ x^T far faster than x @ W^T for few rows (1.2x at 1, 1.7x at 8-64 tokens)
            if self.bias is None:
                return self.weight @ x.t()
            return torch.addmm(self.bias[:, None], self.weight, x.t())
        return F.linear(x, self.weight, self.bias).t()

    def forward_wide(self, x: torch.Tensor, rows: int = CPU_WIDE_CHUNK) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out] contiguous, for a very wide layer (the LM head) on CPU.

        Between the skinny kernel's range and prefill sizes, MKL runs a 49k-row weight against a few dozen
        tokens at about 70% of its rate on 1k-row slices; each slice's result is transposed while it is
        still in cache (measured: 19.4 -> 15.9 ms at 16 tokens, 39.6 -> 29.2 ms at 64, SmolLM2's head).
        """
        M = x.shape[0]
        packed = self.packed_for(x)
        if packed is not None:
            return cpu_gemm.linear(x.contiguous(), packed, self.bias)
        if not (x.device.type == "cpu" and x.dim() == 2 and CPU_NATIVE_MAX_TOKENS < M <= CPU_WX_MAX_TOKENS
                and self.out_features > 2 * rows):
            return self(x).contiguous()
        xt = x.t().contiguous()
        out = torch.empty(M, self.out_features, dtype=x.dtype)
        for s in range(0, self.out_features, rows):
            w = self.weight[s:s + rows]
            y = w @ xt if self.bias is None else torch.addmm(self.bias[s:s + rows, None], w, xt)
            out[:, s:s + rows] = y.t()
        return out


def part_offsets(parts: Sequence[Tuple[str, int]]) -> Dict[str, Tuple[int, int]]:
    """[(name, size)] stacked on the output dimension -> {name: (start, size)}."""
    offsets, start = {}, 0
    for name, size in parts:
        offsets[name] = (start, size)
        start += size
    return offsets


class FusedLinear(Linear):
    """Several projections of one input, stacked on the output dimension: ``parts`` = [(name, size)]."""

    def __init__(self, in_features: int, parts: Sequence[Tuple[str, int]], bias: bool = False):
        super().__init__(in_features, sum(size for _, size in parts), bias)
        self.offsets = part_offsets(parts)

    def load(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        param = getattr(self, name).data
        if shard is None:
            _copy(param, tensor, name)
            return
        start, size = self.offsets[shard]
        _copy(param.narrow(0, start, size), tensor, f"{name}[{shard}]")

    def split(self, y: torch.Tensor, dim: int = -1):
        return y.split([size for _, size in self.offsets.values()], dim=dim)
