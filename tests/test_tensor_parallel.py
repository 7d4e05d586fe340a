"""Tensor parallelism: the head partition by hand, sharded layers against the full layer (torch oracle),
and tp=2 engines (Ray worker actors, gloo all-reduce) against tp=1 on SmolLM2 and tiny random models, with
fp and AWQ weights, int8 KV, and converted per-rank shards."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.parallel.partition import plan, working_tps
from tiny_models import make_hf_model

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 300, 4000, 12, 99, 7], [3, 14, 15, 92, 65, 35, 89, 79, 323, 84, 62, 64, 33, 83, 27, 95, 2, 88],
           [42]]


def test_partition_by_hand():
    # SmolLM2: 9 heads in 3 KV groups of 3; tp=2 deals the groups 2 + 1
    a, b = plan(9, 3, 1536, 2, 64)
    assert (a.q_heads, a.kv_heads, a.inter) == (tuple(range(6)), (0, 1), (0, 768))
    assert (b.q_heads, b.kv_heads, b.inter) == ((6, 7, 8), (2,), (768, 768))
    # 4 heads, 1 KV head, tp=2: each rank holds a replica of the KV head and 2 query heads
    a, b = plan(4, 1, 128, 2, 16)
    assert (a.q_heads, a.kv_heads, b.q_heads, b.kv_heads) == ((0, 1), (0,), (2, 3), (0,))
    assert working_tps(9, 3) == [1, 2, 3, 9]
    with pytest.raises(ValueError, match=r"tp: 4 cannot split 9 attention heads.*\[1, 2, 3, 9\]"):
        plan(9, 3, 1536, 4, 64)
    with pytest.raises(ValueError, match="intermediate_size 100 does not split into 3"):
        plan(6, 3, 100, 3, 16)
    with pytest.raises(ValueError, match="not a multiple of the AWQ group size 64"):
        plan(4, 2, 256, 2, 16, group_size=64)  # 2 heads x 16 = 32 inputs of o_proj per rank


def test_sharded_layers_recompose_the_full_layer():
    """Column-parallel outputs concatenate, row-parallel partial outputs sum, to the full layer's (dense and AWQ)."""
    from engine.models.args import ModelArgs
    from engine.parallel.shard import shard_state_dict
    from engine.kernels.awq_torch import dequantize_awq, pack_columns
    g = torch.Generator().manual_seed(0)
    H, KVH, D, hid, inter, G = 4, 2, 16, 64, 128, 32
    args = ModelArgs("LlamaForCausalLM", 100, hid, inter, 1, H, KVH, D, 1e-5, 64, 1e4)
    qkv = torch.randn(H * D + 2 * KVH * D, hid, generator=g)
    o = torch.randn(hid, H * D, generator=g)

    def awq(out, inn):
        q = torch.randint(0, 16, (inn, out), generator=g, dtype=torch.int32)
        z = torch.randint(0, 16, (inn // G, out), generator=g, dtype=torch.int32)
        return {"qweight": pack_columns(q), "qzeros": pack_columns(z), "scales": torch.rand(inn // G, out, generator=g)}
    down_q = awq(hid, inter)
    full = {"layers.0.attn.qkv.weight": qkv, "layers.0.attn.o.weight": o, "layers.0.attn.o.bias": torch.ones(hid),
            **{f"layers.0.mlp.down.{k}": v for k, v in down_q.items()}}
    x = torch.randn(3, hid, generator=g)
    xo = torch.randn(3, H * D, generator=g)
    xi = torch.randn(3, inter, generator=g)
    lays = plan(H, KVH, inter, 2, D, group_size=G)
    shards = [shard_state_dict(full, args, lay, G) for lay in lays]
    # q/k/v: each rank's q, k, v rows are the full layer's rows of its heads
    full_y = x @ qkv.t()
    for lay, sh in zip(lays, shards):
        y = x @ sh["layers.0.attn.qkv.weight"].t()
        nq, nk = lay.num_heads * D, lay.num_kv_heads * D
        q_rows = torch.cat([full_y[:, h * D:(h + 1) * D] for h in lay.q_heads], 1)
        k_rows = torch.cat([full_y[:, H * D + h * D:H * D + (h + 1) * D] for h in lay.kv_heads], 1)
        assert torch.allclose(y[:, :nq], q_rows) and torch.allclose(y[:, nq:nq + nk], k_rows)
    # o: the rank inputs are the rank's head columns; partial outputs (bias on rank 0 only) sum to the full one
    parts = [torch.cat([xo[:, h * D:(h + 1) * D] for h in lay.q_heads], 1) @ sh["layers.0.attn.o.weight"].t()
             + sh["layers.0.attn.o.bias"] for lay, sh in zip(lays, shards)]
    assert torch.allclose(sum(parts), xo @ o.t() + 1, atol=1e-4)
    # AWQ down: row-parallel split on group boundaries
    w_full = dequantize_awq(down_q["qweight"], down_q["qzeros"], down_q["scales"])
    parts = [xi[:, lay.inter[0]:sum(lay.inter)] @ dequantize_awq(*(sh[f"layers.0.mlp.down.{k}"]
                                                                     for k in ("qweight", "qzeros", "scales")))
             for lay, sh in zip(lays, shards)]
    assert torch.allclose(sum(parts), xi @ w_full, atol=1e-3)


def test_shared_memory_all_reduce_sums_and_agrees_across_ranks():
    """Two ranks (threads here, processes in the engine) reduce tensors of changing sizes, more rounds than
    the two alternating buffers; every result equals the hand sum, bit for bit on both ranks."""
    import threading
    import uuid
    from engine.parallel.shm_allreduce import ShmAllReduce, supported
    if not supported():
        pytest.skip("shared-memory all-reduce is x86-64 only")
    name = f"raylm-test-{uuid.uuid4().hex}"
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(n, 8, generator=g) for n in (1, 5, 3, 7, 2)] for _ in range(2)]
    results = [[], []]

    def rank(r):
        ar = ShmAllReduce(name, r, 2, 64)
        for t in inputs[r]:
            results[r].append(ar(t.clone()))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ShmAllReduce(name, 0, 2, 64).close()
    for a, b, x, y in zip(results[0], results[1], inputs[0], inputs[1]):
        assert torch.equal(a, b) and torch.allclose(a, x + y)


@pytest.fixture(scope="module")
def ray_local():
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def run_engine(model, prompts=PROMPTS, results=None, **kw):
    """Greedy outputs and the logits of the first prompt's last position (``results``: a list that gets the
    full responses, with the top-2 logprobs of every step)."""
    from engine.core.messages import ScheduledSeq, SchedulerOutput
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    eng = LLMEngine(model=model, block_size=16, num_cpu_blocks=64, max_batch_size=8, tp_worker_cpus=0.5, **kw)
    try:
        responses = Pipeline(eng)(prompts, {**GREEDY, "logprobs": 2})
        if results is not None:
            results.extend(responses)
        out = [r.token_ids for r in responses]
        logits = eng.runner.logits_for(SchedulerOutput(seqs=[ScheduledSeq("x", prompts[0], 0, [0], sample=True)]))
        return out, logits.cpu()
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def tiny_mqa(tmp_path_factory, smol_dir):
    """4 query heads and 1 KV head: tp=2 replicates the KV head."""
    root = tmp_path_factory.mktemp("tp-tiny")
    make_hf_model("llama", smol_dir, root / "fp", seed=5, num_attention_heads=4, num_key_value_heads=1)
    return root / "fp"


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_tp2_equals_tp1_on_a_model_whose_kv_head_is_replicated(ray_local, tiny_mqa, quant_policy):
    ref, ref_logits = run_engine(str(tiny_mqa), quant_policy=quant_policy)
    out, logits = run_engine(str(tiny_mqa), tp=2, quant_policy=quant_policy)
    assert out == ref
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_tp2_with_static_kv_parameters_equals_tp1(ray_local, tmp_path, smol_dir):
    """Static per-head int8 KV parameters (kv_qparams) under tp=2: each rank takes its KV head's pair (the
    heads' ranges differ fourfold, so a rank holding the other head's would clip or coarsen its K/V)."""
    from safetensors.torch import save_file
    make_hf_model("llama", smol_dir, tmp_path / "m", seed=9)  # 4 heads, 2 KV heads: one per rank
    half = torch.tensor([[1.0, 4.0], [1.5, 6.0]])  # [layers, KV heads]: each head's range is +-half
    save_file({f"int8.{k}_{w}": (2 * half / 255 if w == "scale" else torch.zeros(2, 2)).contiguous()
               for k in "kv" for w in ("scale", "zp")}, str(tmp_path / "kv_qparams.safetensors"))
    kw = dict(quant_policy=8, kv_qparams=str(tmp_path))
    ref = []
    ref_out, ref_logits = run_engine(str(tmp_path / "m"), results=ref, **kw)
    out, logits = run_engine(str(tmp_path / "m"), tp=2, **kw)
    for r, got in zip(ref, out):
        assert_greedy_agrees_up_to_a_near_tie(r, got)
    assert torch.allclose(logits, ref_logits, atol=2e-2, rtol=1e-3)


def test_tp2_with_shared_memory_all_reduce_equals_tp1(ray_local, tiny_mqa, monkeypatch):
    ref, ref_logits = run_engine(str(tiny_mqa))
    monkeypatch.setenv("RAYLM_TP_SHM", "1")
    out, logits = run_engine(str(tiny_mqa), tp=2)
    assert out == ref
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_tp2_with_speculative_drafts_matches_hf(ray_local, tiny_mqa):
    """Draft rows go to every rank (each computes its heads for them); rank 0 verifies them."""
    from transformers import AutoModelForCausalLM

    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    prompts = [[7, 8, 9] * 4, [300, 301] * 15 + [5]]
    eng = LLMEngine(model=str(tiny_mqa), tp=2, block_size=16, num_cpu_blocks=64, max_batch_size=8,
                    tp_worker_cpus=0.5, num_speculative_tokens=3)
    try:
        outs = Pipeline(eng)(prompts, {**GREEDY, "max_new_tokens": 16})
        drafts = eng.stats["draft_tokens"]
    finally:
        eng.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_mqa), dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                              pad_token_id=0, eos_token_id=[])
        assert o.token_ids == ref[0, len(p):].tolist()
    assert drafts > 0


