"""Per-shape choice of the W4A16 one-row (decode) kernel's tile and of the layout, made once per device
and cached on disk.

The fastest tile of a Triton GEMV depends on the shape and the GPU (how many SMs, how much bandwidth), so,
as Triton's autotuner does, each candidate is timed on each of the model's layer shapes and the fastest is
kept: the K-packed FMA kernel's tiles (awq_gemv.kpack_gemv) and, for float16, the tensor-core kernels'
over the K-packed layout and over AutoAWQ's (awq_tc.py). The layout whose one-row products, summed over the
model's layers, take less time is the one the layers keep (awq_linear.use_gpu_layout). A candidate whose
output strays from the dequantized torch product is dropped. Timings are GPU times of a CUDA graph of
repeated calls (launch cost from Python is not in them); on CPU (the interpreter) wall time.

The choices go to ``awq_gemv.KPACK_GEMV_TILES``, ``awq_tc.KPACK_TC_TILES``, ``awq_tc.TC_TILES`` and
``$RAYLM_CACHE/w4a16_tiles.json`` keyed by device, Triton version, shape and dtype, so later starts skip the
timing. The products that make their own input as they load it (awq_input.py: the down projection's
SiLU(gate) * up, the RMSNorm before q/k/v and gate/up) are also timed against the separate kernel and the
product, and keep the faster (tune_inputs). ``RAYLM_W4A16_TUNE=0`` turns it all off (the default tiles, the
K-packed layout, the inputs made inside the products).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from .awq_tc import KPACK_TC_TILES, TC_TILES, TcTile
from .awq_gemv import KPACK_GEMV_TILE, KPACK_GEMV_TILES, GemvTile, gemv_plan, kpack_gemv

logger = logging.getLogger(__name__)

T = GemvTile
# Families: the timed default (groups per program, split-K); the nibble loop and the 1 + q/16 form; many
# small programs of 32-64 K rows (split-K as GemLite's GEMV); a few groups per program; all of K in each
# program (no split, no atomics) looping over unrolled groups; split in two to four with a loop; and x loaded
# once per step and split into its 8 columns (nibble form 2) over wide tiles, which bench/sass_gemv.py's
# static count finds the fewest instructions per weight word in.
CANDIDATES: List[GemvTile] = [
    KPACK_GEMV_TILE, T(256, 128, 4, 1), T(256, 128, 4, 1, magic=1), T(128, 128, 4, 1, magic=1),
    T(256, 32, 2, 1, magic=1), T(256, 64, 2, 1, magic=1), T(512, 64, 4, 1, magic=1), T(128, 64, 1, 1, magic=1),
    T(128, 512, 4, 1, 128, 4, 1), T(64, 512, 2, 1, 128, 4, 1), T(128, 1024, 8, 1, 128, 8, 1),
    T(32, 0, 4, 1, 128, 4, 1), T(64, 0, 8, 1, 128, 4, 1), T(16, 0, 2, 1, 128, 8, 1), T(32, 0, 8, 1, 128, 8, 1),
    T(64, 2048, 4, 1, 128, 4, 1), T(128, 2048, 8, 1, 128, 4, 1),
    T(1024, 32, 4, 2, magic=1), T(512, 64, 4, 2, magic=1), T(512, 32, 2, 2, magic=1),
    T(1024, 128, 4, 2, 32, 4, 1), T(512, 128, 4, 2, 32, 4, 1), T(256, 128, 2, 2, 32, 4, 1),
]
# The tensor-core kernel over AutoAWQ's layout (awq_tc.py): columns, K rows per step, warps, split (0: fill
# the device), form (1: 1 + q/16 into the dot, scale and zero after it), pipelining depth (0: Triton's);
# 128-256 x 128 x 4 folded have the fewest instructions per word in the static count.
TC_CANDIDATES: List[TcTile] = [TcTile(128, 128, 4, 0, 1), TcTile(128, 128, 4, 0, 1, 1), TcTile(128, 128, 4),
                               TcTile(256, 128, 4, 0, 1, 1), TcTile(256, 128, 8, 0, 1), TcTile(64, 128, 4, 0, 1),
                               TcTile(128, 64, 4, 0, 1), TcTile(128, 128, 4, 4, 1, 1), TcTile(64, 128, 4)]


def graph_time(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    """Median seconds per call of fn: on CUDA, ``calls`` calls captured in a graph, replayed ``replays``
    times; elsewhere the wall time of one call."""
    if not torch.cuda.is_available():
        return wall_time(fn)
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def wall_time(fn: Callable[[], object]) -> float:
    """Seconds of one call of fn after a first one (CPU: the interpreter)."""
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cache_path() -> Path:
    from ..default_model import cache_root
    return cache_root() / "w4a16_tiles.json"


def _device_key(device: torch.device) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|triton {triton.__version__}"


def _shape_key(K: int, N: int, G: int, dtype: torch.dtype) -> str:
    return f"{K}x{N} g{G} {str(dtype).replace('torch.', '')}"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the choices still hold for this process
        logger.warning("W4A16 tiles not cached at %s: %s", path, e)


def _timer_for(device: torch.device, timer: Callable[[Callable[[], object]], float]):
    """CUDA graph replays for GPU tensors; the wall clock for CPU ones, even where a GPU is present."""
    return wall_time if timer is graph_time and device.type != "cuda" else timer


def _device_cache(device: torch.device, use_cache: bool) -> Tuple[Path, dict, dict]:
    """(the cache file, its contents, this device and Triton version's entries in them)."""
    path = cache_path()
    cache = _read_cache(path) if use_cache else {}
    return path, cache, cache.setdefault(_device_key(device), {})


def _random_weights(K: int, N: int, G: int, device: torch.device, seed: int = 0):
    """Random AutoAWQ tensors and the same weight K-packed: (qweight, qzeros, scales, qweight_k, zeros)."""
    from .awq_torch import repack_kpack
    g = torch.Generator(device="cpu").manual_seed(seed)
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), generator=g, dtype=torch.int32).to(device)
    qz = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // G, N // 8), generator=g, dtype=torch.int32).to(device)
    s = (torch.rand(K // G, N, generator=g) * 0.01 + 0.001).to(device=device, dtype=torch.float16)
    return (qw, qz, s, *repack_kpack(qw, qz))


def _kinds(dtype: torch.dtype) -> Tuple[str, ...]:
    """The one-row kernels to time: K-packed FMA tiles, and in float16 the tensor-core kernels over the
    K-packed layout and over AutoAWQ's."""
    return ("kpack", "kpack_tc", "tc") if dtype == torch.float16 else ("kpack",)


def time_tiles(K: int, N: int, G: int, device: torch.device, dtype: torch.dtype,
               candidates: Iterable = CANDIDATES, timer: Callable[[Callable[[], object]], float] = graph_time,
               kind: str = "kpack", weights=None) -> List[dict]:
    """Each candidate of ``kind`` ("kpack": GemvTile over the K-packed layout; "kpack_tc" and "tc": TcTile on
    tensor cores over the K-packed layout and over AutoAWQ's) that fits the shape, timed at one row on random
    weights: [{"kind", "tile", "us", "max_abs_err", "ok"}]; "ok" is False where the output strays from the
    dequantized torch product (or the kernel fails)."""
    from .awq_tc import awq_tc_matmul, kpack_tc_matmul, tc_plan
    from .awq_torch import dequantize_awq
    qw, qz, s, qk, zk = weights or _random_weights(K, N, G, device)
    x = torch.randn(1, K, generator=torch.Generator(device="cpu").manual_seed(1)).to(device=device, dtype=dtype)
    ref = x.float() @ dequantize_awq(qw, qz, s, torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    scale = float(ref.abs().max()) + 1e-6
    rows = []
    for tile in candidates:
        try:
            gemv_plan(tile, K, N, G) if kind == "kpack" else tc_plan(tile, 1, K, N, G, 1)
        except ValueError:
            continue
        fn = {"kpack": lambda: kpack_gemv(x, qk, zk, s, tile),
              "kpack_tc": lambda: kpack_tc_matmul(x, qk, zk, s, tile),
              "tc": lambda: awq_tc_matmul(x, qw, qz, s, tile)}[kind]
        try:
            err = float((fn().float() - ref).abs().max())
            us = timer(fn) * 1e6
        except Exception as e:  # a tile the compiler refuses (resources): note it, go on
            logger.warning("W4A16 %s tile %s at %dx%d: %s: %s", kind, tuple(tile), K, N, type(e).__name__, e)
            rows.append({"kind": kind, "tile": list(tile), "us": float("inf"), "max_abs_err": float("nan"),
                         "ok": False})
            continue
        rows.append({"kind": kind, "tile": list(tile), "us": us, "max_abs_err": err, "ok": err <= tol * scale})
    return rows


class Choice(NamedTuple):
    """A shape's fastest sound one-row tile per kernel: the K-packed FMA one, and the tensor-core ones over
    the K-packed layout and over AutoAWQ's (None where not timed: not float16, or none ran soundly)."""
    kpack: GemvTile
    kpack_us: float
    tc: Optional[TcTile] = None
    tc_us: Optional[float] = None
    kpack_tc: Optional[TcTile] = None
    kpack_tc_us: Optional[float] = None

    def kpack_best_us(self) -> float:
        """The K-packed layout's one-row time: its faster kernel's."""
        return min(self.kpack_us, self.kpack_tc_us if self.kpack_tc_us is not None else float("inf"))


def _from_cache(entry, K: int, N: int, G: int, dtype: torch.dtype) -> Optional[Choice]:
    try:
        c = Choice(GemvTile(*entry["kpack"]), float(entry["kpack_us"]),
                   TcTile(*entry["tc"]) if entry.get("tc") else None, entry.get("tc_us"),
                   TcTile(*entry["kpack_tc"]) if entry.get("kpack_tc") else None, entry.get("kpack_tc_us"))
        gemv_plan(c.kpack, K, N, G)
        if (c.tc is None or c.kpack_tc is None) and "tc" in _kinds(dtype):
            return None
    except (TypeError, ValueError, KeyError):
        return None
    return c


def tune(shapes: Iterable[Tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
         candidates: Iterable[GemvTile] = CANDIDATES, tc_candidates: Iterable[TcTile] = TC_CANDIDATES,
         use_cache: bool = True, timer: Callable[[Callable[[], object]], float] = graph_time,
         record: Optional[List[dict]] = None) -> Dict[Tuple[int, int, int], Choice]:
    """Pick the fastest sound one-row tile of each kernel for each (K, N, group size), from the cache where
    it has one; installs the choices (awq_gemv.KPACK_GEMV_TILES, awq_tc.KPACK_TC_TILES, awq_tc.TC_TILES)
    and returns them. ``record`` collects every timing."""
    device = torch.device(device)
    timer = _timer_for(device, timer)
    tc_candidates = list(tc_candidates)
    lists = {"kpack": list(candidates), "tc": tc_candidates,
             "kpack_tc": [t for t in tc_candidates if t.fold]}  # the K-packed tensor-core kernel is folded only
    path, cache, dev = _device_cache(device, use_cache)
    chosen, wrote = {}, False
    for K, N, G in sorted(set(shapes)):
        key = _shape_key(K, N, G, dtype)
        choice = _from_cache(dev[key], K, N, G, dtype) if key in dev else None
        if choice is None:
            t0 = time.perf_counter()
            weights = _random_weights(K, N, G, device)
            best = {}
            for kind in _kinds(dtype):
                rows = time_tiles(K, N, G, device, dtype, lists[kind], timer, kind, weights)
                for r in rows:
                    r.update(K=K, N=N, G=G)
                if record is not None:
                    record.extend(rows)
                sound = [r for r in rows if r["ok"]]
                if sound:
                    best[kind] = min(sound, key=lambda r: r["us"])
            if "kpack" not in best:
                logger.warning("W4A16 %s: no candidate tile ran soundly; the default stays", key)
                continue
            tc, ktc = best.get("tc"), best.get("kpack_tc")
            choice = Choice(GemvTile(*best["kpack"]["tile"]), best["kpack"]["us"],
                            TcTile(*tc["tile"]) if tc else None, tc["us"] if tc else None,
                            TcTile(*ktc["tile"]) if ktc else None, ktc["us"] if ktc else None)
            logger.info("W4A16 %s: K-packed FMA %s %.1f us%s%s (timed in %.1f s)", key, tuple(choice.kpack),
                        choice.kpack_us,
                        f"; K-packed tensor cores {tuple(choice.kpack_tc)} {choice.kpack_tc_us:.1f} us" if ktc else "",
                        f"; AutoAWQ layout tensor cores {tuple(choice.tc)} {choice.tc_us:.1f} us" if tc else "",
                        time.perf_counter() - t0)
            dev[key] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in choice._asdict().items()}
            wrote = True
        chosen[(K, N, G)] = choice
        KPACK_GEMV_TILES[(K, N, G, dtype)] = choice.kpack
        if choice.tc is not None:
            TC_TILES[(K, N, G)] = choice.tc
        if choice.kpack_tc is not None and choice.kpack_tc_us < choice.kpack_us:
            KPACK_TC_TILES[(K, N, G)] = choice.kpack_tc
    if wrote and use_cache:
        _write_cache(path, cache)
    return chosen


def layout_totals(chosen: Dict[Tuple[int, int, int], Choice],
                  counts: Dict[Tuple[int, int, int], int]) -> Tuple[float, Optional[float]]:
    """The one-row products' time per step summed over the model's layers (``counts`` layers of each shape):
    (K-packed layout, its faster kernel per shape; AutoAWQ's layout on tensor cores, None where not timed)."""
    kpack = sum(c.kpack_best_us() * counts.get(s, 1) for s, c in chosen.items())
    if not chosen or any(c.tc is None for c in chosen.values()):
        return kpack, None
    return kpack, sum(c.tc_us * counts.get(s, 1) for s, c in chosen.items())


def pick_layout(chosen: Dict[Tuple[int, int, int], Choice], counts: Dict[Tuple[int, int, int], int]) -> str:
    """"awq" (AutoAWQ's layout, tensor cores) where its one-row times summed over the model's layers beat
    the K-packed layout's (the faster of its two kernels per shape), else "kpack"."""
    kpack, tc = layout_totals(chosen, counts)
    return "awq" if tc is not None and tc < kpack else "kpack"


def tune_inputs(shapes: Dict[str, Iterable[Tuple[int, int, int]]], device: torch.device, dtype: torch.dtype,
                layout: str, use_cache: bool = True, timer: Callable[[Callable[[], object]], float] = graph_time
                ) -> Dict[Tuple[str, Tuple[int, int, int]], Tuple[float, float]]:
    """For the products that make their own input (awq_input.py): ``shapes["gated"]`` (the down projections:
    SiLU(gate) * up) and ``shapes["normed"]`` (q/k/v and gate/up: RMSNorm(x + residual) * weight), one row
    made inside the product against made by its own kernel (silu_mul, add_rmsnorm) and then the product, over
    ``layout`` ("kpack" or "awq") with the tiles already tuned. Where the separate kernel wins, the shape goes
    to awq_triton.UNGATED / UNNORMED (the work inside, repeated by every program, can cost more than the
    launch it saves). Cached beside the tiles. -> {(kind, shape): (inside us, apart us)}."""
    from . import awq_triton, gpu_fused
    from .awq_input import Norm
    device = torch.device(device)
    timer = _timer_for(device, timer)
    path, cache, dev = _device_cache(device, use_cache)
    times, wrote = {}, False
    apart_sets = {"gated": awq_triton.UNGATED, "normed": awq_triton.UNNORMED}
    for kind in ("gated", "normed"):
        for K, N, G in sorted(set(shapes.get(kind, ()))):
            key = f"{_shape_key(K, N, G, dtype)} {kind} {layout}"
            entry = dev.get(key)
            if not (isinstance(entry, list) and len(entry) == 2):
                qw, qz, s, qk, zk = _random_weights(K, N, G, device)
                fn, w = ((awq_triton.kpack_matmul, (qk, zk, s)) if layout == "kpack"
                         else (awq_triton.awq_matmul, (qw, qz, s)))
                g = torch.Generator(device="cpu").manual_seed(2)
                apart_sets[kind].discard((K, N, G))
                if kind == "gated":
                    gu = torch.randn(1, 2 * K, generator=g).to(device, dtype)
                    inside, apart = (lambda: fn(gu, *w, gated=True)), (lambda: fn(gpu_fused.silu_mul(gu), *w))
                else:
                    a, r = (torch.randn(1, K, generator=g).to(device, dtype) for _ in range(2))
                    nw = (torch.rand(K, generator=g) + 0.5).to(device, dtype)
                    res = torch.empty_like(a)
                    inside = lambda: fn(a, *w, norm=Norm(r, nw, 1e-5, res))  # noqa: E731
                    apart = lambda: fn(gpu_fused.add_rmsnorm(a, r, nw, 1e-5)[0], *w)  # noqa: E731
                entry = [timer(inside) * 1e6, timer(apart) * 1e6]
                dev[key], wrote = entry, True
            times[(kind, (K, N, G))] = (float(entry[0]), float(entry[1]))
            if entry[1] < entry[0]:
                apart_sets[kind].add((K, N, G))
            else:
                apart_sets[kind].discard((K, N, G))
    if wrote and use_cache:
        _write_cache(path, cache)
    return times


def tune_model(model, device, dtype: torch.dtype) -> Optional[str]:
    """Tune the one-row tiles for every W4A16 layer shape of ``model`` and pick the layout its decode
    steps run fastest from (None where RAYLM_W4A16_TUNE=0 or it has no W4A16 layers)."""
    if os.environ.get("RAYLM_W4A16_TUNE", "1") == "0":
        return None
    from ..layers.awq_linear import AwqLinear
    counts: Dict[Tuple[int, int, int], int] = {}
    made: Dict[str, set] = {"gated": set(), "normed": set()}  # products that make their own input
    for name, m in model.named_modules():
        if isinstance(m, AwqLinear):
            shape = (m.in_features, m.out_features, m.group_size)
            counts[shape] = counts.get(shape, 0) + 1
            if name.endswith("mlp.down"):
                made["gated"].add(shape)
            elif name.endswith(("attn.qkv", "mlp.gate_up")):
                made["normed"].add(shape)
    if not counts:
        return None
    chosen = tune(counts, device, dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the timing's random weights and references, before the KV cache is sized
    layout = pick_layout(chosen, counts)
    kp, tc = layout_totals(chosen, counts)
    logger.info("W4A16 layout: %s (one-row products per step: K-packed %.0f us, AutoAWQ layout on tensor cores "
                "%s)", layout, kp, "not timed" if tc is None else f"{tc:.0f} us")
    if any(getattr(layer, "reduce", None) is not None for layer in getattr(model, "layers", ())):
        return layout  # tensor parallel: the layers run unfused, no product makes its own input
    what = {"gated": "SiLU-mul", "normed": "RMSNorm"}
    for (kind, (K, N, _)), (inside, apart) in tune_inputs(made, device, dtype, layout).items():
        logger.info("W4A16 %dx%d: %s %s (%.1f us inside the product, %.1f us apart)", K, N, what[kind],
                    "inside the product" if inside <= apart else "in its own kernel", inside, apart)
    return layout
