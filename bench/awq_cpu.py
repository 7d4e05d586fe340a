"""W4A16 on CPU: the native 4-bit products (engine/kernels/w4_cpu.py) against float32, on SmolLM2-135M.

1. Products on SmolLM2's layer shapes, weights cold (30 random copies per shape walked in turn, as a decode
   step walks the layers): the 4-bit panels (group size 64) against the float32 panel products the engine
   uses for float32 models, passes alternating, medians over the repeats.
2. The engine, offline, greedy, 128-token prompts and 128 new tokens: the float32 model against a W4A16
   checkpoint of it (quant_jobs auto_awq, group size 64; RTN unless --checkpoint names another: the format,
   not the rounding, sets the speed), runs alternating between the two engines in this process. With
   --llama-python (an interpreter with llama-cpp-python), llama.cpp on the embedded Q4_1 GGUF too, batch 1.
   Beside them, our engine on that GGUF's own Q4_1 blocks (gguf_weights="native", group size 32): the same
   weights as llama.cpp's.

    python bench/awq_cpu.py [--repeats 3] [--checkpoint DIR] [--llama-python PY] [--no-doc]
    python bench/awq_cpu.py --render bench/results/awq_cpu.json     # table and docs/awq_cpu.png again
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (ROOT, PeerSession, cold_pass_medians, held_weight_bytes, machine_description,  # noqa: E402
                          publish, pyplot, save_figure)

SHAPES = [("qkv", (960, 576)), ("o", (576, 576)), ("gate_up", (3072, 576)), ("down", (576, 1536))]
TOKENS = (1, 4, 16, 64, 256)
COPIES = 30
GROUP = 64
# (prompt tokens, new tokens, batch cap, prompts)
GGUF_NATIVE = "Q4_1 GGUF (native)"  # our engine on the embedded file's own blocks
RUNS = [(128, 128, 1, 2), (128, 128, 8, 16), (128, 128, 32, 32)]


def kernels(repeats: int) -> list:
    import torch

    from engine.kernels import cpu_gemm, w4_cpu
    from engine.kernels.awq_torch import pack_columns
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES:
        w4, f32 = [], []
        for _ in range(COPIES):
            q = torch.randint(0, 16, (k, n), generator=g)
            z = torch.randint(0, 16, (k // GROUP, n), generator=g)
            s = (torch.rand(k // GROUP, n, generator=g) * 0.02).half()
            w4.append(w4_cpu.W4Panels.from_awq(pack_columns(q), pack_columns(z), s))
            f32.append(cpu_gemm.Panels(torch.randn(n, k, generator=g)))
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            fns = {"w4": lambda i: w4_cpu.linear(x, w4[i], None), "f32": lambda i: cpu_gemm.linear(x, f32[i], None)}
            row = {"shape": name, "out": n, "in": k, "tokens": m,
                   **{f"{b}_us": t * 1e6 for b, t in cold_pass_medians(fns, COPIES, repeats).items()}}
            rows.append(row)
            print(f"  {name} {n}x{k} M={m}: w4 {row['w4_us']:.0f} us, float32 {row['f32_us']:.0f} us", flush=True)
    return rows


def checkpoint(path: str) -> str:
    if path:
        return path
    from engine.default_model import cache_root
    work = cache_root() / "bench" / f"smollm2-w4g{GROUP}-rtn"
    if not (work / "quantized" / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "quant_jobs", "auto_awq", "--rtn", "--w-group-size", str(GROUP), "--no-parallel",
               "--work-dir", str(work), "--calib-samples", "2", "--calib-seqlen", "64"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return str(work / "quantized")


def engines(ckpt: str, repeats: int, llama_python: str) -> dict:
    from bench.common import token_prompts
    from bench.offline_throughput import ours
    from engine.default_model import embedded_gguf_path
    from engine.llm_engine import LLMEngine
    engs = {"float32": LLMEngine(max_batch_size=32), "W4A16": LLMEngine(model=ckpt, max_batch_size=32),
            GGUF_NATIVE: LLMEngine(gguf_weights="native", max_batch_size=32)}
    info = {name: {"weights_MiB": held_weight_bytes(e.model) / 2**20} for name, e in engs.items()}
    prompts = token_prompts(engs["float32"].tokenizer, max(r[3] for r in RUNS), RUNS[0][0])
    peer = None
    if llama_python:
        pf = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(prompts, pf)
        pf.close()
        import torch
        peer = PeerSession(llama_python, Path(__file__).parent / "peers" / "llama_offline.py",
                           [str(embedded_gguf_path()), pf.name, str(RUNS[0][1]), str(torch.get_num_threads())], {})
    rows = []
    for prompt_len, new, cap, n in RUNS:
        got = {}
        for _ in range(repeats):
            for name, eng in engs.items():
                rates, decode_rates, _ = ours(eng, prompts[:n], new, cap, 1)
                got.setdefault(name, []).append((rates[0], decode_rates[0]))
            if peer is not None and cap == 1:
                got.setdefault("llama.cpp Q4_1", []).append((peer.ask(str(n))["tokens_per_s"], None))
        for name, rs in got.items():
            rows.append({"prompt": prompt_len, "new": new, "cap": cap, "prompts": n, "engine": name,
                         "tokens_per_s": statistics.median(r[0] for r in rs),
                         "decode_tokens_per_s": None if rs[0][1] is None else statistics.median(r[1] for r in rs),
                         "runs": rs})
            d = rows[-1]["decode_tokens_per_s"]
            print(f"  {prompt_len}+{new} cap {cap} {name}: {rows[-1]['tokens_per_s']:.1f} tok/s"
                  + (f" (decode-only steps {d:.1f})" if d else ""), flush=True)
    if peer is not None:
        peer.close()
        os.unlink(pf.name)
    return {"engines": info, "rows": rows}


def render(res) -> str:
    out = ["## W4A16 on CPU, SmolLM2-135M-Instruct (`bench/awq_cpu.py`)", "",
           f"Machine: {res['machine']}. W4A16: an AWQ checkpoint, group size {GROUP}; {GGUF_NATIVE}: the embedded "
           "GGUF's Q4_1 blocks (group size 32, float minimums) on the same kernels.", "",
           f"Products, weights cold ({COPIES} copies per shape walked in turn); microseconds per call, medians of "
           f"{res['kernel_passes']} passes:", "",
           "| shape (out x in) | tokens | 4-bit panels (us) | float32 panels (us) | 4-bit / float32 speed |",
           "|---|---|---|---|---|"]
    for r in res["kernels"]:
        out.append(f"| {r['shape']} {r['out']}x{r['in']} | {r['tokens']} | {r['w4_us']:.0f} | {r['f32_us']:.0f} | "
                   f"{r['f32_us'] / r['w4_us']:.2f}x |")
    e = res["engine"]
    w = ", ".join(f"{n} {v['weights_MiB']:.0f} MiB" for n, v in e["engines"].items())
    out += ["", f"Offline, greedy, output tokens/s (medians of {res['repeats']} runs, the engines alternating); "
            f"weights held: {w}:", "",
            "| prompt + new tokens | batch cap (prompts) | engine | tok/s | decode-only steps tok/s | vs float32 |",
            "|---|---|---|---|---|---|"]
    base = {(r["prompt"], r["cap"]): r["tokens_per_s"] for r in e["rows"] if r["engine"] == "float32"}
    for r in e["rows"]:
        d = "" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}"
        out.append(f"| {r['prompt']} + {r['new']} | {r['cap']} ({r['prompts']}) | {r['engine']} | "
                   f"{r['tokens_per_s']:.1f} | {d} | {r['tokens_per_s'] / base[(r['prompt'], r['cap'])]:.2f}x |")
    return "\n".join(out)


def plot(res) -> None:
    """docs/awq_cpu.png: the products' speed against float32 by token count, and the engine's tok/s by cap."""
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, _ in SHAPES:
        pts = [(r["tokens"], r["f32_us"] / r["w4_us"]) for r in res["kernels"] if r["shape"] == name]
        if pts:
            left.plot(*zip(*pts), marker="o", label=name)
    left.axhline(1.0, ls="--", color="gray")
    left.set_xscale("log", base=2)
    left.set_xlabel("token rows")
    left.set_ylabel("4-bit / float32 speed (weights cold)")
    left.set_title("products, SmolLM2 shapes")
    left.legend()
    for engine, style in (("float32", "o-"), ("W4A16", "s-"), (GGUF_NATIVE, "d-"), ("llama.cpp Q4_1", "^")):
        pts = [(r["cap"], r["tokens_per_s"]) for r in res["engine"]["rows"] if r["engine"] == engine]
        if pts:
            right.plot(*zip(*pts), style, label=engine, markersize=8)
    right.set_xscale("log", base=2)
    right.set_xlabel("batch cap")
    right.set_ylabel("output tokens/s")
    right.set_title("engine offline, 128 + 128 tokens")
    right.legend()
    fig.suptitle("W4A16 on CPU, SmolLM2-135M: " + res["machine"].split(", 24")[0].replace(", AVX-512", ""))
    fig.tight_layout()
    save_figure(fig, "awq_cpu.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default="", help="a W4A16 checkpoint of SmolLM2 (default: RTN, made once)")
    ap.add_argument("--llama-python", default="", help="interpreter of a venv with llama-cpp-python")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="only redraw the table and plot from a results file")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        publish("awq_cpu", res, render(res), not args.no_doc)
        plot(res)
        return 0
    from engine.kernels import w4_cpu
    if not w4_cpu.available():
        print("the native 4-bit products need AVX-512 or AVX2 and FMA, and a C compiler", file=sys.stderr)
        return 1
    res = {"machine": machine_description(), "repeats": args.repeats}
    res["kernel_passes"] = args.repeats * 3
    res["kernels"] = [] if args.skip_kernels else kernels(res["kernel_passes"])
    res["engine"] = engines(checkpoint(args.checkpoint), args.repeats, args.llama_python)
    publish("awq_cpu", res, render(res), not args.no_doc)
    plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
