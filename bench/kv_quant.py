"""KV-cache quantization on SmolLM2-135M-Instruct (float32 weights, CPU): memory at quant_policy 0/8/4 for
batches of full-context sequences, sequences that fit a fixed budget, accuracy through the engine
(WikiText-2 perplexity with the context read back from the cache, and teacher-forced greedy agreement), and
offline throughput at each policy, with the native layers and with the torch layers (dequantizing gathered
blocks; what int8 / int4 ran on before the native layers took quantized blocks).

    python bench/kv_quant.py [--context 512] [--batches 8,16,32,48] [--budget-gib 1] [--ppl-windows 8]
                             [--speed-runs 3] [--only memory|speed]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, machine_description, publish  # noqa: E402

POLICIES = (0, 8, 4)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of", "The three primary colors are", "import numpy as np\n",
           "The theory of relativity states that", "To make a cup of tea, first"]


def memory_run(policy: int, batch: int, context: int, out_tokens: int) -> dict:
    """In a fresh process (peak RSS is per process): batch sequences filling ``context`` tokens each."""
    from engine.generation import GenerationConfig
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    bs = 64
    eng = LLMEngine(quant_policy=policy, block_size=bs, max_batch_size=batch, max_prefill_tokens=2048,
                    num_cpu_blocks=batch * -(-context // bs))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prompt = list(range(1000, 1000 + context - out_tokens))
    Pipeline(eng)([prompt] * batch, GenerationConfig(max_new_tokens=out_tokens, ignore_eos=True, temperature=0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kv_MiB": eng.kv_bytes / 2 ** 20, "peak_MiB": peak / 1024, "after_load_MiB": base / 1024}


def accuracy(windows: int, seqlen: int, chunk: int, kv_qparams: str = "") -> dict:
    """Perplexity and greedy agreement per policy; with ``kv_qparams`` (the kv_qparams job's output) also
    int8 and int4 with those static per-head parameters ("8s", "4s")."""
    from transformers import AutoTokenizer

    from engine.generation import GenerationConfig
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    from engine.scoring import window_logits, window_nll
    from quant_jobs.data import wikitext2_test_text
    kw = dict(block_size=64, max_batch_size=8, num_cpu_blocks=-(-seqlen // 64) + 2)
    engines = {p: LLMEngine(quant_policy=p, **kw) for p in POLICIES}
    if kv_qparams:
        engines.update({f"{p}s": LLMEngine(quant_policy=p, kv_qparams=kv_qparams, **kw) for p in (8, 4)})
    tok = AutoTokenizer.from_pretrained(str(engines[0].model_dir))
    ids = tok(wikitext2_test_text(SHARED / "wikitext2" / "wiki.test.raw"), add_special_tokens=False)["input_ids"]
    res = {}
    for p, eng in engines.items():
        nll = sum(window_nll(eng, ids[i * seqlen:(i + 1) * seqlen], chunk) for i in range(windows))
        res[p] = {"ppl": math.exp(nll / (windows * (seqlen - 1)))}
        print(f"  quant_policy {p}: ppl {res[p]['ppl']:.4f}", flush=True)
    gc = GenerationConfig(max_new_tokens=32, temperature=0, ignore_eos=True)
    outs = Pipeline(engines[0])(PROMPTS, gc)
    agree = {p: [0, 0] for p in engines}
    for prompt, o in zip(PROMPTS, outs):
        seq = tok(prompt, add_special_tokens=False)["input_ids"] + o.token_ids
        n = len(o.token_ids)
        for p in engines:
            pick = window_logits(engines[p], seq, chunk=1)[-n - 1:-1].argmax(-1).tolist()
            agree[p][0] += sum(a == b for a, b in zip(pick, o.token_ids))
            agree[p][1] += n
    for p in engines:
        res[p]["greedy_agreement"] = agree[p][0] / agree[p][1]
    return res


# offline throughput runs: (prompt tokens, new tokens, batch cap, prompts)
SPEED_SHAPES = ((128, 128, 32, 32), (896, 128, 16, 16))


def speed(runs: int) -> list:
    """Output tokens/s (whole runs, and their decode-only steps) per shape and policy, runs alternating between
    the engines; policies 8 and 4 also with the torch layers (the native decoder switched off)."""
    import statistics

    from bench.common import token_prompts
    from bench.offline_throughput import ours
    from engine.llm_engine import LLMEngine
    engines = {p: LLMEngine(quant_policy=p, max_batch_size=32, cache_max_entry_count=2) for p in POLICIES}
    rows = []
    for prompt_len, new, cap, n in SPEED_SHAPES:
        prompts = token_prompts(engines[0].tokenizer, n, prompt_len)
        runs_by = {}
        for _ in range(runs):
            for p, eng in engines.items():
                for path in ("native", "torch") if p else ("native",):
                    fd = eng.runner.model.fused_decoder
                    if path == "torch":
                        eng.runner.model.fused_decoder = None
                    try:
                        rates, decode_rates, _ = ours(eng, prompts, new, cap, 1)
                    finally:
                        eng.runner.model.fused_decoder = fd
                    runs_by.setdefault((p, path), []).append((rates[0], decode_rates[0]))
        for (p, path), rs in runs_by.items():
            rows.append({"prompt": prompt_len, "new": new, "cap": cap, "prompts": n, "policy": p, "path": path,
                         "tokens_per_s": statistics.median(r[0] for r in rs),
                         "decode_tokens_per_s": statistics.median(r[1] for r in rs), "runs": rs})
            print(f"  {prompt_len}+{new} cap {cap} policy {p} {path}: {rows[-1]['tokens_per_s']:.1f} tok/s "
                  f"(decode-only steps {rows[-1]['decode_tokens_per_s']:.1f})", flush=True)
    return rows


def memory(batches, context: int, out_tokens: int) -> dict:
    """memory_run for each batch and policy, each in a process of its own."""
    mem = {}
    for b in batches:
        for p in POLICIES:
            out = subprocess.run([sys.executable, __file__, "--one", f"{p},{b}", "--context", str(context),
                                  "--out-tokens", str(out_tokens)], capture_output=True, text=True, check=True)
            mem[f"{p},{b}"] = json.loads(out.stdout.strip().splitlines()[-1][len("RESULT "):])
            print(f"  batch {b} policy {p}: {mem[f'{p},{b}']}", flush=True)
    return mem


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out-tokens", type=int, default=16)
    ap.add_argument("--batches", default="8,16,32,48")
    ap.add_argument("--budget-gib", type=float, default=1.0)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-seqlen", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--speed-runs", type=int, default=3)
    ap.add_argument("--kv-qparams", default="",
                    help="the kv_qparams job's output: accuracy also with static per-head parameters")
    ap.add_argument("--only", choices=["memory", "speed", "accuracy"],
                    help="run only this part (the others keep their results from the last run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: policy,batch for a child process
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    if a.one:
        p, b = map(int, a.one.split(","))
        print("RESULT " + json.dumps(memory_run(p, b, a.context, a.out_tokens)))
        return 0
    batches = [int(b) for b in a.batches.split(",")]
    if a.only:  # the other parts from the last run
        res = json.loads((Path(__file__).resolve().parent / "results" / "kv_quant.json").read_text())
        if a.only == "speed":
            res["speed"], res["speed_machine"] = speed(a.speed_runs), machine_description()
            res["args"]["speed_runs"] = a.speed_runs
        elif a.only == "accuracy":
            res["accuracy"] = accuracy(a.ppl_windows, a.ppl_seqlen, a.chunk, a.kv_qparams)
            res["args"].update(ppl_windows=a.ppl_windows, ppl_seqlen=a.ppl_seqlen, chunk=a.chunk,
                               kv_qparams=a.kv_qparams)
        else:
            res["memory"], res["machine"] = memory(batches, a.context, a.out_tokens), machine_description()
            res["args"].update(batches=a.batches, context=a.context, out_tokens=a.out_tokens)
        return _finish(res, batches, a.no_doc)
    mem = memory(batches, a.context, a.out_tokens)
    from engine.layers.attention import KVCache
    import torch
    per_seq = {p: KVCache.bytes_per_block(30, 64, 3, 64, torch.float32, p) * -(-a.context // 64) for p in POLICIES}
    fits = {p: int(a.budget_gib * 2 ** 30 // per_seq[p]) for p in POLICIES}
    acc = accuracy(a.ppl_windows, a.ppl_seqlen, a.chunk, a.kv_qparams)
    res = {"machine": machine_description(), "args": vars(a), "memory": mem, "fits": fits, "accuracy": acc,
           "speed": speed(a.speed_runs), "speed_machine": machine_description()}
    return _finish(res, batches, a.no_doc)


def _finish(res, batches, no_doc: bool) -> int:
    publish("kv_quant", res, render(res, batches), not no_doc)
    return 0


def render(res, batches) -> str:
    a = res["args"]
    lines = ["## KV-cache quantization, SmolLM2-135M-Instruct float32 (`bench/kv_quant.py`)", "",
             f"Machine: {res['machine']}. Each batch runs in a fresh process: {a['context'] - a['out_tokens']}-token "
             f"prompts plus {a['out_tokens']} output tokens (context {a['context']}), cache sized to the batch. "
             "KV = the cache's bytes (integers plus per-token scale and minimum); peak = the process's peak RSS "
             "(weights, activations, cache).", "",
             "| batch | KV MiB (fp32 / int8 / int4) | peak MiB (fp32 / int8 / int4) |", "|---|---|---|"]
    for b in batches:
        m = [res["memory"][f"{p},{b}"] for p in POLICIES]
        kv = " / ".join("%.0f" % x["kv_MiB"] for x in m)
        peak = " / ".join("%.0f" % x["peak_MiB"] for x in m)
        lines.append(f"| {b} | {kv} | {peak} |")
    f = {int(k): v for k, v in res["fits"].items()}  # int keys, or str ones read back from the JSON
    lines += ["", f"Sequences of {a['context']} tokens that fit a {a['budget_gib']:g} GiB cache: "
              f"{f[0]} at fp32, {f[8]} at int8 ({f[8] / f[0]:.1f}x), {f[4]} at int4 ({f[4] / f[0]:.1f}x).", "",
              f"Accuracy through the engine: WikiText-2 test, {a['ppl_windows']} windows of {a['ppl_seqlen']} tokens "
              f"prefilled in chunks of {a['chunk']} (every chunk after the first reads the context back from the "
              "cache); greedy agreement = share of 32-token greedy continuations of 8 prompts where the "
              "quantized cache, fed the same tokens one at a time, picks the same next token.", "",
              "| quant_policy | perplexity | vs fp32 cache | greedy agreement |", "|---|---|---|---|"]
    acc = {str(k): v for k, v in res["accuracy"].items()}  # int keys, or str ones read back from the JSON
    static = {"8s": "8, static per-head parameters", "4s": "4, static per-head parameters"}
    for p in [str(p) for p in POLICIES] + [s for s in static if s in acc]:
        lines.append(f"| {static.get(p, p)} | {acc[p]['ppl']:.4f} | {acc[p]['ppl'] / acc['0']['ppl'] - 1:+.2%} | "
                     f"{acc[p]['greedy_agreement']:.1%} |")
    if any(s in acc for s in static):
        lines += ["", "Static per-head parameters: `python -m quant_jobs calibrate --calib-samples 64 "
                  "--calib-seqlen 512` (WikiText-2 train) then `kv_qparams`: one (scale, zero point) per layer, "
                  "K or V and KV head from the calibrated range (`kv_qparams` in the engine config), where the "
                  "other rows use each token's own range. One range per head holds a head's outliers in every "
                  "token's 16 int4 levels, hence int4's loss; int8 keeps its 256 levels within reach of the "
                  "online form."]
    if res.get("speed"):
        lines += _speed_table(res)
    return "\n".join(lines)


def _speed_table(res) -> list:
    by = {(r["prompt"], r["policy"], r["path"]): r for r in res["speed"]}
    runs = len(res["speed"][0]["runs"])
    lines = ["", f"Offline throughput (output tokens/s, greedy, medians of {runs} runs, the engines' runs alternating). "
             f"Machine: {res['speed_machine']}. Native: the native CPU layers, which write each new token's K/V "
             "quantized and attend block by block over the integers, converted to floats in an L1 buffer, with "
             "each key's scale and minimum folded into the scores and the value weights; torch: the module layers "
             "in the same engine, dequantizing gathered blocks (what int8 and int4 ran on before). In brackets: "
             "the decode-only steps.", "",
             "| prompt + new tokens, batch cap (prompts) | fp32 | int8 | int8, torch layers | int4 | "
             "int4, torch layers |", "|---|---|---|---|---|---|"]
    for prompt_len, new, cap, n in sorted({(r["prompt"], r["new"], r["cap"], r["prompts"]) for r in res["speed"]}):
        cell = lambda p, path: (lambda r: f"{r['tokens_per_s']:.1f} ({r['decode_tokens_per_s']:.1f})")(  # noqa: E731
            by[(prompt_len, p, path)])
        lines.append(f"| {prompt_len} + {new}, {cap} ({n}) | {cell(0, 'native')} | {cell(8, 'native')} | "
                     f"{cell(8, 'torch')} | {cell(4, 'native')} | {cell(4, 'torch')} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
