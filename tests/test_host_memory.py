"""engine.host_memory: a prefill step's large buffers come back from the heap instead of fresh pages.

The oracle is the kernel's own count of minor page faults (getrusage) for the same allocation pattern run
in two fresh interpreters, with malloc's defaults and with the engine's settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIZES = [2048 * 3072, 2048 * 1536, 2048 * 960, 2048 * 576]  # one prefill layer's outputs (floats)
SCRIPT = r"""
import json, resource, sys, torch
from engine.host_memory import keep_freed_memory
applied = keep_freed_memory()
sizes = json.loads(sys.argv[1])
for _ in range(2):
    bufs = [torch.ones(n) for n in sizes]
    del bufs
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    for n in sizes:
        a, b = torch.ones(n), torch.ones(n)
        del a, b
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _run(keep: str) -> dict:
    env = {**os.environ, "RAYLM_KEEP_FREED_MEMORY": keep, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SIZES)], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    default, kept = _run("0"), _run("1")
    assert default["applied"] is False and kept["applied"] is True
    pages = 10 * 2 * sum(SIZES) * 4 // 4096  # touched per pass
    assert default["faults"] > pages // 4  # malloc's defaults hand these blocks back and fault them in again
    assert kept["faults"] < default["faults"] // 5
