"""Serving one GGUF file over HTTP: our endpoint on the embedded Q4_1 file's own 4-bit blocks
(``gguf_weights: native``) against llama.cpp's ``llama-server`` on the same file (parallel slots, continuous
batching), and our float32 endpoint (the same weights dequantized), under the same streamed load.

    python bench/serving_gguf.py --llama-server PATH [--concurrency 1,4,16] [--rounds 3] [--no-doc]
    python bench/serving_gguf.py --render bench/results/serving_gguf.json

``llama-server`` is built from the llama.cpp sources that llama-cpp-python's sdist carries (docs/benchmarks.md
has the commands). Requests as in bench/serving.py: 128-token WikiText-2 windows as token ids, 128 output
tokens each (ignore_eos), greedy; at the largest concurrency each server runs ``--rounds`` rounds and the row
is the median round.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_description, publish, pyplot, save_figure, token_prompts  # noqa: E402
from bench.serving import MODEL, ours, wait_ready  # noqa: E402
from bench.serving_client import run_load  # noqa: E402

SERVERS = (("ours_native", "ours, Q4_1 blocks (gguf_weights: native)"),
           ("llama_server", "llama.cpp llama-server, Q4_1"),
           ("ours_float32", "ours, float32 (dequantized)"))


def levels(url: str, prompts, a) -> list:
    """Every concurrency ``a.rounds`` times (c1 with ``a.small_requests`` requests, else at least 2c); each
    row is the median round, with the rounds' rates beside it."""
    import asyncio
    rows = []
    asyncio.run(run_load(url, MODEL, prompts[-2:], 4, 2))  # warm-up, on prompts no round sends
    for c in a.conc:
        n = max(a.min_requests, 2 * c) if c > 1 else a.small_requests
        # each round its own prompts: a server that caches prompts gains nothing from an earlier round
        runs = [asyncio.run(run_load(url, MODEL, prompts[i * n:(i + 1) * n], a.new_tokens, c))
                for i in range(a.rounds)]
        r = sorted(runs, key=lambda x: x["output_tokens_per_s"])[len(runs) // 2]
        r["rounds"] = [x["output_tokens_per_s"] for x in runs]
        print(f"  concurrency {c:>3}: {', '.join(f'{x:.1f}' for x in r['rounds'])} tok/s; median round TTFT "
              f"{r['ttft']['median']:.2f} s, TPOT {r['tpot']['median'] * 1e3:.1f} ms", flush=True)
        rows.append(r)
    return rows


def llama_server(binary: str, gguf: Path, prompts, a) -> list:
    slots = max(a.conc)
    port = a.port + 2
    cmd = [binary, "-m", str(gguf), "--alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(a.threads), "-tb", str(a.threads), "-np", str(slots),
           "-c", str(slots * (a.prompt_len + a.new_tokens + 64)), "--threads-http", str(2 * slots + 4),
           "--no-cache-prompt"]  # like ours (prefix caching off); every round's prompts are new anyway
    proc = subprocess.Popen(cmd, stdout=open("/tmp/llama-server-bench.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300, proc)
        return levels(f"http://127.0.0.1:{port}", prompts, a)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def render(res) -> str:
    args = res["args"]
    lines = ["## Serving one GGUF file: ours against llama.cpp's server (`bench/serving_gguf.py`)", "",
             f"Machine: {res['machine']}. The embedded SmolLM2-135M-Instruct Q4_1 file. Streaming "
             f"`/v1/completions`, {args['prompt_len']}-token prompts as token ids, {args['new_tokens']} output tokens "
             f"each, greedy, the same client for every server; llama-server ({res.get('llama_version', '?')}) with "
             f"{max(args['conc'])} parallel slots and {args['threads']} threads; ours through `serve run`, one "
             f"replica. Each server ran {args['rounds']} rounds at each concurrency, one after another (the row is "
             "the median round; the rounds' rates beside it).", "",
             "| server | concurrency | requests | output tok/s | rounds | vs llama-server | TTFT median (s) | "
             "TPOT median (ms) | failed |", "|---|---|---|---|---|---|---|---|---|"]
    base = {r["concurrency"]: r["output_tokens_per_s"] for r in res.get("llama_server") or []}
    for key, name in SERVERS:
        for r in res.get(key) or []:
            rate, b = r["output_tokens_per_s"], base.get(r["concurrency"])
            ratio = f"{rate / b:.2f}x" if b else ""
            rounds = ", ".join(f"{x:.0f}" for x in r.get("rounds", [rate]))
            lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {rate:.1f} | {rounds} | {ratio} | "
                         f"{r['ttft']['median']:.2f} | {r['tpot']['median'] * 1e3:.0f} | {r['failed']} |")
    return "\n".join(lines)


def plot(res) -> None:
    """docs/serving_gguf.png: output tokens/s by concurrency for each server."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, name), style in zip(SERVERS, ("o-", "^-", "s--")):
        rows = res.get(key) or []
        if rows:
            ax.plot([r["concurrency"] for r in rows], [r["output_tokens_per_s"] for r in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s (median round)")
    ax.set_title("SmolLM2-135M Q4_1 GGUF over HTTP\n" + res["machine"].split(", 24")[0], fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, "serving_gguf.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", default="", help="a llama-server binary")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-requests", type=int, default=32, help="requests per level (at least 2x concurrency)")
    ap.add_argument("--small-requests", type=int, default=6, help="requests at concurrency 1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--port", type=int, default=8330)
    ap.add_argument("--skip-float32", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", metavar="JSON")
    cli = ap.parse_args()
    if cli.render:
        res = json.loads(Path(cli.render).read_text())
        publish("serving_gguf", res, render(res), not cli.no_doc)
        plot(res)
        return 0
    from transformers import AutoTokenizer

    from engine.default_model import default_model_dir, embedded_gguf_path
    conc = [int(c) for c in cli.concurrency.split(",")]
    a = SimpleNamespace(**vars(cli), conc=conc)
    prompts = token_prompts(AutoTokenizer.from_pretrained(str(default_model_dir())),
                            a.rounds * max(a.min_requests, 2 * max(conc)) + 2, a.prompt_len)
    res = {"machine": machine_description(), "args": {**vars(cli), "conc": conc}}
    print("ours, gguf_weights native:", flush=True)
    res["ours_native"] = ours(prompts, a, engine_extra={"gguf_weights": "native"}, measure=levels)
    if cli.llama_server:
        out = subprocess.run([cli.llama_server, "--version"], capture_output=True, text=True)
        res["llama_version"] = (out.stdout + out.stderr).strip().split("\n")[0].replace("version: ", "")
        print("llama-server:", flush=True)
        res["llama_server"] = llama_server(cli.llama_server, embedded_gguf_path(), prompts, a)
    if not cli.skip_float32:
        print("ours, float32:", flush=True)
        res["ours_float32"] = ours(prompts, a, measure=levels)
    publish("serving_gguf", res, render(res), not cli.no_doc)
    if not cli.no_doc:
        plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
