"""``python -m engine chat [MODEL]`` (streaming terminal chat), ``python -m engine generate`` (a file of prompts)
and ``python -m engine convert MODEL --tp T --dst DIR`` (per-rank tensor-parallel shards)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

from .config import EngineConfig
from .generation import GenerationConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--session-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--cache-max-entry-count", type=float, default=None)
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel workers (Ray actors)")
    p.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8], help="KV cache: 0 off, 8 int8, 4 int4")
    p.add_argument("--kv-qparams", default=None,
                   help="static per-head K/V parameters for --quant-policy 8/4 (python -m quant_jobs kv_qparams)")
    p.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="n-gram (prompt lookup) drafts per step (greedy generation gains most); 0 = off")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high"],
                   help="CPU products: highest = IEEE float32; high = bf16x3 on AMX tiles where present (2-3x faster)")
    p.add_argument("--gguf-weights", default="dequantize", choices=["dequantize", "native"],
                   help="a .gguf model: native keeps its Q4_0/Q4_1/Q4_K linears 4-bit on the CPU kernels")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _configs(a):
    ecfg = EngineConfig(model=a.model, dtype=a.dtype, session_len=a.session_len, block_size=a.block_size,
                        max_batch_size=a.max_batch_size, cache_max_entry_count=a.cache_max_entry_count,
                        enable_prefix_caching=a.enable_prefix_caching, tp=a.tp, quant_policy=a.quant_policy,
                        kv_qparams=a.kv_qparams,
                        num_speculative_tokens=a.num_speculative_tokens, matmul_precision=a.matmul_precision,
                        gguf_weights=a.gguf_weights)
    gcfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.seed)
    return ecfg, gcfg


def chat(a) -> int:
    from .offline import pipeline
    ecfg, gcfg = _configs(a)
    pipe = pipeline(config=ecfg)
    history = []
    print("chat with the model: /reset clears the history, /exit quits", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = ""
        try:
            for o in pipe.stream(list(history), gcfg):
                reply += o.text
                print(o.text, end="", flush=True)
        except ValueError as exc:  # e.g. the history outgrew session_len
            print(f"\nerror: {exc} (use /reset)", flush=True)
            history.pop()
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0


def _read_prompts(path: str):
    with open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
    if path.endswith(".jsonl"):
        out = []
        for i, ln in enumerate(lines):
            obj = json.loads(ln)
            if "prompt" not in obj and "messages" not in obj:
                raise SystemExit(f"{path}:{i + 1}: each line needs a 'prompt' or 'messages' field")
            out.append(obj.get("messages") or obj["prompt"])
        return out
    return lines


def generate(a) -> int:
    from .offline import pipeline
    ecfg, gcfg = _configs(a)
    prompts = _read_prompts(a.input)
    if a.chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    if not prompts:
        raise SystemExit(f"--input: {a.input} holds no prompts")
    pipe = pipeline(config=ecfg)
    t0 = time.perf_counter()
    responses = pipe(prompts, gcfg, use_tqdm=True)
    dt = time.perf_counter() - t0
    out_tokens = sum(r.completion_tokens for r in responses)
    rows = [{"prompt": p, "text": r.text, "finish_reason": r.finish_reason, "usage": r.usage}
            for p, r in zip(prompts, responses)]
    if a.output:
        d = os.path.dirname(os.path.abspath(a.output))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, a.output)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    print(f"{len(prompts)} prompts, {out_tokens} output tokens in {dt:.1f} s ({out_tokens / dt:.1f} tokens/s)",
          file=sys.stderr)
    return 0


def convert(a) -> int:
    from .parallel.convert import convert as run
    if a.tp < 2:
        raise ValueError(f"tp: {a.tp}; shards are for tp >= 2 (tp=1 loads the original checkpoint)")
    res = run(a.model, a.tp, a.dst, a.dtype)
    print(f"wrote {res['tp']} rank shards ({', '.join(f'{m} MiB' for m in res['rank_MiB'])}) to {res['dst']} "
          f"in {res['seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("chat", help="terminal chat that streams tokens")
    _engine_args(c)
    g = sub.add_parser("generate", help="generate for a file of prompts (one per line, or .jsonl)")
    _engine_args(g)
    g.add_argument("--input", required=True)
    g.add_argument("--output", default=None, help="write JSON lines here (default: stdout)")
    g.add_argument("--chat", action="store_true", help="wrap each line as a user message (chat template)")
    v = sub.add_parser("convert", help="write per-rank tensor-parallel shards for fast replica starts")
    v.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2)")
    v.add_argument("--tp", type=int, required=True, help="tensor-parallel degree the shards are for")
    v.add_argument("--dst", required=True, help="output folder (created; must not hold files)")
    v.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the stored dense weights")
    a = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RAYLM_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.cmd == "convert":
            return convert(a)
        return chat(a) if a.cmd == "chat" else generate(a)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
