"""The engine serving a packed AWQ checkpoint made by quant_jobs: its WikiText-2 perplexity against the
fake-quantized model's figure from the job's own eval_ppl (same windows), plus the weight memory.

    python bench/awq_engine_ppl.py WORK_DIR     # a work dir where auto_awq and eval_ppl (awq row) ran
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import held_weight_bytes as weight_bytes  # noqa: E402
from bench.common import machine_description, save_json, write_section  # noqa: E402


def main() -> int:
    work = Path(sys.argv[1])
    job = json.loads((work / "ppl.json").read_text())
    fake = next(r for r in job["rows"] if r["variant"] == "awq")
    fp = next((r for r in job["rows"] if r["variant"] == "fp"), None)
    from transformers import AutoTokenizer

    from engine.llm_engine import LLMEngine
    from engine.scoring import window_nll
    from quant_jobs.ppl import test_windows
    seqlen = job["seqlen"]
    eng = LLMEngine(model=str(work / "quantized"), block_size=64, max_batch_size=1, num_cpu_blocks=seqlen // 64 + 1)
    windows = test_windows(AutoTokenizer.from_pretrained(str(work / "quantized")), Path(job["eval_file"]), seqlen,
                           job["windows"])
    nll = sum(window_nll(eng, w.tolist(), chunk=seqlen) for w in windows)
    ppl = math.exp(nll / (windows.shape[0] * (seqlen - 1)))
    fp_eng = LLMEngine(block_size=64, max_batch_size=1, num_cpu_blocks=8)
    res = {"machine": machine_description(), "engine_ppl": ppl, "fake_ppl": fake["ppl"], "seqlen": seqlen,
           "windows": int(windows.shape[0]), "awq_weight_MiB": weight_bytes(eng.model) / 2 ** 20,
           "fp_weight_MiB": weight_bytes(fp_eng.model) / 2 ** 20, "fp_ppl": fp["ppl"] if fp else None}
    save_json("awq_engine_ppl", res)
    table = "\n".join([
        "## The engine serving a quant_jobs AWQ checkpoint (`bench/awq_engine_ppl.py`)", "",
        f"Machine: {res['machine']}. WikiText-2 test, seqlen {seqlen}, {res['windows']} windows; the job's "
        f"fake-quantized figure comes from `eval_ppl` on the same windows ({fake['label']}).", "",
        "| model | perplexity | weights in memory (MiB) |", "|---|---|---|",
        *([f"| full precision (float32, eval_ppl) | {res['fp_ppl']:.3f} | {res['fp_weight_MiB']:.0f} |"] if fp else []),
        f"| fake-quantized, quant_jobs | {res['fake_ppl']:.3f} | |",
        f"| packed checkpoint, engine (W4A16) | {ppl:.3f} | {res['awq_weight_MiB']:.0f} |", "",
        f"Engine vs fake-quantized: {ppl / res['fake_ppl'] - 1:+.3%} (target: within 0.5%). The W4A16 weights "
        "include the float32 embedding table (tied with the LM head), which stays unquantized."])
    print(table)
    write_section("awq_engine_ppl", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