def test_tp2_equals_tp1_on_smollm2(ray_local):
    ref, ref_logits = run_engine(None)
    out, logits = run_engine(None, tp=2)
    assert out == ref
    assert torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-4)
    ref8 = []
    run_engine(None, results=ref8, quant_policy=8)
    out8, _ = run_engine(None, tp=2, quant_policy=8)
    for r, got in zip(ref8, out8):
        assert_greedy_agrees_up_to_a_near_tie(r, got)


def assert_greedy_agrees_up_to_a_near_tie(ref, got, gap=0.05):
    """int8 KV rounding turns last-digit float differences (tp=2 sums in another order) into logit changes of
    ~1e-2, so the two may part only where the reference's best two tokens were that close."""
    for j, (a, b) in enumerate(zip(ref.token_ids, got)):
        if a != b:
            top = dict(ref.logprobs[j].top_logprobs)
            assert b in top and top[a] - top[b] < gap, (j, ref.token_ids, got, ref.logprobs[j])
            return
    assert len(got) == len(ref.token_ids)


def rtn_checkpoint(model_dir, work, group: int) -> str:
    """A W4 AWQ-layout checkpoint (round to nearest: no calibration) written by quant_jobs."""
    cmd = [sys.executable, "-m", "quant_jobs", "auto_awq", "--model", str(model_dir), "--work-dir", str(work),
           "--w-group-size", str(group), "--no-parallel", "--rtn"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(work / "quantized")


@pytest.mark.parametrize("which", ["tiny", "tiny_kept", "smollm2"])
def test_tp2_equals_tp1_with_awq_weights(ray_local, tmp_path, smol_dir, which):
    """tiny_kept: its o and down products kept in full precision (AutoAWQ's modules_to_not_convert), row-parallel
    float weights beside the AWQ column-parallel ones."""
    if which.startswith("tiny"):
        make_hf_model("llama", smol_dir, tmp_path / "fp", seed=9)
        model = rtn_checkpoint(tmp_path / "fp", tmp_path / "w", 32)
        if which == "tiny_kept":
            from test_awq_engine import _keep_full_precision
            _keep_full_precision(Path(model), tmp_path / "kept", ["o_proj", "down_proj"])
            model = str(tmp_path / "kept")
    else:  # SmolLM2 g64: rank 0 holds 6 heads (384 o_proj inputs), rank 1 holds 3 (192), both on group bounds
        model = rtn_checkpoint(smol_dir, tmp_path / "w", 64)
    ref, ref_logits = run_engine(model)
    out, logits = run_engine(model, tp=2)
    assert out == ref
    assert torch.allclose(logits, ref_logits, atol=1e-3 if which == "smollm2" else 1e-4, rtol=1e-4)


def test_converted_shards_load_and_match(ray_local, tiny_mqa, tmp_path):
    dst = tmp_path / "tp2"
    p = subprocess.run([sys.executable, "-m", "engine", "convert", str(tiny_mqa), "--tp", "2", "--dst", str(dst)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((dst / "raylm_tp.json").read_text())["tp"] == 2
    assert sorted(f.name for f in dst.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    assert not list(tmp_path.glob(".tp2.tmp-*"))
    ref, _ = run_engine(str(tiny_mqa))
    out, _ = run_engine(str(dst), tp=2)
    assert out == ref
    from engine.llm_engine import LLMEngine
    with pytest.raises(ValueError, match="holds shards for tp=2, not tp=4"):
        LLMEngine(model=str(dst), tp=4)
    p = subprocess.run([sys.executable, "-m", "engine", "convert", str(tiny_mqa), "--tp", "2", "--dst", str(dst)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "is not empty" in p.stderr


def test_bad_tp_is_a_clear_error_before_any_work(ray_local):
    from engine.llm_engine import LLMEngine
    with pytest.raises(ValueError, match=r"tp: 4 cannot split 9 attention heads.*\[1, 2, 3, 9\]"):
        LLMEngine(tp=4)
    with pytest.raises(ValueError, match=r"tp: 3 workers need 3 x .*cluster has"):
        LLMEngine(tp=3, tp_worker_cpus=64)
