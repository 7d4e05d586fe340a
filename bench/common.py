"""Shared benchmark helpers: machine probes, prompt sets, medians, and writing docs/benchmarks.md sections."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DOC = ROOT / "docs" / "benchmarks.md"


def param_count(model) -> int:
    """The model's parameters as its checkpoint counts them (tied ones once): a Linear whose row-major weight
    was released on CPU (its packed panels carry the products) counts at its full size."""
    from engine.layers.linear import Linear
    seen, n = set(), 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                released = isinstance(m, Linear) and name == "weight" and m.released
                n += m.in_features * m.out_features if released else p.numel()
    return n


def held_weight_bytes(model) -> int:
    """Bytes of the weights a model holds in memory: parameters and buffers, and the packed copies of CPU
    Linears (panels, their bf16x3 copies, oneDNN's blocked layout, W4A16 layers' 4-bit panels), each storage once."""
    from engine.layers.awq_linear import AwqLinear
    from engine.layers.linear import Linear
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, AwqLinear) and m.packed is not None:  # the native CPU kernel's 4-bit panels
            tensors += [m.packed.codes, m.packed.pairs]
        if isinstance(m, Linear) and m.packed is not None:
            packed = getattr(m.packed, "data", m.packed)  # Panels hold .data; oneDNN's is the tensor itself
            tensors.append(packed)
            if getattr(m.packed, "x3", None) is not None:
                tensors.append(m.packed.x3.data)
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def machine_description() -> str:
    """Cores, CPU (with family/model and the widest vector ISA: the same "AMD EPYC" name has covered
    machines twice apart in float32 rate), memory, torch and its threads."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    cpu = info.get("model name", "unknown CPU")
    if "cpu family" in info:
        cpu += f", family {info['cpu family']} model {info.get('model', '?')}"
    flags = info.get("flags", "").split()
    if flags:
        cpu += ", AVX-512" if "avx512f" in flags else ", AVX2" if "avx2" in flags else ""
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    import torch
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def cold_pass_medians(fns: dict, copies: int, repeats: int) -> dict:
    """Seconds per call, the median over ``repeats`` passes of each ``fns[name](i)`` over i < ``copies`` (the
    weight copies walked in turn, so that they come cold from memory), the functions' passes alternating;
    one more pass first warms up and is dropped."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(copies):
                fn(i)
            times[name].append((time.perf_counter() - t) / copies)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def memory_bandwidth_gbs(repeats: int = 9) -> float:
    """Read bandwidth over 1 GiB of float32: the best of ``repeats`` passes of each of torch's sum and the
    native skinny product at one token (a weight stream, what batch-1 decoding does), each over ordinary
    pages and over huge pages (engine.host_memory.huge_empty, which the engine's weights use). A bound is
    what the machine can do: the best pass, not the median (this host's bandwidth drifts by 2x over minutes)."""
    import torch

    from engine.host_memory import huge_empty
    from engine.kernels import cpu_native
    best = 0.0
    for make in (lambda: torch.ones(2**28), lambda: huge_empty(2**28).fill_(1.0)):
        x = make()
        readers = [lambda: x.sum()]
        w, v = x.view(2**15, 2**13), torch.ones(1, 2**13)
        if cpu_native.lib() is not None:
            readers.append(lambda: cpu_native.skinny_linear_t(v, w, None))
        best = max([best] + [best_read_gbs(read, x.numel() * 4, repeats) for read in readers])
        del x, w, readers  # one GiB at a time
    return best


def best_read_gbs(read: Callable[[], object], nbytes: int, passes: int, warm: bool = True) -> float:
    """GB/s of the fastest of ``passes`` calls of ``read`` over ``nbytes`` (after one untimed call when warm)."""
    if warm:
        read()
    best = 0.0
    for _ in range(passes):
        t = time.perf_counter()
        read()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matmul rate on all threads (median): the best of MKL (torch's ``@``), oneDNN and our panel
    products on a packed weight (what the engine may use; on AMD processors MKL keeps to AVX2), so the bound
    is the machine's, not one library's."""
    import torch

    from engine.kernels import cpu_gemm
    a, b = torch.randn(n, n), torch.randn(n, n)
    products = [lambda: a @ b]
    for backend in ("onednn", "native"):
        if cpu_gemm.backend_available(backend):
            products.append((lambda p: lambda: cpu_gemm.linear(a, p, None))(cpu_gemm.pack(b, backend)))
    rates = []
    for product in products:
        def once():
            t = time.perf_counter()
            product()
            return 2 * n ** 3 / (time.perf_counter() - t) / 1e9
        once()
        rates.append(median_of(once, repeats))
    return max(rates)


def token_prompts(tokenizer, n: int, length: int) -> List[List[int]]:
    """n prompts of exactly ``length`` tokens cut from WikiText-2 train (never the test split)."""
    src = SHARED / "wikitext2" / "wiki.train.first1MB.txt"
    text = src.read_text(encoding="utf-8")[: 4 * n * length * 8]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n * length:
        raise ValueError("not enough calibration text for the prompt set")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def write_section(name: str, body: str) -> None:
    """Replace the section between markers for ``name`` in docs/benchmarks.md (atomic write)."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEvery figure here was measured by a script in `bench/`; medians over repeats.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=DOC.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, DOC)


def save_json(name: str, data) -> Path:
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, out)
    return out


def publish(name: str, data, table: str, doc: bool = True, section: str = "") -> None:
    """A bench's end: its results as bench/results/<name>.json, its table printed and (``doc``) written into
    docs/benchmarks.md's section (``section``, default the name)."""
    save_json(name, data)
    print(table)
    if doc:
        write_section(section or name, table)


class PeerSession:
    """A peer's script kept running in its own interpreter and asked for one measurement at a time, so that
    its runs can alternate with ours (this host drifts over minutes). The script prints a JSON line when
    ready and one JSON line per request line it reads; it ends at end of input."""

    def __init__(self, python: str, script: Path, args: List[str], env: dict):
        self.name = script.name
        self.log = tempfile.TemporaryFile("w+")  # its stderr (a pipe nobody reads could fill and block it)
        self.proc = subprocess.Popen([python, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, **env})
        self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        self.log.seek(0)
        err = self.log.read()
        raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{err[-3000:]}")

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_peer(python: str, script: Path, args: List[str], env: dict, timeout: int) -> dict:
    """Run a peer's script in its own interpreter; it prints one JSON line last."""
    p = subprocess.run([python, str(script), *args], capture_output=True, text=True, env={**os.environ, **env},
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{p.stderr[-3000:]}")
    for line in reversed(p.stdout.strip().splitlines()):  # the peer may log after its result line
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{script.name} printed no JSON result:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (no plot then)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, name: str, dpi: int = 100) -> None:
    """docs/<name>, written under a temporary name first."""
    out = ROOT / "docs" / name
    fig.savefig(out.with_suffix(".tmp.png"), dpi=dpi)
    os.replace(out.with_suffix(".tmp.png"), out)
