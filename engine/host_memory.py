"""Keep freed host memory in the process instead of handing it back to the kernel (glibc malloc, Linux).

A prefill step on CPU allocates tens of MB per layer product (a 2048-token gate/up output is 25 MiB). glibc
serves blocks that large with fresh mmap pages and gives them back on free, or trims the heap top, so every
layer of every step faults in and zeroes its buffers again: prefilling 64 prompts of 128 tokens on the 2-core
EPYC took 170k-350k page faults, and 29% of a perf profile's samples were the kernel clearing pages. With the
mmap threshold at glibc's largest (32 MiB) and trimming only past 2 GiB free, the same buffers come back from
the heap with no faults. The cost: the heap keeps its high-water mark (about one step's buffers).

``RAYLM_KEEP_FREED_MEMORY=0`` leaves malloc's defaults alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim the heap top only past 2 GiB free
_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took them."""
    global _done
    if _done:
        return True
    if os.environ.get("RAYLM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        _done = True
        logger.info("host memory: malloc keeps freed blocks up to %d MiB in the heap (no mmap per buffer, no trimming)",
                    MMAP_THRESHOLD >> 20)
    return ok
