"""W4A16 linear layers holding AutoAWQ "GEMM" tensors (qweight, qzeros, scales), fused parts included.

A fused layer (q/k/v, gate/up) keeps its parts side by side along the output dimension, which in this
layout is the packed column dimension: part p fills columns [start/8, (start+size)/8) of qweight/qzeros
and [start, start+size) of scales. On GPU the Triton kernel dequantizes inside the matmul; on CPU the
layer's product runs on 4-bit panels (kernels/w4_cpu.py, repacked at load) where the native kernels are built
(AVX-512, or AVX2 and FMA), else it dequantizes its weight in the call.
"""
from __future__ import annotations

from typing import Collection, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.awq_torch import dequantize_awq
from .linear import FusedLinear, part_offsets

QUANT_TENSORS = ("qweight", "qzeros", "scales")


class AwqLinear(nn.Module):
    def __init__(self, in_features: int, parts: Sequence[Tuple[str, int]], group_size: int, bias: bool = False):
        super().__init__()
        out = sum(size for _, size in parts)
        for name, size in parts:
            if size % 8:
                raise ValueError(f"quantization_config: {name or 'linear'} has {size} outputs, not a multiple of 8")
        if in_features % group_size:
            raise ValueError(f"quantization_config.group_size: {group_size} does not divide a layer's input size "
                             f"{in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out, group_size
        self.register_buffer("qweight", torch.empty(in_features, out // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(in_features // group_size, out // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(in_features // group_size, out))
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.offsets = part_offsets(parts)
        self.kpack = False  # GPU: qweight/qzeros replaced by the K-packed layout (to_kpack)
        self.kernels_on_cpu = False  # tests: CPU tensors through the Triton kernels (under TRITON_INTERPRET=1)
        self.packed = None  # CPU: the 4-bit panels (w4_cpu.W4Panels) that replace qweight/qzeros/scales

    def to_cpu_panels(self) -> None:
        """Swap AutoAWQ's tensors for the native CPU kernel's 4-bit panels (after loading; the tensors are
        released, so the layer holds its weights once)."""
        from ..kernels.w4_cpu import W4Panels
        self.packed = W4Panels.from_awq(self.qweight, self.qzeros, self.scales)
        for name in QUANT_TENSORS:
            setattr(self, name, torch.empty(0, dtype=getattr(self, name).dtype))

    def to_kpack(self) -> None:
        """Swap AutoAWQ's qweight/qzeros for the K-packed layout the GPU kernels read fastest (after loading;
        the bytes stay the same but for the zeros, kept as float16)."""
        from ..kernels.awq_torch import repack_kpack
        qweight_k, zeros = repack_kpack(self.qweight, self.qzeros)
        self.qweight, self.qzeros, self.kpack = qweight_k, zeros, True

    def load(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        start, size = self.offsets[shard] if shard else (0, self.out_features)
        dst = getattr(self, name).data
        if name in ("qweight", "qzeros"):
            dst = dst[:, start // 8:(start + size) // 8]
        elif name == "scales":
            dst = dst[:, start:start + size]
        else:
            dst = dst[start:start + size]
        if tuple(dst.shape) != tuple(tensor.shape):
            what = f"{name}[{shard}]" if shard else name
            hint = " (is quantization_config.group_size right?)" if name in ("qzeros", "scales") else ""
            raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)} does not match the layer's "
                             f"{tuple(dst.shape)}{hint}")
        dst.copy_(tensor.to(dst.dtype))

    def packed_for(self, x: torch.Tensor):
        """The 4-bit panels when they serve x (CPU, 2-D float32), else None (as ``Linear.packed_for``)."""
        if self.packed is None or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        return self.packed

    def weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.weight_t().to(dtype)
        if self.kpack:
            from ..kernels.awq_torch import dequantize_kpack
            return dequantize_kpack(self.qweight, self.qzeros, self.scales, dtype)
        return dequantize_awq(self.qweight, self.qzeros, self.scales, dtype)  # [in, out]

    def _kernels(self, x: torch.Tensor) -> bool:
        return x.is_cuda or self.kernels_on_cpu

    def _product(self, x: torch.Tensor, **input_mode) -> torch.Tensor:
        """The Triton kernels' product over this layer's layout (``input_mode``: awq_triton's gated / norm),
        plus the bias."""
        from ..kernels.awq_triton import awq_matmul, kpack_matmul
        y = (kpack_matmul if self.kpack else awq_matmul)(x, self.qweight, self.qzeros, self.scales, **input_mode)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out]."""
        if self._kernels(x):
            return self._product(x)
        if self.packed_for(x) is not None:
            from ..kernels.w4_cpu import linear
            return linear(x, self.packed, self.bias)
        y = x @ self.weight_t(x.dtype)
        return y if self.bias is None else y + self.bias

    def forward_gated(self, gu: torch.Tensor) -> torch.Tensor:
        """gu: [tokens, 2 in], the MLP's fused gate/up output -> down(SiLU(gate) * up) [tokens, out]. On GPU
        the W4A16 kernels make SiLU(gate) * up as they load their input (no kernel of its own)."""
        if self._kernels(gu):
            return self._product(gu, gated=True)
        return self.forward(F.silu(gu[:, :self.in_features]) * gu[:, self.in_features:])

    def forward_normed(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
        """RMSNorm(x + residual) * weight through this layer (residual None: RMSNorm(x) * weight) -> (output,
        the residual stream x + residual, or x itself). On GPU the W4A16 kernels make the normed input as they
        load x (kernels/awq_input.py)."""
        if self._kernels(x):
            from ..kernels.awq_input import Norm
            x = x.contiguous()
            residual = residual.contiguous() if residual is not None else None
            res = torch.empty_like(x) if residual is not None else None
            return self._product(x, norm=Norm(residual, weight, eps, res)), (x if res is None else res)
        from ..kernels.gpu_fused import norm_residual
        h, res = norm_residual(x, residual, weight, eps)
        return self.forward(h), res

    def forward_t(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] -> y^T [out, tokens], contiguous (the fused MLP slices rows of it)."""
        if self._kernels(x) or self.packed is not None:
            return self.forward(x).t().contiguous()
        w_t = self.weight_t(x.dtype)
        y = w_t.t() @ x.t()
        return y if self.bias is None else y + self.bias[:, None]

    split = FusedLinear.split  # the same parts, the same stacking on the output dimension


GPU_LAYOUT = "kpack"  # or "awq": the layout AwqLinear computes from on GPU where the tuner does not pick one
# (kernels/awq_tune.py; bench/awq_gpu.py compares them)


def use_gpu_layout(model, layout: Optional[str] = None) -> int:
    """On GPU, after loading: every AwqLinear to ``layout`` (None: GPU_LAYOUT); -> how many were repacked."""
    layers = [m for m in model.modules() if isinstance(m, AwqLinear) and not m.kpack]
    if (layout or GPU_LAYOUT) == "kpack":
        for m in layers:
            m.to_kpack()
        return len(layers)
    return 0


def use_cpu_layout(model) -> int:
    """On CPU, after loading: every AwqLinear to the native 4-bit panels where they are built (AVX-512, or
    AVX2 and FMA), but those that tests route through the Triton kernels (kernels_on_cpu); -> how many were
    repacked."""
    from ..kernels.w4_cpu import available
    layers = [m for m in model.modules()
              if isinstance(m, AwqLinear) and m.packed is None and not m.kpack and not m.kernels_on_cpu]
    if not layers or not available():
        return 0
    for m in layers:
        m.to_cpu_panels()
    from ..kernels.w4_cpu import to_huge_pages
    to_huge_pages([m.packed for m in layers])
    return len(layers)


def swap_in_awq(model, group_size: int, dense: Collection[Tuple[int, str]] = ()) -> None:
    """Replace every decoder layer's q/k/v, o, gate/up and down with AwqLinear (on the meta device, before
    loading), as gpt-fast swaps quantized modules in; ``dense``: (layer index, "attn.qkv" / "attn.o" /
    "mlp.gate_up" / "mlp.down") modules left as they are."""
    for i, layer in enumerate(model.layers):
        for name in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
            if (i, name) in dense:
                continue
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            parts = list(old.offsets.items()) if getattr(old, "offsets", None) else [("", (0, old.out_features))]
            new = AwqLinear(old.in_features, [(n, size) for n, (_, size) in parts], group_size,
                            bias=old.bias is not None)
            if not getattr(old, "offsets", None):
                new.offsets = {}
            setattr(parent, attr, new)
