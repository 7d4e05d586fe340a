"""float32 matrix products on CPU through oneDNN with weights packed once at load.

torch's ``F.linear`` on CPU runs MKL's sgemm, which packs the weight on every call and, on AMD processors,
takes its AVX2 code even where AVX-512 is there. oneDNN (bundled with torch as mkldnn) picks the widest
instructions the processor has and takes a weight reordered once into its blocked layout. Measured on a
2-core AMD EPYC with AVX-512: a 1536x576 product at 16 tokens 228 -> 72 us, SmolLM2's 49k-row LM head at 16
tokens 9.2 -> 3.0 ms. On a machine where it does not pay, ``auto`` keeps MKL: the choice is measured once
per process on a layer-sized product. ``RAYLM_CPU_GEMM=onednn|mkl|auto`` overrides it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ENV = "RAYLM_CPU_GEMM"
CHOICES = ("auto", "onednn", "mkl")
MIN_GAIN = 1.15  # auto takes oneDNN only when it is at least this much faster
_choice: Optional[bool] = None


def available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 -> oneDNN's blocked copy (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, in] contiguous float32 @ W^T (+ bias) -> [M, out] contiguous."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _median_s(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2]


def use_onednn() -> bool:
    """Whether float32 CPU products of more than a few tokens go through oneDNN (decided once)."""
    global _choice
    if _choice is not None:
        return _choice
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in CHOICES:
        raise ValueError(f"{ENV}={mode!r}: allowed values are {', '.join(CHOICES)}")
    if mode == "mkl" or not available():
        _choice = False
    elif mode == "onednn":
        _choice = True
    else:
        w, x = torch.randn(1536, 576), torch.randn(32, 576)
        packed = pack(w)
        mkl = _median_s(lambda: w @ x.t())
        dnn = _median_s(lambda: linear(x, packed, None))
        _choice = mkl >= MIN_GAIN * dnn
        logger.info("CPU float32 products at 32 tokens: MKL %.0f us, oneDNN %.0f us -> %s", mkl * 1e6, dnn * 1e6,
                    "oneDNN" if _choice else "MKL")
    return _choice


def pack_model(model: torch.nn.Module) -> int:
    """Give every dense float32 ``Linear`` of a CPU model its packed weight; returns how many got one."""
    from ..layers.linear import Linear
    if not use_onednn():
        return 0
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, Linear) and w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
            module.packed = pack(w)
            n += 1
    return n
