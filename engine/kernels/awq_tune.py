"""Per-shape choice of the W4A16 one-row (decode) kernel's tile, made once per device and cached on disk.

The fastest tile of ``kpack_gemv`` depends on the shape and the GPU (how many SMs, how much bandwidth), as
it does for every Triton GEMV; so, as Triton's autotuner does, each candidate is timed on each of the
model's layer shapes and the fastest is kept. A candidate whose output strays from the dequantized torch
product is dropped. Timings are GPU times of a CUDA graph of repeated calls (launch cost from Python is not
in them); on CPU (the interpreter) wall time.

The choices go to ``awq_triton.KPACK_GEMV_TILES`` and to ``$RAYLM_CACHE/w4a16_tiles.json`` keyed by device,
Triton version, shape and dtype, so later starts skip the timing. ``RAYLM_W4A16_TUNE=0`` turns it off (the
default tile is used).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .awq_triton import KPACK_GEMV_TILE, KPACK_GEMV_TILES, GemvTile, gemv_plan, kpack_gemv

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


def graph_time(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    """Median seconds per call of fn: on CUDA, ``calls`` calls captured in a graph, replayed ``replays``
    times; elsewhere the wall time of one call."""
    fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
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


def _random_kpack(K: int, N: int, G: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qk = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // 8, N), generator=g, dtype=torch.int32).to(device)
    zk = torch.randint(0, 16, (K // G, N), generator=g).to(device=device, dtype=torch.float16)
    s = (torch.rand(K // G, N, generator=g) * 0.01 + 0.001).to(device=device, dtype=torch.float16)
    return qk, zk, s


def time_tiles(K: int, N: int, G: int, device: torch.device, dtype: torch.dtype,
               candidates: Iterable[GemvTile] = CANDIDATES,
               timer: Callable[[Callable[[], object]], float] = graph_time) -> List[dict]:
    """Each candidate that fits the shape, timed on random weights: [{"tile", "us", "max_abs_err", "ok"}];
    "ok" is False where the output strays from the dequantized torch product (or the kernel fails)."""
    from .awq_torch import dequantize_kpack
    qk, zk, s = _random_kpack(K, N, G, device)
    x = torch.randn(1, K, generator=torch.Generator(device="cpu").manual_seed(1)).to(device=device, dtype=dtype)
    ref = x.float() @ dequantize_kpack(qk, zk, s, torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    scale = float(ref.abs().max()) + 1e-6
    rows = []
    for tile in candidates:
        try:
            gemv_plan(tile, K, N, G)
        except ValueError:
            continue
        try:
            err = float((kpack_gemv(x, qk, zk, s, tile).float() - ref).abs().max())
            us = timer(lambda: kpack_gemv(x, qk, zk, s, tile)) * 1e6
        except Exception as e:  # a tile the compiler refuses (resources): note it, go on
            logger.warning("W4A16 tile %s at %dx%d: %s: %s", tuple(tile), K, N, type(e).__name__, e)
            rows.append({"tile": list(tile), "us": float("inf"), "max_abs_err": float("nan"), "ok": False})
            continue
        rows.append({"tile": list(tile), "us": us, "max_abs_err": err, "ok": err <= tol * scale})
    return rows


def tune(shapes: Iterable[Tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
         candidates: Iterable[GemvTile] = CANDIDATES, use_cache: bool = True,
         timer: Callable[[Callable[[], object]], float] = graph_time,
         record: Optional[List[dict]] = None) -> Dict[Tuple[int, int, int], GemvTile]:
    """Pick the fastest sound tile for each (K, N, group size), from the cache where it has one; installs
    the choices in awq_triton.KPACK_GEMV_TILES and returns them. ``record`` collects every timing."""
    device = torch.device(device)
    candidates = list(candidates)
    path = cache_path()
    cache = _read_cache(path) if use_cache else {}
    dev = cache.setdefault(_device_key(device), {})
    chosen, wrote = {}, False
    for K, N, G in sorted(set(shapes)):
        key = _shape_key(K, N, G, dtype)
        tile = None
        if key in dev:
            try:
                tile = GemvTile(*dev[key])
                gemv_plan(tile, K, N, G)
            except (TypeError, ValueError):
                tile = None
        if tile is None:
            t0 = time.perf_counter()
            rows = time_tiles(K, N, G, device, dtype, candidates, timer)
            for r in rows:
                r.update(K=K, N=N, G=G)
            if record is not None:
                record.extend(rows)
            sound = [r for r in rows if r["ok"]]
            if not sound:
                logger.warning("W4A16 %s: no candidate tile ran soundly; the default stays", key)
                continue
            best = min(sound, key=lambda r: r["us"])
            tile = GemvTile(*best["tile"])
            logger.info("W4A16 %s: tile %s, %.1f us (%d tiles timed in %.1f s)", key, tuple(tile), best["us"],
                        len(rows), time.perf_counter() - t0)
            dev[key] = list(tile)
            wrote = True
        chosen[(K, N, G)] = tile
        KPACK_GEMV_TILES[(K, N, G, dtype)] = tile
    if wrote and use_cache:
        _write_cache(path, cache)
    return chosen


def tune_model(model, device, dtype: torch.dtype) -> Dict[Tuple[int, int, int], GemvTile]:
    """Tune the one-row tile for every K-packed W4A16 layer shape of ``model`` (unless RAYLM_W4A16_TUNE=0)."""
    if os.environ.get("RAYLM_W4A16_TUNE", "1") == "0":
        return {}
    from ..layers.awq_linear import AwqLinear
    shapes = {(m.in_features, m.out_features, m.group_size) for m in model.modules()
              if isinstance(m, AwqLinear) and m.kpack}
    return tune(shapes, device, dtype) if shapes else {}
