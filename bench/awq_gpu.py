"""GPU: the W4A16 Triton kernel against float16 torch.matmul, and batch-1 decode of a Llama-2-7B-shaped model
(random weights) with W4A16 against float16, beside the memory-bandwidth bound measured in the same run.

    python bench/awq_gpu.py                 # on a CUDA machine
    TRITON_INTERPRET=1 python bench/awq_gpu.py --smoke --no-doc    # tiny shapes on CPU, checks the script runs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import save_json, write_section  # noqa: E402


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth_gbs(device: str, repeats: int) -> float:
    x = torch.empty(2 ** 28 if device == "cuda" else 2 ** 20, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    s = timed(lambda: y.copy_(x), repeats, device)
    return 2 * x.numel() * 2 / s / 1e9  # read + write


def random_awq(K: int, N: int, G: int, device: str):
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), dtype=torch.int32, device=device)
    qz = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // G, N // 8), dtype=torch.int32, device=device)
    s = (torch.rand(K // G, N, device=device) * 0.01).half()
    return qw, qz, s


def kernel_table(shapes, ms, device, repeats):
    from engine.kernels.awq_triton import awq_matmul
    rows = []
    dtype = torch.float16 if device == "cuda" else torch.float32
    for K, N in shapes:
        qw, qz, s = random_awq(K, N, 128 if K % 128 == 0 else 32, device)
        w = torch.randn(K, N, device=device, dtype=dtype)
        for m in ms:
            x = torch.randn(m, K, device=device, dtype=dtype)
            t_q = timed(lambda: awq_matmul(x, qw, qz, s), repeats, device)
            t_f = timed(lambda: x @ w, repeats, device)
            rows.append({"K": K, "N": N, "M": m, "w4a16_us": t_q * 1e6, "fp16_us": t_f * 1e6, "speedup": t_f / t_q})
            print(rows[-1], flush=True)
    return rows


def decode_rate(args_kw, quant, device, steps, context) -> dict:
    """Batch-1 decode through the engine's model and runner, random weights, context tokens cached."""
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
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    bs = 64
    blocks = -(-(context + steps + 1) // bs)
    runner = ModelRunner(model, blocks, bs, device, dtype, [0])
    ids = list(range(blocks))

    def step(pos):
        msg = ScheduledSeq("r", [7], pos, ids, sample=False)
        runner.logits_for(SchedulerOutput(seqs=[msg]))
    step(context)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(context + i)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / steps
    return {"tok_s": 1 / secs, "weight_GB": nbytes / 1e9}


LLAMA7B = dict(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
               max_position_embeddings=4096, rope_theta=10000.0)
SMOKE = dict(LLAMA7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
             num_kv_heads=2, head_dim=64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter) to check the script")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        shapes, ms, repeats, cfg, steps, ctx = [(128, 64)], [1, 4], 2, SMOKE, 3, 16
    else:
        shapes, ms, repeats, cfg, steps, ctx = [(4096, 4096), (4096, 11008), (11008, 4096)], [1, 4, 16, 64], 50, \
            LLAMA7B, 64, 128
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    bw = bandwidth_gbs(device, repeats)
    kern = kernel_table(shapes, ms, device, repeats)
    fp = decode_rate(cfg, None, device, steps, ctx)
    q = decode_rate(cfg, {"group_size": 128 if not a.smoke else 32}, device, steps, ctx)
    res = {"device": name, "bandwidth_GBs": bw, "kernel": kern, "decode_fp16": fp, "decode_w4a16": q}
    save_json("awq_gpu", res)
    lines = [f"## W4A16 on GPU (`bench/awq_gpu.py`)", "", f"Device: {name}; copy bandwidth measured here "
             f"{bw:.0f} GB/s.", "", "| K x N | M | W4A16 (us) | fp16 matmul (us) | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['K']}x{r['N']} | {r['M']} | {r['w4a16_us']:.1f} | {r['fp16_us']:.1f} | {r['speedup']:.2f}x |"
              for r in kern]
    bound = bw * 1e9 / (q["weight_GB"] * 1e9)
    lines += ["", f"Batch-1 decode, Llama-2-7B shape, random weights, {ctx}-token context: fp16 "
              f"{fp['tok_s']:.1f} tok/s, W4A16 {q['tok_s']:.1f} tok/s ({q['tok_s'] / fp['tok_s']:.2f}x); the "
              f"W4A16 weights ({q['weight_GB']:.2f} GB) bound decode at {bound:.0f} tok/s, so W4A16 reaches "
              f"{q['tok_s'] / bound:.0%} of it."]
    table = "\n".join(lines)
    print(table)
    if not a.no_doc:
        write_section("awq_gpu", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
