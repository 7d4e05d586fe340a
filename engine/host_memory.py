"""Keep freed host memory in the process instead of handing it back to the kernel (glibc malloc, Linux).

A prefill step on CPU allocates tens of MB per layer product (a 2048-token gate/up output is 25 MiB). glibc
serves blocks that large with fresh mmap pages and gives them back on free, or trims the heap top, so every
layer of every step faults in and zeroes its buffers again: prefilling 64 prompts of 128 tokens on the 2-core
EPYC took 170k-350k page faults, and 29% of a perf profile's samples were the kernel clearing pages. With the
mmap threshold at glibc's largest (32 MiB) and trimming only past 2 GiB free, the same buffers come back from
the heap with no faults. The cost: the heap keeps its high-water mark (about one step's buffers).

``RAYLM_KEEP_FREED_MEMORY=0`` leaves malloc's defaults alone.

``huge_empty`` gives the large, long-lived buffers (packed weights, the KV cache) 2 MiB pages where the kernel
has transparent huge pages in ``madvise`` mode: a float32 decode step streams every weight once, and with
4 KiB pages each 4 KiB of it costs a TLB miss. ``RAYLM_HUGE_PAGES=0`` keeps ordinary pages.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import mmap
import os
import sys

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
HUGE_PAGE = 2 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim the heap top only past 2 GiB free
_done = False


def _glibc(name: str):
    """A glibc malloc function on Linux, or None (another libc: musl has no mallopt or malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took them."""
    global _done
    if _done:
        return True
    if os.environ.get("RAYLM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        _done = True
        logger.info("host memory: malloc keeps freed blocks up to %d MiB in the heap (no mmap per buffer, no trimming)",
                    MMAP_THRESHOLD >> 20)
    return ok


def trim_heap() -> bool:
    """Hand the heap's free pages back to the system now (glibc's malloc_trim: the settings above otherwise keep
    them); for memory freed once and not needed again, such as weights a packed copy replaced."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1


def huge_pages_enabled() -> bool:
    return os.environ.get("RAYLM_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def huge_empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor starting on a 2 MiB boundary, in an anonymous mapping of its own whose
    pages are advised as huge pages before anything touches them (not from malloc, which may hand back heap
    memory already faulted in as 4 KiB pages). Below 32 MiB, with ``RAYLM_HUGE_PAGES=0``, or where the
    platform has no ``MADV_HUGEPAGE``: a plain ``torch.empty``."""
    nbytes = numel * dtype.itemsize
    if nbytes < MMAP_THRESHOLD or not huge_pages_enabled():
        return torch.empty(numel, dtype=dtype)
    # room to start on a boundary and to end the last huge page inside the mapping
    # (private: an anonymous shared mapping is shmem, whose huge pages are a separate, usually disabled switch)
    m = mmap.mmap(-1, (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        logger.debug("madvise(MADV_HUGEPAGE) refused: ordinary pages")
    raw = torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the mapping alive
    off = -raw.data_ptr() % HUGE_PAGE
    return raw[off:off + nbytes].view(dtype)


def params_to_huge_pages(model: torch.nn.Module) -> int:
    """Copy each CPU parameter of 32 MiB or more (an embedding, an LM head) into ``huge_empty`` memory;
    returns how many moved. Tied parameters are one object and move once."""
    if not huge_pages_enabled():
        return 0
    moved = 0
    for p in model.parameters():
        if p.device.type == "cpu" and p.is_contiguous() and p.numel() * p.element_size() >= MMAP_THRESHOLD:
            p.data = huge_empty(p.numel(), p.dtype).view(p.shape).copy_(p.data)
            moved += 1
    if moved:  # the loader's leftovers hold the old copies in reference cycles: without this the model's
        gc.collect()  # embedding stayed resident twice until the collector's next run (measured +111 MiB)
    return moved
