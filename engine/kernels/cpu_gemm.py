"""float32 matrix products on CPU through oneDNN with weights packed once at load.

torch's ``F.linear`` on CPU runs MKL's sgemm, which packs the weight on every call and, on AMD processors,
takes its AVX2 code even where AVX-512 is there. oneDNN (bundled with torch as mkldnn) picks the widest
instructions the processor has and takes a weight reordered once into its blocked layout. Measured on a
2-core AMD EPYC with AVX-512: a 1536x576 product at 16 tokens 228 -> 72 us, SmolLM2's 49k-row LM head at 16
tokens 9.2 -> 3.0 ms. On a machine where it does not pay, ``auto`` keeps MKL: the choice is measured once
per process over the model's layer shapes. ``RAYLM_CPU_GEMM=onednn|mkl|auto`` overrides it.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

ENV = "RAYLM_CPU_GEMM"
CHOICES = ("auto", "onednn", "mkl")
MIN_GAIN = 1.1  # auto takes oneDNN only when it is at least this much faster
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


def _interleaved_medians(fns, reps: int = 11) -> list:
    """Median seconds of each fn, run in turns (a drifting machine slows both sides alike)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [sorted(ts)[reps // 2] for ts in times]


def use_onednn(shapes: Dict[Tuple[int, int], int] = None, tokens: int = 16) -> bool:
    """Whether float32 CPU products of more than a few tokens go through oneDNN (decided once per process).

    ``auto`` times both libraries on each weight shape [out, in] at ``tokens`` rows, the way the engine
    calls them, in turns, and takes oneDNN when the sum over ``shapes`` (shape -> how many layers have it;
    a model passes its own) is at least MIN_GAIN faster: one small product timed alone swung either way on
    a busy host.
    """
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
        shapes = shapes or {(1536, 576): 1}
        g = torch.Generator().manual_seed(0)
        t_mkl = t_dnn = 0.0
        for (n, k), count in shapes.items():
            w, x = torch.randn(n, k, generator=g), torch.randn(tokens, k, generator=g)
            packed = pack(w)
            m, d = _interleaved_medians([lambda: torch.mm(w, x.t()), lambda: linear(x, packed, None)])
            t_mkl, t_dnn = t_mkl + count * m, t_dnn + count * d
        _choice = t_mkl >= MIN_GAIN * t_dnn
        logger.info("CPU float32 products at %d tokens, %d weights: MKL %.1f ms, oneDNN %.1f ms -> %s", tokens,
                    sum(shapes.values()), t_mkl * 1e3, t_dnn * 1e3, "oneDNN" if _choice else "MKL")
    return _choice


def pack_model(model: torch.nn.Module) -> int:
    """Give every dense float32 ``Linear`` of a CPU model its packed weight; returns how many got one."""
    from ..layers.linear import Linear
    dense = [m for m in model.modules() if isinstance(m, Linear) and getattr(m, "weight", None) is not None
             and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    shapes = Counter(tuple(m.weight.shape) for m in dense)
    if not dense or not use_onednn(shapes):
        return 0
    for module in dense:
        module.packed = pack(module.weight)
    return len(dense)
