"""GPU: the W4A16 Triton kernel against float16 torch.matmul, and decode of a Llama-2-7B-shaped model (random
weights) in float16 and W4A16, eager and from CUDA graphs, at batch 1 and 32, beside the memory-bandwidth
bound measured in the same run.

    python bench/awq_gpu.py --json-out /tmp/awq_gpu.json --no-doc   # on a CUDA machine
    python bench/awq_gpu.py --render bench/results/awq_gpu.json      # table into docs/benchmarks.md
    TRITON_INTERPRET=1 python bench/awq_gpu.py --smoke --no-doc      # tiny shapes on CPU: the script runs

Kernel times are GPU times: 20 calls captured in a CUDA graph, replayed, median over 7 replays (launch
overhead from Python is not in them, for either side).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import publish, write_section  # noqa: E402


def gpu_time(fn, device: str, calls: int = 20, replays: int = 7) -> float:
    """Median seconds per call of fn (awq_tune.graph_time: a CUDA graph of ``calls`` calls, replayed)."""
    from engine.kernels.awq_tune import graph_time
    return graph_time(fn, calls, replays)


def bandwidth(device: str) -> dict:
    n = 2 ** 30 if device == "cuda" else 2 ** 20  # 2 GiB of float16
    x = torch.ones(n, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    copy = gpu_time(lambda: y.copy_(x), device, calls=5)
    read = gpu_time(lambda: x.sum(dtype=torch.float32), device, calls=5)
    return {"copy_GBs": 4 * n / copy / 1e9, "read_GBs": 2 * n / read / 1e9}


def random_awq(K: int, N: int, G: int, device: str):
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), dtype=torch.int32, device=device)
    qz = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // G, N // 8), dtype=torch.int32, device=device)
    s = (torch.rand(K // G, N, device=device) * 0.01).half()
    return qw, qz, s


def gemv_sweep(shapes, device, tiles, tc_tiles):
    """The one-row kernels (decode) over candidate tiles at each shape, as the engine's tuner times them at
    load (kernels/awq_tune.py): K-packed FMA tiles and, in float16, the tensor-core kernel over AutoAWQ's
    layout -> (rows, {(K, N, group size): awq_tune.Choice}); the picks are installed."""
    from engine.kernels import awq_tune
    dtype = torch.float16  # the interpreter runs float16 too, so a smoke run covers both kernels
    rows = []
    chosen = awq_tune.tune([(K, N, 128 if K % 128 == 0 else 32) for K, N in shapes], device, dtype, tiles, tc_tiles,
                           use_cache=False, record=rows)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows, chosen


def dots_sweep(shapes, ms, device):
    """The K-packed tiled kernel's two forms (one reshaped tl.dot, or eight per nibble) at each shape and
    M > 1 -> (rows, the form with the least total time)."""
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import kpack_matmul
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows, totals = [], {0: 0.0, 1: 0.0}
    for K, N in shapes:
        G = 128 if K % 128 == 0 else 32
        qk, zk = repack_kpack(*random_awq(K, N, G, device)[:2])
        s = (torch.rand(K // G, N, device=device) * 0.01).half()
        for m in ms:
            x = torch.randn(m, K, device=device, dtype=dtype)
            for form in (0, 1):
                t = gpu_time(lambda: kpack_matmul(x, qk, zk, s, nibble_dots=form), device)
                rows.append({"K": K, "N": N, "M": m, "nibble_dots": form, "us": t * 1e6})
                totals[form] += t
                print(json.dumps(rows[-1]), flush=True)
    return rows, min(totals, key=totals.get)


def kernel_table(shapes, ms, device):
    from engine.kernels.awq_torch import awq_matmul_reference, repack_kpack
    from engine.kernels.awq_triton import awq_matmul, kpack_matmul
    rows = []
    dtype = torch.float16 if device == "cuda" else torch.float32
    for K, N in shapes:
        G = 128 if K % 128 == 0 else 32
        qw, qz, s = random_awq(K, N, G, device)
        qk, zk = repack_kpack(qw, qz)
        w = torch.randn(K, N, device=device, dtype=dtype)
        for m in ms:
            x = torch.randn(m, K, device=device, dtype=dtype)
            ref = awq_matmul_reference(x.float(), qw, qz, s.float())
            row = {"K": K, "N": N, "M": m, "fp16_us": gpu_time(lambda: x @ w, device) * 1e6}
            for name, fn in (("awq", lambda: awq_matmul(x, qw, qz, s)), ("kpack", lambda: kpack_matmul(x, qk, zk, s))):
                try:
                    err = (fn().float() - ref).abs().max()
                    t = gpu_time(fn, device)
                except Exception:
                    traceback.print_exc()
                    continue
                row.update({f"{name}_us": t * 1e6, f"{name}_speedup": row["fp16_us"] / (t * 1e6),
                            f"{name}_GBs": (K * N / 2 + K // G * N * 6) / t / 1e9, f"{name}_max_abs_err": float(err)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def decode_rate(args_kw, quant, device, steps, context, batch, graphs, layout="kpack") -> dict:
    """Decode through the engine's model and runner, random weights, ``context`` tokens cached per sequence;
    W4A16 layers computed from ``layout`` ("awq" or "kpack") on GPU."""
    from engine.layers import awq_linear
    awq_linear.GPU_LAYOUT = layout
    from engine.core.messages import ScheduledSeq, SchedulerOutput
    from engine.model_runner import ModelRunner
    from engine.models.args import ModelArgs
    from engine.models.loader import build_model
    dtype = torch.float16 if device == "cuda" else torch.float32
    a = ModelArgs(**args_kw)
    model = build_model(a, device, dtype, quant)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.int32:
                t.random_(-2 ** 31, 2 ** 31 - 1)
            elif "scales" in name:
                t.uniform_(0, 0.002)
            else:
                t.normal_(0, 0.02)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    bs = 64
    per_seq = -(-(context + steps + 1) // bs)
    t0 = time.perf_counter()
    runner = ModelRunner(model, per_seq * batch, bs, device, dtype, [0], cuda_graph_max_batch=batch if graphs else 0,
                         max_blocks_per_seq=per_seq)
    setup_s = time.perf_counter() - t0
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]

    def step(pos):
        runner.logits_for(SchedulerOutput(seqs=[ScheduledSeq(f"r{i}", [7], pos, tables[i], True)
                                                for i in range(batch)]))
    step(context)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(context + i)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / steps
    embed = model.embed.weight
    head_tied = model.lm_head.weight is embed
    read = nbytes - (0 if head_tied else embed.numel() * embed.element_size())  # the embedding: B rows only
    kv_read = batch * (context + steps // 2) * a.num_layers * 2 * a.num_kv_heads * a.head_dim * 2
    del runner, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "graphs": graphs, "quant": bool(quant), "layout": layout if quant else None,
            "tok_s": batch / secs, "step_ms": secs * 1e3,
            "weight_GB": nbytes / 1e9, "bytes_per_step_GB": (read + kv_read) / 1e9, "setup_s": setup_s}


LLAMA7B = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
               max_position_embeddings=4096, rope_theta=10000.0)
SMOKE = dict(LLAMA7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
             num_kv_heads=2, head_dim=64)
# The decode model's fused layers beside the table's shapes: q/k/v 4096 x 12288, gate/up 4096 x 22016
DECODE_SHAPES = [(4096, 12288), (4096, 22016)]
DOTS_NOTE = {0: ", the K-packed one with the nibbles reshaped into one dot (the faster form here).",
             1: ", the K-packed one with a dot per nibble (the faster form here)."}
DEFAULT_TILE = (256, 128, 4, 0, 0, 0, 0)  # KPACK_GEMV_TILE, timed on an H200 on 2026-12-04
DECODE = [("float16", False), ("W4A16", "awq"), ("W4A16", "kpack")]


def render(res: dict) -> str:
    bw = max(res["bandwidth"]["copy_GBs"], res["bandwidth"]["read_GBs"])
    lines = ["## W4A16 and decode on GPU (`bench/awq_gpu.py`)", "",
             f"Device: {res['device']}, torch {res.get('torch', '?')}, Triton {res.get('triton', '?')}. Memory "
             f"bandwidth measured in the same run: copy {res['bandwidth']['copy_GBs']:.0f} GB/s (bytes read and "
             f"written), read {res['bandwidth']['read_GBs']:.0f} GB/s (a float16 sum); bounds below use the "
             f"higher, {bw:.0f} GB/s.", "",
             "W4A16 kernels (group size 128) over AutoAWQ's layout and over the K-packed one the engine makes at "
             "load, against float16 `torch.matmul` (cuBLAS); GPU time per call (CUDA graph of 20 calls, median "
             "of 7 replays):", "",
             "| K x N | M | fp16 matmul (us) | AutoAWQ layout (us) | GB/s | speedup | K-packed (us) | GB/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("kernel", []):
        cells = [f"{r[k + '_us']:.1f} | {r[k + '_GBs']:.0f} | {r[k + '_speedup']:.2f}x" if k + "_us" in r
                 else "– | – | –" for k in ("awq", "kpack")]
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['fp16_us']:.1f} | {cells[0]} | {cells[1]} |")
    t = res.get("gemv_tile") or {}
    if t and "kpack" in t:  # results of the runs before per-shape tiles: one tile per layout
        n = len({(r["layout"], r["block"], r["BK"], r["warps"], r.get("nibble_loop")) for r in res.get("gemv_sweep", [])})
        lines += ["", "M = 1 runs the one-row kernels with the tiles (columns, K rows, warps[, nibble loop]; AutoAWQ's "
                  f"layout counts packed columns) {', '.join(f'{k} {tuple(v[1:])}' for k, v in t.items())}, the fastest over the "
                  f"three shapes of the {n} tried in this run (times in the results JSON); larger M run the tiled "
                  "`tl.dot` kernels" + DOTS_NOTE.get(res.get("kpack_nibble_dots"), ".")]
    elif t:
        n = len({(r.get("kind"), tuple(r["tile"])) for r in res.get("gemv_sweep", [])})
        sweep = {(r["K"], r["N"], tuple(r["tile"])): r["us"] for r in res.get("gemv_sweep", [])
                 if r.get("kind", "kpack") == "kpack"}
        lines += ["", f"M = 1: the tiles the engine's tuner picks per shape at load (`engine/kernels/awq_tune.py`, "
                  f"{n} candidates timed in this run, all times in the results JSON). K-packed FMA kernel: "
                  "(columns, K rows per program (0: all), warps, nibble form, step, unroll, 1 + q/16 form); "
                  "tensor cores (`engine/kernels/awq_tc.py`): (columns, K rows per step, warps, split, folded "
                  "form, pipelining):", "",
                  "| K x N | K-packed FMA tile | us | the former default tile (us) | K-packed tensor cores | us "
                  "| AutoAWQ layout, tensor cores | us |", "|---|---|---|---|---|---|---|---|"]
        for k, v in t.items():
            d = sweep.get((*map(int, k.split("x")), DEFAULT_TILE))
            tcs = [f"{tuple(v[n])} | {v[n + '_us']:.1f}" if v.get(n) else "– | –" for n in ("kpack_tc", "tc")]
            lines.append(f"| {k} | {tuple(v['kpack'])} | {v['kpack_us']:.1f} | {f'{d:.1f}' if d else '–'} | "
                         f"{tcs[0]} | {tcs[1]} |")
        if res.get("layout"):
            lines += ["", f"The tuner's layout for the decode model below (its layers' one-row times summed): "
                      f"**{res['layout']}**."]
        lines += ["", "M > 1 (float16) runs the tensor-core kernels over either layout, from 256 rows on the "
                  "K-packed layout dequantizes and cuBLAS multiplies."]
    dec = res.get("decode", [])
    if dec:
        ctx = res.get("context", 128)
        lines += ["", f"Decode, Llama-2-7B shape (32 layers, hidden 4096, MLP 11008, 32 heads), random weights, "
                  f"{ctx} tokens cached per sequence, block size 64; bound = batch x bandwidth / (weights read "
                  "per step + the KV cache read):", "",
                  "| weights | batch | CUDA graphs | tok/s | step (ms) | bound tok/s | of bound |", "|---|---|---|---|---|---|---|"]
        for d in dec:
            bound = d["batch"] * bw / d["bytes_per_step_GB"]
            kind = f"W4A16, {'K-packed' if d.get('layout') == 'kpack' else 'AutoAWQ layout'}" if d["quant"] else "float16"
            lines.append(f"| {kind} ({d['weight_GB']:.2f} GB) | {d['batch']} | "
                         f"{'yes' if d['graphs'] else 'no'} | {d['tok_s']:.1f} | {d['step_ms']:.2f} | {bound:.0f} | "
                         f"{d['tok_s'] / bound:.0%} |")
        fp = {(d["batch"], d["graphs"]): d for d in dec if not d["quant"]}
        for layout, name in (("awq", "AutoAWQ layout"), ("kpack", "K-packed")):
            q = {(d["batch"], d["graphs"]): d for d in dec if d["quant"] and d.get("layout", "awq") == layout}
            if (1, True) in fp and (1, True) in q:
                lines += ["", f"Batch 1 from CUDA graphs, {name}: W4A16 / float16 = "
                          f"{q[(1, True)]['tok_s'] / fp[(1, True)]['tok_s']:.2f}x."]
    inputs = res.get("inputs", {})  # awq_tune.tune_inputs: {layout: {"kind KxN": [inside us, apart us]}}
    if inputs:
        lines += ["", "Products that make their own input (`engine/kernels/awq_input.py`), one row, as the decode "
                  "runs above had them: made inside the product against its own kernel (silu_mul, add_rmsnorm) "
                  "then the product; the faster is kept:", "",
                  "| layout | product | input | inside (us) | apart (us) | kept |", "|---|---|---|---|---|---|"]
        what = {"gated": "SiLU(gate) * up", "normed": "RMSNorm(x + residual) * w"}
        for layout, times in inputs.items():
            for key, (inside, apart) in times.items():
                kind, shape = key.split()
                lines.append(f"| {layout} | {shape} | {what[kind]} | {inside:.1f} | {apart:.1f} | "
                             f"{'inside' if inside <= apart else 'apart'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter) to check the script")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--json-out", help="also write the results here")
    ap.add_argument("--render", help="write the docs section from a results JSON and exit")
    ap.add_argument("--skip", default="dots",
                    help="comma list of sections to skip: sweep, dots, kernel, decode (default: dots, the float32-"
                         "dequantizing tiled kernel's two forms, which float16 products no longer run)")
    a = ap.parse_args()
    if a.render:
        table = render(json.loads(Path(a.render).read_text()))
        print(table)
        write_section("awq_gpu", table)
        return 0
    skip = set(filter(None, a.skip.split(",")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        shapes, ms, cfg, steps, ctx, batches = [(128, 64)], [1, 4], SMOKE, 3, 16, [1, 2]
        from engine.kernels.awq_tc import TcTile
        from engine.kernels.awq_gemv import GemvTile
        tiles, sweep_shapes = [GemvTile(64, 128, 4, 0), GemvTile(32, 0, 4, 1, magic=1)], shapes
        tc_tiles = [TcTile(64, 64, 4, 0, 1), TcTile(64, 128, 4)]
    else:
        shapes, ms, cfg, steps, ctx, batches = [(4096, 4096), (4096, 11008), (11008, 4096)], [1, 4, 16, 64, 256], \
            LLAMA7B, 64, 128, [1, 32]
        from engine.kernels.awq_tune import CANDIDATES as tiles
        from engine.kernels.awq_tune import TC_CANDIDATES as tc_tiles
        sweep_shapes = shapes + DECODE_SHAPES
    import triton
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)",
           "torch": torch.__version__, "triton": triton.__version__, "context": ctx}
    res["bandwidth"] = bandwidth(device)
    print(json.dumps(res), flush=True)

    def dump():
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res, indent=2))
    if "sweep" not in skip:  # the decode tiles first: the table and the decode runs below use the picks
        try:
            res["gemv_sweep"], chosen = gemv_sweep(sweep_shapes, device, tiles, tc_tiles)
            res["gemv_tile"] = {f"{K}x{N}": {k: list(v) if isinstance(v, tuple) else v for k, v in c._asdict().items()}
                                for (K, N, _), c in chosen.items()}
            from engine.kernels.awq_tune import pick_layout
            h, i = cfg["hidden_size"], cfg["intermediate_size"]
            layers = [(K, N, 128 if K % 128 == 0 else 32)  # q/k/v, o, gate/up, down: one each per layer
                      for K, N in ((h, 3 * h), (h, h), (h, 2 * i), (i, h))]
            if all(s in chosen for s in layers):
                res["layout"] = pick_layout({s: chosen[s] for s in layers}, dict.fromkeys(layers, 1))
            os.environ["RAYLM_W4A16_TUNE"] = "0"  # installed in this process: the decode runners need not tune
        except Exception:
            traceback.print_exc()
        dump()
    if "dots" not in skip:
        try:
            from engine.kernels import awq_triton
            tiled = [m for m in ms if 1 < m < awq_triton.DEQUANT_MIN_ROWS]
            res["dots_sweep"], awq_triton.KPACK_NIBBLE_DOTS = dots_sweep(shapes, tiled, device)
            res["kpack_nibble_dots"] = awq_triton.KPACK_NIBBLE_DOTS
        except Exception:
            traceback.print_exc()
        dump()
    if "kernel" not in skip:
        try:
            res["kernel"] = kernel_table(shapes, ms, device)
        except Exception:
            traceback.print_exc()
        dump()
    if "decode" not in skip:
        res["decode"] = []
        for name, layout in DECODE:
            quant = {"group_size": 128 if not a.smoke else 32} if layout else None
            if layout and device == "cuda":  # inputs made inside the products or apart: the faster for the runs
                try:
                    from engine.kernels.awq_tune import tune_inputs
                    G, h, i = quant["group_size"], cfg["hidden_size"], cfg["intermediate_size"]
                    made = {"gated": [(i, h, G)], "normed": [(h, 3 * h, G), (h, 2 * i, G)]}
                    t = tune_inputs(made, device, torch.float16, layout, use_cache=False)
                    res.setdefault("inputs", {})[layout] = {f"{kind} {K}x{N}": list(v)
                                                            for (kind, (K, N, _)), v in t.items()}
                except Exception:
                    traceback.print_exc()
            for batch in batches:
                for graphs in ((False, True) if batch == 1 and layout != "awq" else (True,)):
                    if graphs and device != "cuda":
                        continue
                    try:
                        d = decode_rate(cfg, quant, device, steps, ctx, batch, graphs, layout or "kpack")
                    except Exception:
                        traceback.print_exc()
                        continue
                    print(json.dumps(d), flush=True)
                    res["decode"].append(d)
                    dump()
    publish("awq_gpu" if device == "cuda" else "awq_gpu_smoke", res, render(res), not a.no_doc, "awq_gpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
