"""float32 CPU products on SmolLM2-135M's layer shapes: MKL (torch.mm on the plain weight), oneDNN on its
packed weight, our panel products (cpu_gemm's native backend), and where AMX is there the bf16x3 tile
products of matmul_precision="high" (16+ tokens), at decode and prefill token counts.

Weights are cold, as in a decode step: one random copy per layer (30), the whole set far beyond the L3 cache,
walked in turn; the LM head is one copy. Each backend's pass over the set is timed in turns with the others,
and the median over the repeats is reported.

    python bench/cpu_gemm.py [--tokens 1,4,8,16,32,64,512] [--repeats 7] [--no-doc]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cold_pass_medians, machine_description, save_json, write_section  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 + 2 * 3 heads of 64; [out, in] and how many the model has
SHAPES = [("qkv", (960, 576), 30), ("o", (576, 576), 30), ("gate_up", (3072, 576), 30),
          ("down", (576, 1536), 30), ("lm_head", (49152, 576), 1)]


def measure(tokens, repeats):
    import torch

    from engine.kernels import cpu_gemm
    backends = ["mkl"] + [b for b in ("onednn", "native") if cpu_gemm.backend_available(b)]
    if cpu_gemm.x3_available():
        backends.append("bf16x3")
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k), copies in SHAPES:
        weights = [torch.randn(n, k, generator=g) for _ in range(copies)]
        packed = {b: [cpu_gemm.pack(w, b) for w in weights] for b in backends if b not in ("mkl", "bf16x3")}
        if "bf16x3" in backends:
            packed["bf16x3"] = [cpu_gemm.pack(w, "native") for w in weights]
            for pk, w in zip(packed["bf16x3"], weights):
                pk.x3 = cpu_gemm.X3Weight(w)
        for m in tokens:
            x = torch.randn(m, k, generator=g)
            xt = x.t().contiguous()
            fns = {"mkl": lambda i: torch.mm(weights[i], xt)}
            for b in packed:
                if b != "bf16x3" or m >= cpu_gemm.x3_min_rows():
                    fns[b] = (lambda ps: lambda i: cpu_gemm.linear(x, ps[i], None))(packed[b])
            row = {"shape": name, "out": n, "in": k, "tokens": m}
            for b, med in cold_pass_medians(fns, copies, repeats).items():
                row[f"{b}_us"] = med * 1e6
                row[f"{b}_gflops"] = 2 * m * n * k / med / 1e9
            rows.append(row)
            print(f"{name:8s} {n:5d}x{k:<5d} M={m:<4d} " + "  ".join(
                f"{b} {row[f'{b}_us']:8.0f} us ({row[f'{b}_gflops']:5.0f} GFLOP/s)" for b in fns), flush=True)
    return backends, rows


def table(backends, rows, repeats) -> str:
    head = "| product | out x in | tokens | " + " | ".join(f"{b} (us)" for b in backends)
    if "native" in backends and "onednn" in backends:
        head += " | native / oneDNN speed-up"
    lines = [head + " |", "|" + "---|" * head.count("|")]
    for r in rows:
        cells = [r["shape"], f"{r['out']}x{r['in']}", str(r["tokens"])]
        cells += [f"{r[f'{b}_us']:.0f} ({r[f'{b}_gflops']:.0f} GFLOP/s)" if f"{b}_us" in r else "–" for b in backends]
        if "native" in backends and "onednn" in backends:
            cells.append(f"{r['onednn_us'] / r['native_us']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        "## CPU float32 products, SmolLM2's shapes (`bench/cpu_gemm.py`)", "",
        f"Machine: {machine_description()}. Weights cold (one random copy per layer, walked in turn; the LM head "
        f"one copy); microseconds per product, median of {repeats} passes, backends timed in turns. mkl: torch.mm on "
        "the plain weight (W @ x^T); onednn: torch's mkldnn linear on its packed weight; native: our panel "
        "products (csrc/cpu_kernels.c), which the engine picks at start when they are the fastest; bf16x3: the "
        "panels' bf16x3 copy on AMX tiles (csrc/amx_bf16x3.c, matmul_precision=high, 16+ tokens).", "",
        *lines])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,8,16,32,64,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    import torch
    print(f"machine: {machine_description()}, {torch.get_num_threads()} threads", flush=True)
    backends, rows = measure([int(t) for t in a.tokens.split(",")], a.repeats)
    body = table(backends, rows, a.repeats)
    print(body)
    if not a.no_doc:
        save_json("cpu_gemm", {"machine": machine_description(), "backends": backends, "rows": rows})
        write_section("cpu_gemm", body)


if __name__ == "__main__":
    main()
