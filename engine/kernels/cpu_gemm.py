"""float32 matrix products on CPU, on weights packed once at load.

torch's ``F.linear`` on CPU runs MKL's sgemm, which packs the weight on every call and, on AMD processors,
takes its AVX2 code even where AVX-512 is there. Two packed backends replace it:

- ``native``: our panel products (``panel_linear`` in csrc/cpu_kernels.c, AVX-512 builds): 16-output panels,
  8 x 48 register tiles, the next tile's weights prefetched behind the arithmetic. bench/cpu_gemm.py on a
  2-core AMD EPYC with AVX-512, SmolLM2's shapes, weights cold: 1.06-2.2x oneDNN from 1 to 512 tokens
  (3072x576 at 32 tokens 1.22 -> 1.10 ms, the 49k-row LM head 12.2 -> 10.4 ms).
- ``onednn``: torch's bundled oneDNN (mkldnn) on its blocked layout (1536x576 at 16 tokens: MKL 228 us,
  oneDNN 72 us on that machine).

``auto`` measures the available ones once per process over the model's own layer shapes and keeps MKL
unless a packed backend is at least MIN_GAIN faster. ``RAYLM_CPU_GEMM=auto|native|onednn|mkl`` overrides it.

Precision ``high`` (``EngineConfig.matmul_precision``, torch's name for it) adds a bf16x3 copy of each panel
packed weight on processors with AMX (csrc/amx_bf16x3.c): products of x3_min_rows() or more token rows run as three
bfloat16 tile products, 2-3x the float32 rate, with about 1e-6 of the products' magnitudes as error instead of
about 1e-7. ``highest`` (the default) keeps IEEE float32 products everywhere.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Optional, Sequence

import torch

from . import cpu_native

logger = logging.getLogger(__name__)

ENV = "RAYLM_CPU_GEMM"
CHOICES = ("auto", "native", "onednn", "mkl")
MIN_GAIN = 1.1  # auto takes a packed backend only when it is at least this much faster than MKL
PRECISIONS = ("highest", "high")
# backend() times a wider weight on this many of its rows (times its share): packing a 49k-row LM head twice
# to time it had taken the engine's peak memory 226 MiB above its steady state
MAX_TIMED_ROWS = 8192
TRIM_EVERY = 64 << 20  # pack_model(release=True) trims the heap each time this many bytes of weights are freed
_choice: Optional[str] = None


def x3_min_rows() -> int:
    """Token rows from which the bf16x3 products take over (X3_MIN_M in csrc/amx_bf16x3.h; fewer stream the
    float32 panels, a weight stream either way)."""
    return int(cpu_native.lib().x3_min_rows())


class X3Weight:
    """A weight [N, K] packed for the bf16x3 AMX products: hi and lo bfloat16 tiles (csrc/amx_bf16x3.c);
    ``min_rows``: products of fewer token rows run on the float32 panels instead."""

    __slots__ = ("data", "out_features", "in_features", "min_rows")

    def __init__(self, weight: torch.Tensor, out: Optional[torch.Tensor] = None):
        """``out``: a 64-byte aligned int16 slice of ``X3Weight.size(weight)`` elements; a fresh tensor without it."""
        so = cpu_native.lib()
        n, k = weight.shape
        w = weight.detach().float().contiguous()
        self.data = torch.empty(X3Weight.size(weight), dtype=torch.int16) if out is None else out
        so.x3_pack(w.data_ptr(), self.data.data_ptr(), n, k, torch.get_num_threads())
        self.out_features, self.in_features, self.min_rows = n, k, x3_min_rows()

    @staticmethod
    def size(weight: torch.Tensor) -> int:
        """Elements the packed copy of ``weight`` takes (the kernel's own count: N and K padded to 32, hi and lo)."""
        return int(cpu_native.lib().x3_packed_elems(*weight.shape))


class Panels:
    """A weight [N, K] packed for ``panel_linear``: [ceil(N/16), K, 16], zero outputs past N; ``x3``, its
    bf16x3 copy under precision ``high`` (None otherwise)."""

    __slots__ = ("data", "out_features", "in_features", "x3")

    def __init__(self, weight: torch.Tensor, out: Optional[torch.Tensor] = None):
        """``out``: where to write them (a flat float32 slice of ``Panels.size(weight)`` elements starting on a
        64-byte boundary, e.g. a model's huge-page arena); a fresh tensor without it."""
        n, k = weight.shape
        w = weight.detach().float()
        padded = _padded(n)
        if padded != n:
            w = torch.cat([w, w.new_zeros(padded - n, k)])
        panels = w.reshape(padded // 16, 16, k).transpose(1, 2)
        if out is None:
            self.data = panels.contiguous()  # 64-byte aligned panels
        else:
            self.data = out.view(padded // 16, k, 16)
            self.data.copy_(panels)
        self.out_features, self.in_features = n, k
        self.x3: Optional[X3Weight] = None

    @staticmethod
    def size(weight: torch.Tensor) -> int:
        """Elements the packed copy of ``weight`` takes."""
        n, k = weight.shape
        return _padded(n) * k


class PanelEmbedding(torch.nn.Module):
    """An embedding table read out of the panels of the LM head tied to it, once the head's row-major weight
    is released (``release_weight``): token t's row is column t % 16 of panel t // 16, the same float32
    values, so the model holds the table once."""

    def __init__(self, panels: Panels):
        super().__init__()
        self.panels = panels
        self.num_embeddings, self.embedding_dim = panels.out_features, panels.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.panels.data[flat // 16, :, flat % 16].view(*ids.shape, self.embedding_dim)


def _padded(n: int) -> int:
    """Output features rounded up to whole 16-wide panels."""
    return -(-n // 16) * 16


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def native_available() -> bool:
    return cpu_native.panels_available()


def x3_available() -> bool:
    """Whether the bf16x3 AMX products can run here (an AMX build of the native kernels, and the kernel's
    permission to use the tiles)."""
    so = cpu_native.lib()
    return so is not None and native_available() and bool(so.x3_available())


def backend_available(name: str) -> bool:
    return {"native": native_available, "onednn": onednn_available, "mkl": lambda: True}[name]()


def pack(weight: torch.Tensor, backend: str):
    """[out, in] float32 -> the backend's packed copy (``Panels``, or an opaque mkldnn tensor)."""
    if backend == "native":
        return Panels(weight)
    if backend == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
    raise ValueError(f"pack: backend {backend!r} has no packed layout (native, onednn)")


def linear(x: torch.Tensor, packed, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, in] contiguous float32 @ W^T (+ bias) -> [M, out] contiguous."""
    if isinstance(packed, Panels):
        m = x.shape[0]
        y = torch.empty(m, packed.out_features, dtype=torch.float32)
        x3 = packed.x3 is not None and m >= packed.x3.min_rows
        fn = cpu_native.lib().x3_linear if x3 else cpu_native.lib().panel_linear
        fn(x.data_ptr(), (packed.x3 if x3 else packed).data.data_ptr(), None if bias is None else bias.data_ptr(),
           y.data_ptr(), m, packed.out_features, packed.in_features, torch.get_num_threads())
        return y
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def release_weight(module, uses: Counter, model: Optional[torch.nn.Module] = None) -> int:
    """Free a Linear's row-major weight once its panels replace it everywhere (products of any size, the native
    decode layers); returns the bytes freed. Not for a weight that another module shares (``uses``: how often
    each parameter occurs in the model, ``named_parameters(remove_duplicate=False)``), unless that module is
    ``model``'s one ``nn.Embedding`` (an LM head tied to it), which a ``PanelEmbedding`` over the head's panels
    then replaces; nor for oneDNN-packed ones, whose native decode layers stream the row-major weights."""
    if not isinstance(module.packed, Panels) or module.released:
        return 0
    if uses[id(module.weight)] == 2 and model is not None and _embed_from_panels(model, module):
        uses[id(module.weight)] -= 1
    if uses[id(module.weight)] != 1:
        return 0
    freed = module.weight.numel() * module.weight.element_size()
    module.weight = torch.nn.Parameter(module.weight.new_empty(0, module.in_features), requires_grad=False)
    module.released = True
    return freed


def _embed_from_panels(model: torch.nn.Module, head) -> bool:
    """Put a PanelEmbedding over ``head``'s panels in place of the model's one nn.Embedding that shares the
    head's weight (tie_word_embeddings); False where there is no such one."""
    owners = [name for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and m.weight is head.weight and m.max_norm is None]
    if len(owners) != 1:
        return False
    parent, _, attr = owners[0].rpartition(".")
    setattr(model.get_submodule(parent), attr, PanelEmbedding(head.packed))
    return True


def _interleaved_medians(fns, reps: int = 11) -> list:
    """Median seconds of each fn, run in turns (a drifting machine slows all of them alike)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [sorted(ts)[reps // 2] for ts in times]


def backend(weights: Sequence[torch.Tensor] = (), tokens: int = 16) -> str:
    """Which library runs float32 CPU products of more than a few tokens: native, onednn or mkl (decided once
    per process).

    ``auto`` times the available backends at ``tokens`` rows, in turns, on one of each shape among
    ``weights`` (a model passes all of its dense weights, so a shape counts as often as layers have it; a wide
    one on MAX_TIMED_ROWS of its rows, scaled), and takes the fastest packed one when the sum is at least
    MIN_GAIN faster than MKL's: one small product timed alone swung either way on a busy host.
    """
    global _choice
    if _choice is not None:
        return _choice
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in CHOICES:
        raise ValueError(f"{ENV}={mode!r}: allowed values are {', '.join(CHOICES)}")
    if mode != "auto":
        if not backend_available(mode):
            raise ValueError(f"{ENV}={mode!r}: that backend is not available on this machine "
                             "(native needs an AVX-512 build of the native kernels, onednn torch's mkldnn)")
        _choice = mode
        return _choice
    packed_backends = [b for b in ("native", "onednn") if backend_available(b)]
    if not packed_backends:
        _choice = "mkl"
        return _choice
    g = torch.Generator().manual_seed(0)
    weights = list(weights) or [torch.randn(1536, 576, generator=g)]
    counts = Counter(tuple(w.shape) for w in weights)
    first = {tuple(w.shape): w for w in reversed(weights)}  # one weight of each shape, the model's own
    totals = dict.fromkeys(["mkl", *packed_backends], 0.0)
    for shape, w in first.items():
        scale = max(1.0, w.shape[0] / MAX_TIMED_ROWS)  # a wide weight (an LM head) timed on a slice of its rows
        w = w[:MAX_TIMED_ROWS]
        x = torch.randn(tokens, w.shape[1], generator=g)
        fns = [lambda: torch.mm(w, x.t())]
        for b in packed_backends:
            fns.append((lambda p: lambda: linear(x, p, None))(pack(w, b)))
        for name, t in zip(totals, _interleaved_medians(fns)):
            totals[name] += counts[shape] * t * scale
    best = min(packed_backends, key=totals.get)
    _choice = best if totals["mkl"] >= MIN_GAIN * totals[best] else "mkl"
    logger.info("CPU float32 products at %d tokens, %d weights: %s -> %s", tokens, len(weights),
                ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in totals.items()), _choice)
    return _choice


def pack_model(model: torch.nn.Module, precision: str = "highest", release: bool = False) -> int:
    """Give every dense float32 ``Linear`` of a CPU model its packed weight; returns how many got one.

    ``precision`` ``high`` also gives each panel packed weight its bf16x3 copy where AMX is there (it takes the
    native backend then, unless RAYLM_CPU_GEMM names another); elsewhere it changes nothing. ``release``: free
    each row-major weight as soon as its panels are written (``release_weight``; a tied LM head's too, its
    embedding then reading the panels), so that the model never holds its weights twice, not even while
    packing."""
    from ..layers.linear import Linear
    if precision not in PRECISIONS:
        raise ValueError(f"matmul_precision={precision!r}: allowed values are {', '.join(PRECISIONS)}")
    dense = [m for m in model.modules() if isinstance(m, Linear) and getattr(m, "weight", None) is not None
             and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not dense:
        return 0
    x3 = precision == "high" and x3_available()
    if precision == "high" and not x3:
        logger.warning("matmul_precision='high': this processor has no AMX tiles (or the native kernels are not "
                       "built), so float32 products stay IEEE float32")
    global _choice
    if x3 and os.environ.get(ENV, "auto").strip().lower() == "auto":
        # the bf16x3 copies ride on the panels: this model takes them whatever an earlier engine in the process
        # was measured to prefer (products dispatch on each weight's packed type)
        _choice = _choice or "native"
        choice = "native"
    else:
        choice = backend([m.weight for m in dense])
    if x3 and choice != "native":
        logger.warning("matmul_precision='high' needs the native panel products, but %s=%s: float32 products stay "
                       "IEEE float32", ENV, choice)
        x3 = False
    if choice == "mkl":
        return 0
    if choice == "native":  # one arena for all the panels, on huge pages: decode streams all of it every step
        from ..host_memory import huge_empty
        # (the arenas' pages are touched only as they are written, so a released weight's memory can serve the
        # next panels)
        arena, at = huge_empty(sum(Panels.size(m.weight) for m in dense)), 0
        sizes = [X3Weight.size(m.weight) for m in dense] if x3 else [0] * len(dense)
        x3_arena, x3_at = huge_empty(sum(sizes) // 2).view(torch.int16) if x3 else None, 0  # int16 in float32
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        from ..host_memory import trim_heap
        freed = 0
        for module, n3 in zip(dense, sizes):
            n = Panels.size(module.weight)
            module.packed, at = Panels(module.weight, arena[at:at + n]), at + n
            if x3:
                module.packed.x3, x3_at = X3Weight(module.weight, x3_arena[x3_at:x3_at + n3]), x3_at + n3
            if release:
                freed += release_weight(module, uses, model)
                if freed >= TRIM_EVERY:  # the heap keeps freed blocks (host_memory): hand them back as we go
                    trim_heap()
                    freed = 0
        if x3:
            logger.info("CPU products of %d+ tokens: bf16x3 on AMX tiles (matmul_precision=high)", x3_min_rows())
        if release:
            trim_heap()
        return len(dense)
    for module in dense:
        module.packed = pack(module.weight, choice)
    return len(dense)
