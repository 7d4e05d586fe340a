"""Native CPU kernels (csrc/cpu_kernels.c, amx_bf16x3.c, greedy_head.c, w4_panels.c), compiled once per machine with
the system C compiler.

The build is cached under ``$RAYLM_CACHE/kernels`` (default ``~/.cache/raylm/kernels``), keyed by the
source, the compiler and the CPU, and written to a temporary name then renamed. Without a compiler, or
with ``RAYLM_NATIVE_KERNELS=0``, ``lib()`` returns None and callers use their torch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SRCS = [CSRC / "cpu_kernels.c", CSRC / "amx_bf16x3.c", CSRC / "greedy_head.c", CSRC / "w4_panels.c"]
HEADERS = [CSRC / "amx_bf16x3.h", CSRC / "greedy_head.h", CSRC / "w4_panels.h", CSRC / "tile_store.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MAX_GROUP = 64  # query heads per KV head the decode kernel supports

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def _cache_dir() -> Path:
    root = os.environ.get("RAYLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raylm")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    text = "".join(f.read_text() for f in SRCS + HEADERS)
    key = hashlib.sha256((text + version + " ".join(FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, *map(str, SRCS), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled native CPU kernels to %s", out)
    return out


def lib() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, or None when native kernels are off or cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("RAYLM_NATIVE_KERNELS", "1") == "0":
            return None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log.warning("no C compiler found: native CPU kernels off, using the torch paths")
            return None
        try:
            path = _build(cc)
            so = ctypes.CDLL(str(path))  # torch is imported, so its OpenMP runtime is the one shared
        except (OSError, RuntimeError) as e:
            log.warning("native CPU kernels unavailable (%s): using the torch paths", e)
            return None
        so.skinny_linear.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
        so.skinny_linear.restype = None
        so.paged_decode.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _I]
        so.paged_decode.restype = None
        so.decode_layer.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _F, _P, _I, _P, _P, _I]
        so.decode_layer.restype = None
        so.decode_layers_split.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _F, _P, _I, _I, _P, _P, _I]
        so.decode_layers_split.restype = None
        so.kvq_quantize.argtypes = [_P, _I, _I, _I, _P, _P]
        so.kvq_quantize.restype = None
        so.hy_add_norm.argtypes = [_P, _P, _P, _P, _I, _I, _F, _I]
        so.hy_add_norm.restype = None
        so.hy_attention.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, _I, _P, _P, _I]
        so.hy_attention.restype = None
        so.hy_silu_mul.argtypes = [_P, _P, _I, _I, _I]
        so.hy_silu_mul.restype = None
        so.tm_add_norm.argtypes = [_P, _P, _P, _P, _I, _I, _F, _I]
        so.tm_add_norm.restype = None
        so.tm_silu_mul.argtypes = [_P, _P, _I, _I, _I]
        so.tm_silu_mul.restype = None
        so.tm_attention.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _P, _I, _P, _P, _I]
        so.tm_attention.restype = None
        so.panel_linear.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
        so.panel_linear.restype = None
        so.panel_available.argtypes = []
        so.panel_available.restype = _I
        so.panel_steals.argtypes = []
        so.panel_steals.restype = ctypes.c_int64
        so.x3_available.argtypes = []
        so.x3_available.restype = _I
        so.x3_min_rows.argtypes = []
        so.x3_min_rows.restype = _I
        so.x3_packed_elems.argtypes = [_I, _I]
        so.x3_packed_elems.restype = ctypes.c_int64
        so.x3_pack.argtypes = [_P, _P, _I, _I, _I]
        so.x3_pack.restype = None
        so.x3_linear.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I]
        so.x3_linear.restype = None
        so.panel_columns.argtypes = [_P, _P, _I, _I, _P, _I, _P, _I]
        so.panel_columns.restype = None
        so.gh_available.argtypes = []
        so.gh_available.restype = _I
        so.gh_packed_bytes.argtypes = [_I, _I]
        so.gh_packed_bytes.restype = ctypes.c_int64
        so.gh_meta_floats.argtypes = [_I, _I]
        so.gh_meta_floats.restype = ctypes.c_int64
        so.gh_pack.argtypes = [_P, _I, _I, _P, _P, _I]
        so.gh_pack.restype = _I
        so.gh_greedy.argtypes = [_P, _I, _I, _I, _P, _P, _P, _I, _P, _I]
        so.gh_greedy.restype = _I
        so.w4_available.argtypes = []
        so.w4_available.restype = _I
        so.w4_block.argtypes = []
        so.w4_block.restype = _I
        so.w4_linear.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I]
        so.w4_linear.restype = None
        _lib = so
        return _lib


def panels_available() -> bool:
    """Whether the panel products (panel_linear, AVX-512 builds only) are there."""
    so = lib()
    return so is not None and bool(so.panel_available())


def panel_steals() -> int:
    """Tiles the panel products' threads have taken from each other's ranges since the library loaded."""
    so = lib()
    return 0 if so is None else int(so.panel_steals())


def _ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def skinny_linear_t(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x [M, K] @ w[N, K]^T (+ b) as y^T [N, M] (contiguous), or None when the kernel cannot take it."""
    so = lib()
    if so is None or not (_ok(x) and _ok(w) and (b is None or _ok(b))):
        return None
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(N, M, dtype=torch.float32)
    so.skinny_linear(x.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                     M, N, K, torch.get_num_threads())
    return y


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """q [B, H, D]; caches [num_blocks, KVH, block_size, D]; int32 block_tables [B, nb] and ctx_lens [B].

    Returns [B, H, D], or None when the kernel cannot take these tensors.
    """
    so = lib()
    B, H, D = q.shape
    _, kvh, bs, _ = k_cache.shape
    if (so is None or H // kvh > MAX_GROUP or not all(_ok(t) for t in (q, k_cache, v_cache))
            or block_tables.dtype != torch.int32 or ctx_lens.dtype != torch.int32
            or not block_tables.is_contiguous() or not ctx_lens.is_contiguous()):
        return None
    out = torch.empty_like(q)
    so.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                    ctx_lens.data_ptr(), out.data_ptr(), B, H, kvh, D, bs, block_tables.shape[1], scale,
                    torch.get_num_threads())
    return out


def native_decode(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """``Attention.decode_fn`` for CPU: the native kernel, or the torch path when it cannot run."""
    out = paged_decode(q.contiguous(), k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale)
    if out is None:
        from ..layers.attention import torch_decode
        return torch_decode(q, k_cache, v_cache, meta, scale)
    return out
