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
from typing import Optional, Sequence

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


def use_onednn(weights: Sequence[torch.Tensor] = (), tokens: int = 16) -> bool:
    """Whether float32 CPU products of more than a few tokens go through oneDNN (decided once per process).

    ``auto`` times both libraries at ``tokens`` rows, the way the engine calls them, in turns, on one of
    each shape among ``weights`` (a model passes all of its dense weights, so a shape counts as often as
    layers have it), and takes oneDNN when the sum is at least MIN_GAIN faster: one small product timed
    alone swung either way on a busy host.
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
        g = torch.Generator().manual_seed(0)
        weights = list(weights) or [torch.randn(1536, 576, generator=g)]
        counts = Counter(tuple(w.shape) for w in weights)
        first = {tuple(w.shape): w for w in reversed(weights)}  # one weight of each shape, the model's own
        t_mkl = t_dnn = 0.0
        for shape, w in first.items():
            x = torch.randn(tokens, w.shape[1], generator=g)
            packed = pack(w)
            m, d = _interleaved_medians([lambda: torch.mm(w, x.t()), lambda: linear(x, packed, None)])
            t_mkl, t_dnn = t_mkl + counts[shape] * m, t_dnn + counts[shape] * d
        _choice = t_mkl >= MIN_GAIN * t_dnn
        logger.info("CPU float32 products at %d tokens, %d weights: MKL %.1f ms, oneDNN %.1f ms -> %s", tokens,
                    len(weights), t_mkl * 1e3, t_dnn * 1e3, "oneDNN" if _choice else "MKL")
    return _choice


def pack_model(model: torch.nn.Module) -> int:
    """Give every dense float32 ``Linear`` of a CPU model its packed weight; returns how many got one."""
    from ..layers.linear import Linear
    dense = [m for m in model.modules() if isinstance(m, Linear) and getattr(m, "weight", None) is not None
             and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not dense or not use_onednn([m.weight for m in dense]):
        return 0
    for module in dense:
        module.packed = pack(module.weight)
    return len(dense)
