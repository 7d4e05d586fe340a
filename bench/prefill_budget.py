"""The per-step token budget (``max_prefill_tokens``) against time to first token and throughput, over HTTP.

With 16 streams arriving together, a budget of 2048 tokens prefills all sixteen 128-token prompts in one
step, so each waits for all of them; a smaller budget prefills a few per step (chunked prefill) and starts
decoding those while the rest wait. The same streamed load as bench/serving_gguf.py (128-token WikiText-2
windows as token ids, 128 new tokens each, greedy, ``--rounds`` rounds on new prompts; a pass's figures are
its median round's), one server per budget, our endpoint through ``serve run`` as a user starts it. The
budgets run in order, then (``--passes 2``) in reverse order, so that the host's drift over minutes falls on
both ends; the table gives each pass's figures and the median of all rounds' rates.

    python bench/prefill_budget.py [--budgets 256,512,1024,2048] [--concurrency 16] [--native] [--no-doc]
    python bench/prefill_budget.py --render bench/results/prefill_budget.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_description, publish, pyplot, save_figure, token_prompts  # noqa: E402
from bench.serving import ours  # noqa: E402
from bench.serving_gguf import levels  # noqa: E402


def render(res) -> str:
    a = res["args"]
    weights = "the GGUF's own Q4_1 blocks (`gguf_weights: native`)" if a["native"] else "float32 (the default)"
    lines = ["## Per-step token budget against time to first token (`bench/prefill_budget.py`)", "",
             f"Machine: {res['machine']}. SmolLM2-135M-Instruct on {weights}, one replica through `serve run`. "
             f"Streaming `/v1/completions`, {a['concurrency']} streams, {a['min_requests']} requests per round "
             f"({a['prompt_len']}-token prompts as token ids, {a['new_tokens']} new tokens each, greedy), "
             f"{a['rounds']} rounds on new prompts per budget and pass; the budgets ran in order, then in reverse "
             "order. Per pass (`a / b`): the median round (by tokens/s) and its per-request TTFT and TPOT; output "
             "tok/s is the median of all the budget's rounds.", "",
             "| max_prefill_tokens | output tok/s | rounds | TTFT median (s) | TTFT p99 (s) | TPOT median (ms) | "
             "failed |", "|---|---|---|---|---|---|---|"]
    for b in sorted({r["budget"] for r in res["rows"]}):
        runs = [r for r in res["rows"] if r["budget"] == b]
        rate = statistics.median([x for r in runs for x in r["rounds"]])
        rounds = " / ".join(", ".join(f"{x:.0f}" for x in r["rounds"]) for r in runs)
        ttft = " / ".join(f"{r['ttft']['median']:.2f}" for r in runs)
        p99 = " / ".join(f"{r['ttft']['p99']:.2f}" for r in runs)
        tpot = " / ".join(f"{r['tpot']['median'] * 1e3:.0f}" for r in runs)
        lines.append(f"| {b} | {rate:.1f} | {rounds} | {ttft} | {p99} | {tpot} | {sum(r['failed'] for r in runs)} |")
    return "\n".join(lines)


def plot(res) -> None:
    """docs/prefill_budget.png: TTFT (median and p99) and output tokens/s by budget."""
    plt = pyplot()
    if plt is None:
        return
    x = sorted({r["budget"] for r in res["rows"]})
    runs = [[r for r in res["rows"] if r["budget"] == b] for b in x]
    mid = lambda f: [statistics.median(f(r) for r in rs) for rs in runs]  # noqa: E731  (over the passes)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(x, mid(lambda r: r["ttft"]["median"]), "o-", label="median")
    a1.plot(x, mid(lambda r: r["ttft"]["p99"]), "^--", label="p99")
    a1.set_ylabel("time to first token (s)")
    a1.legend(fontsize=8)
    a2.plot(x, [statistics.median(v for r in rs for v in r["rounds"]) for rs in runs], "s-")
    a2.set_ylabel("output tokens/s")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_prefill_tokens")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{res['args']['concurrency']} streams, SmolLM2-135M over HTTP\n"
                 + res["machine"].split(", 24")[0], fontsize=10)
    fig.tight_layout()
    save_figure(fig, "prefill_budget.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="256,512,1024,2048")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-requests", type=int, default=32, help="requests per round (at least 2x concurrency)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=2, choices=(1, 2), help="2: the budgets again in reverse order")
    ap.add_argument("--native", action="store_true", help="gguf_weights: native instead of float32")
    ap.add_argument("--port", type=int, default=8340)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", metavar="JSON")
    cli = ap.parse_args()
    if cli.render:
        res = json.loads(Path(cli.render).read_text())
        publish("prefill_budget", res, render(res), not cli.no_doc)
        plot(res)
        return 0
    from transformers import AutoTokenizer

    from engine.default_model import default_model_dir
    budgets = [int(b) for b in cli.budgets.split(",")]
    n = max(cli.min_requests, 2 * cli.concurrency)
    a = SimpleNamespace(**{**vars(cli), "min_requests": n}, conc=[cli.concurrency], small_requests=n)
    prompts = token_prompts(AutoTokenizer.from_pretrained(str(default_model_dir())), a.rounds * n + 2, a.prompt_len)
    res = {"machine": machine_description(), "args": {**vars(cli), "min_requests": n}, "rows": []}
    for b in budgets + budgets[::-1][:len(budgets) * (cli.passes - 1)]:
        print(f"max_prefill_tokens {b}:", flush=True)
        extra = {"max_prefill_tokens": b, **({"gguf_weights": "native"} if cli.native else {})}
        row = ours(prompts, a, engine_extra=extra, measure=levels)[0]
        res["rows"].append({"budget": b, **row})
    publish("prefill_budget", res, render(res), not cli.no_doc)
    if not cli.no_doc:
        plot(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
