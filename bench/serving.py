"""Serving benchmark: our Ray Serve endpoint and vLLM's OpenAI server under the same HTTP load, beside
our engine's offline throughput on the same prompts, all in one run.

    python bench/serving.py [--vllm-python /tmp/vllm-venv/bin/python] [--concurrency 1,16,64]

Requests: 128-token WikiText-2 windows as token ids, 128 output tokens each (ignore_eos), streamed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_description, save_json, token_prompts, write_section  # noqa: E402
from bench.serving_client import run_load  # noqa: E402
from engine.serve.ray_env import apply_quiet_ray_env  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def offline_rates(prompts, new_tokens: int, cap: int, runs: int) -> list:
    """Our engine in this process, no server running: output tokens/s of each of ``runs`` runs."""
    from engine.generation import GenerationConfig
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    pipe = Pipeline(LLMEngine(max_batch_size=cap, cache_max_entry_count=1))
    pipe(prompts[:2], GenerationConfig(max_new_tokens=2, ignore_eos=True))
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        outs = pipe(prompts, GenerationConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
        rates.append(sum(o.completion_tokens for o in outs) / (time.perf_counter() - t))
    return rates


def wait_ready(url: str, timeout: float, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready (see its log)")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def load_levels(url, model, prompts, a) -> list:
    rows = []
    asyncio.run(run_load(url, model, prompts[:2], 4, 2))  # warm-up
    for c in a.conc:
        n = max(a.min_requests, 2 * c) if c > 1 else a.small_requests
        runs = []
        for _ in range(a.rounds if c == a.offline_cap else 1):  # the level set against offline: repeated
            r = asyncio.run(run_load(url, model, prompts[:n], a.new_tokens, c))
            print(f"  concurrency {c:>3}: {r['output_tokens_per_s']:7.1f} tok/s, TTFT median "
                  f"{r['ttft']['median']:.2f} s, TPOT median {r['tpot']['median'] * 1000:.0f} ms, "
                  f"failed {r['failed']}", flush=True)
            runs.append(r)
        r = sorted(runs, key=lambda x: x["output_tokens_per_s"])[len(runs) // 2]  # the median round
        r["rounds"] = [x["output_tokens_per_s"] for x in runs]
        rows.append(r)
    return rows


def ours(prompts, a, spec_k: int = 0, engine_extra: dict = None, measure=None) -> list:
    """Our endpoint as a user starts it (``serve run`` on a Serve config, its own Ray instance), so that the
    client process holds no Ray driver: the same footing as vLLM's server. ``spec_k``: n-gram drafts;
    ``engine_extra``: more engine fields; ``measure(url, prompts, a)``: the load (default load_levels)."""
    import yaml
    engine = {"max_batch_size": 64, **({"num_speculative_tokens": spec_k} if spec_k else {}), **(engine_extra or {})}
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": a.port},
              "applications": [{"name": "bench", "route_prefix": "/", "import_path": "serve_app:build_app",
                                "args": {"engine": engine,
                                         "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                                         "max_ongoing_requests": 256}}]}
    root = Path(__file__).resolve().parent.parent
    cfg_path = Path(tempfile.mkdtemp(prefix="raylm-bench-")) / "serve_bench.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).with_name("serve")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    apply_quiet_ray_env(env)  # as scripts/run.sh starts it
    proc = subprocess.Popen([str(serve_bin), "run", str(cfg_path)], cwd=root, start_new_session=True, env=env,
                            stdout=open("/tmp/raylm-serve-bench.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{a.port}"
    try:
        wait_ready(url, 300, proc)
        return measure(url, prompts, a) if measure else load_levels(url, MODEL, prompts, a)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts the app and its Ray instance down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def vllm(prompts, a, model_dir) -> list:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_CACHE_ROOT": "/tmp/vllm-cache"}
    port = a.port + 1
    proc = subprocess.Popen([a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "2048"],
                            env=env, stdout=open("/tmp/vllm-serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 600, proc)
        return load_levels(f"http://127.0.0.1:{port}", MODEL, prompts, a)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def render(res) -> str:
    lines = ["## Serving over HTTP, SmolLM2-135M-Instruct float32 (`bench/serving.py`)", "",
             f"Machine: {res['machine']}. Streaming `/v1/completions`, {res['args']['prompt_len']}-token prompts, "
             f"{res['args']['new_tokens']} output tokens each, one engine replica, same client for both servers, each "
             "server in processes of its own (ours through `serve run` on a Serve config, vLLM's api_server). "
             f"Our engine offline on the same prompts at batch cap {res['offline_cap']}: "
             f"{res['offline']:.1f} output tokens/s (median of "
             f"{', '.join(f'{r:.1f}' for r in res.get('offline_runs', [res['offline']]))}, "
             "half before and half after the HTTP runs, no server running). At concurrency "
             f"{res['offline_cap']} each server ran {res['args'].get('rounds', 1)} rounds; the row is the "
             "median round.", "",
             "| server | concurrency | requests | output tok/s | req/s | TTFT mean / median / p99 (s) | "
             "TPOT mean / median / p99 (ms) | E2E mean / median / p99 (s) | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    spec = f"ours, n-gram drafts (k={res['args'].get('spec_k')})"
    for name, rows in (("ours (Ray Serve)", res["ours"]), (spec, res.get("ours_spec") or []),
                       ("vLLM-CPU 0.32", res.get("vllm") or [])):
        for r in rows:
            t, p, e = r["ttft"], r["tpot"], r["e2e"]
            lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['output_tokens_per_s']:.1f} | "
                         f"{r['request_throughput']:.2f} | {t['mean']:.2f} / {t['median']:.2f} / {t['p99']:.2f} | "
                         f"{p['mean'] * 1e3:.0f} / {p['median'] * 1e3:.0f} / {p['p99'] * 1e3:.0f} | "
                         f"{e['mean']:.1f} / {e['median']:.1f} / {e['p99']:.1f} | {r['failed']} |")
    o16 = next((r for r in res["ours"] if r["concurrency"] == res["offline_cap"]), None)
    if o16:
        rounds = ", ".join(f"{r:.1f}" for r in o16.get("rounds", [o16["output_tokens_per_s"]]))
        lines += ["", f"At concurrency {res['offline_cap']}: HTTP / offline = "
                      f"{o16['output_tokens_per_s'] / res['offline']:.2f} (ours, rounds: {rounds} tok/s)."]
    if res.get("ours_spec"):
        lines += ["", "Drafts: the same server with `num_speculative_tokens` set in its Serve config (the requests "
                      "are greedy, so they take drafts; same tokens), started after the plain one."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-requests", type=int, default=64, help="requests per level (at least 2x concurrency)")
    ap.add_argument("--small-requests", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--offline-cap", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3,
                    help="loads at the offline cap's concurrency per server, and offline runs before and after")
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--spec-k", type=int, default=4, help="also serve with this many n-gram drafts (0: not)")
    ap.add_argument("--no-doc", action="store_true", help="print only: neither results/ nor docs/ change")
    a = ap.parse_args()
    a.conc = [int(c) for c in a.concurrency.split(",")]
    from transformers import AutoTokenizer

    from engine.default_model import default_model_dir
    model_dir = default_model_dir()
    prompts = token_prompts(AutoTokenizer.from_pretrained(str(model_dir)), max(a.min_requests, 2 * max(a.conc)),
                            a.prompt_len)
    res = {"machine": machine_description(), "args": {k: v for k, v in vars(a).items() if k != "conc"},
           "offline_cap": a.offline_cap}
    # The offline figure is taken before and after the HTTP runs (the machine drifts over minutes), and the
    # level it is set against runs several rounds: the ratio is the median round over the median offline run.
    offline = offline_rates(prompts[:a.min_requests], a.new_tokens, a.offline_cap, a.rounds)
    print(f"offline, cap {a.offline_cap}: {', '.join(f'{r:.1f}' for r in offline)} tok/s", flush=True)
    print("ours:", flush=True)
    res["ours"] = ours(prompts, a)
    after = offline_rates(prompts[:a.min_requests], a.new_tokens, a.offline_cap, a.rounds)
    print(f"offline again, cap {a.offline_cap}: {', '.join(f'{r:.1f}' for r in after)} tok/s", flush=True)
    res["offline_runs"], res["offline"] = offline + after, statistics.median(offline + after)
    if a.spec_k:
        print(f"ours with n-gram drafts (k={a.spec_k}):", flush=True)
        res["ours_spec"] = ours(prompts, a, a.spec_k)
    if a.vllm_python:
        print("vLLM:", flush=True)
        res["vllm"] = vllm(prompts, a, model_dir)
    table = render(res)
    print(table)
    if not a.no_doc:  # a trial run (--no-doc) leaves the recorded results alone
        save_json("serving", res)
        write_section("serving", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
