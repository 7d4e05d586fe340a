"""The glibc tuning keeps a freed large block for reuse: touching a same-size tensor again faults no pages."""
import resource
import sys

import pytest
import torch

from engine.kernels import cpu_alloc

MB = 24  # beyond glibc's default mmap threshold, like a 2048-token step's gate/up output


def _faults_of_a_fresh_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(MB << 18, dtype=torch.float32).fill_(1.0)  # MB MiB, every page touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults(monkeypatch):
    monkeypatch.setattr(cpu_alloc, "_done", False)
    monkeypatch.delenv(cpu_alloc.ENV, raising=False)
    if not cpu_alloc.keep_freed_memory():
        pytest.skip("not glibc")
    _faults_of_a_fresh_block()  # the first one grows the heap
    pages = (MB << 20) // resource.getpagesize()
    assert _faults_of_a_fresh_block() < pages // 20  # an mmapped block would fault in all of its pages


def test_opt_out_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_alloc, "_done", False)
    monkeypatch.setenv(cpu_alloc.ENV, "0")
    assert cpu_alloc.keep_freed_memory() is False
