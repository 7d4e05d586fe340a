"""AWQ on SmolLM2-135M-Instruct: WikiText-2 perplexity of full precision, RTN and AWQ (w4, g64 and g32),
the time of each phase with 1 and 2 Ray workers, and the scheduling overhead of one Ray task.

    python bench/quant_awq.py [--calib-samples 16] [--calib-seqlen 512] [--ppl-seqlen 2048] [--ppl-limit 40]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_description, save_json, write_section  # noqa: E402


def task_overhead(nbytes: int, repeats: int = 20) -> float:
    """Median round trip of a no-op Ray task that receives one layer input of ``nbytes`` by reference."""
    import ray
    import torch
    ref = ray.put(torch.zeros(nbytes // 4))

    @ray.remote(num_cpus=1)
    def noop(x):
        return x.shape[0]

    ray.get(noop.remote(ref))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ray.get(noop.remote(ref))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-limit", type=int, default=20)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    import ray

    from quant_jobs.config import AwqOptions, PplOptions
    from quant_jobs.jobs import auto_awq
    from quant_jobs.ppl import eval_ppl
    ray.init(include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-awq-"))
    calib = dict(calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, calib_dataset="wikitext2")
    runs = {}
    for name, group, workers in (("g64 x1", 64, 1), ("g64 x2", 64, 2), ("g32 x2", 32, 2)):
        print(f"auto_awq {name} ...", flush=True)
        runs[name] = auto_awq(AwqOptions(work_dir=str(root / name.replace(" ", "_")), w_group_size=group,
                                         workers=workers, **calib))
        print({k: v for k, v in runs[name].items() if k.endswith("_s") or k.endswith("_mean")}, flush=True)
    overhead = task_overhead(a.calib_samples * a.calib_seqlen * 576 * 4 // 2)
    ray.shutdown()
    ppl = {}
    common = dict(seqlen=a.ppl_seqlen, limit=a.ppl_limit)
    r = eval_ppl(PplOptions(work_dir=str(root / "g64_x2"), variants=["fp", "rtn", "awq", "packed"], **common))
    ppl.update({f"{row['variant']} g64": row for row in r["rows"]})
    r = eval_ppl(PplOptions(work_dir=str(root / "g32_x2"), variants=["rtn", "awq"], **common))
    ppl.update({f"{row['variant']} g32": row for row in r["rows"]})
    res = {"machine": machine_description(), "args": vars(a), "runs": runs, "task_overhead_s": overhead,
           "ppl": {k: {"ppl": v["ppl"], "label": v["label"]} for k, v in ppl.items()},
           "windows": r["windows"], "tokens": ppl["fp g64"]["tokens"]}
    save_json("quant_awq", res)
    table = render(res)
    print(table)
    if not a.no_doc:
        write_section("quant_awq", table)
    return 0


def render(res) -> str:
    p = {k: v["ppl"] for k, v in res["ppl"].items()}
    fp = p["fp g64"]
    a = res["args"]
    lines = [f"## AWQ W4A16 on SmolLM2-135M-Instruct (`bench/quant_awq.py`)", "",
             f"Machine: {res['machine']}. Calibration: WikiText-2 train, {a['calib_samples']} x "
             f"{a['calib_seqlen']} tokens. Perplexity: WikiText-2 test, seqlen {a['ppl_seqlen']}, first "
             f"{res['windows']} windows ({res['tokens']} predicted tokens), float32 compute.", "",
             "| model | perplexity | vs full precision | share of RTN's loss recovered by AWQ |", "|---|---|---|---|",
             f"| full precision (float32) | {fp:.3f} | | |"]
    for g in (64, 32):
        rtn, awq = p[f"rtn g{g}"], p[f"awq g{g}"]
        rec = (rtn - awq) / (rtn - fp) if rtn > fp else float("nan")
        lines += [f"| RTN w4 g{g} | {rtn:.3f} | +{rtn - fp:.3f} | |",
                  f"| AWQ w4 g{g} (fake-quantized) | {awq:.3f} | +{awq - fp:.3f} | {rec:.0%} |"]
        if f"packed g{g}" in p:
            lines.append(f"| AWQ w4 g{g} packed checkpoint (dequantized) | {p[f'packed g{g}']:.3f} | "
                         f"+{p[f'packed g{g}'] - fp:.3f} | |")
    lines += ["", "Phases of `auto_awq` (seconds; the search phase is wall time, per layer is the mean time a "
              "task spent searching one layer):", "",
              "| run | workers | capture | search (30 layers) | per layer | pack | total |", "|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name.split()[0]} | {r['workers']} | {r['capture_s']:.1f} | {r['search_s']:.1f} | "
                     f"{r['layer_search_s_mean']:.2f} | {r['pack_s']:.1f} | {r['seconds']:.1f} |")
    one = res["runs"]["g64 x1"]
    t_layer, ov = one["layer_search_s_mean"], res["task_overhead_s"]
    proj1 = one["capture_s"] + 32 * (t_layer + ov) + one["pack_s"]
    proj8 = one["capture_s"] + math.ceil(32 / 8) * (t_layer + ov) + one["pack_s"]
    lines += ["", f"Scheduling overhead of one Ray task carrying a layer's input by reference (median of 20 "
              f"round trips of a no-op task): {ov * 1e3:.1f} ms = {ov / t_layer:.2%} of one layer's search "
              f"({t_layer:.2f} s).", "",
              f"Projection for a 32-layer model whose layers each take {t_layer:.2f} s to search (this run's "
              f"figure; a GPU is faster, the shape of the sum is the same): capture + ceil(32 / workers) x "
              f"(layer + overhead) + pack = {proj1:.0f} s on 1 worker, {proj8:.0f} s on 8 GPUs "
              f"({proj1 / proj8:.1f}x). This machine's two cores do not give two workers twice the compute "
              "(each of two concurrent float32 matmuls runs at about a third of one alone), so the 1 vs 2 worker "
              "rows above measure the orchestration, not the design's scaling."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
