"""Greedy outputs token-identical to Hugging Face ``generate`` and next-token logits within 1e-4 relative."""
import random

import pytest
import torch

from engine.core.messages import RunnerOutput, SchedulerOutput
from engine.generation import GenerationConfig
from engine.llm_engine import LLMEngine
from engine.offline import Pipeline
from tiny_models import make_hf_model, write_internlm2


def hf_greedy(hf, prompt_ids, n):
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_last_logits(hf, prompt_ids):
    with torch.no_grad():
        return hf(torch.tensor([prompt_ids])).logits[0, -1].float()


def engine_prompt_logits(engine: LLMEngine, prompts):
    """Prefill all prompts together (chunked under the engine's token budget); each one's last-position logits."""
    ids = [engine.add_request(p, GenerationConfig(max_new_tokens=1)) for p in prompts]
    got = {}
    while len(got) < len(ids):
        sched: SchedulerOutput = engine.scheduler.schedule()
        logits = engine.runner.logits_for(sched)
        rows = [s.request_id for s in sched.seqs if s.sample]
        rows = sorted(rows, key=lambda r: len(next(s for s in sched.seqs if s.request_id == r).token_ids) > 1)
        for r, row in zip(rows, logits):
            got[r] = row
        engine.scheduler.update(sched, RunnerOutput())  # advance computed counts without sampling
    for rid in ids:
        engine.abort(rid)
    return [got[rid] for rid in ids]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check_model(engine, hf, prompts, n_new):
    pipe = Pipeline(engine)
    outs = pipe(prompts, GenerationConfig(max_new_tokens=n_new, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, n_new)
        assert o.finish_reason == "length"
    for p, lg in zip(prompts, engine_prompt_logits(engine, prompts)):
        assert rel_err(lg, hf_last_logits(hf, p)) < 1e-4
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def random_prompts(lengths, seed=0, vocab=49152):
    rnd = random.Random(seed)
    return [[rnd.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.slow
def test_smollm2_matches_hf(smol_engine, smol_hf, smol_tok):
    texts = ["Hello", "The capital of France is", "Write a long story about a dragon who learns to code. " * 6,
             "1, 2, 3, 5, 8, 13,"]
    prompts = [smol_tok.encode(t) for t in texts]
    gh = smol_engine.runner.greedy_head  # greedy steps screen the LM head where it is panel-packed (VNNI)
    screened = gh.screened if gh is not None else 0
    check_model(smol_engine, smol_hf, prompts, n_new=24)
    assert gh is None or gh.screened > screened


ROPES = {
    "default": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_tiny_llama_matches_hf(tmp_path, smol_dir, rope):
    hf = make_hf_model("llama", smol_dir, tmp_path / "m", seed=1, **ROPES[rope])
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=8, max_prefill_tokens=48, num_cpu_blocks=64)
    check_model(engine, hf, random_prompts([3, 17, 40, 70], seed=1), n_new=12)


def test_tiny_qwen2_matches_hf(tmp_path, smol_dir):
    hf = make_hf_model("qwen2", smol_dir, tmp_path / "m", seed=2)
    assert any("q_proj.bias" in k for k in hf.state_dict())
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=8, max_prefill_tokens=64, num_cpu_blocks=64)
    check_model(engine, hf, random_prompts([5, 33, 9, 60], seed=2), n_new=12)


def test_tiny_internlm2_matches_llama_oracle(tmp_path, smol_dir):
    hf = make_hf_model("llama", smol_dir, tmp_path / "llama", seed=3)
    write_internlm2(hf, tmp_path / "internlm2", smol_dir)
    engine = LLMEngine(model=str(tmp_path / "internlm2"), block_size=8, num_cpu_blocks=64)
    assert engine.model.args.architecture == "InternLM2ForCausalLM"
    check_model(engine, hf, random_prompts([4, 21, 50], seed=3), n_new=12)


def test_dynamic_ntk_beyond_context_matches_hf(tmp_path, smol_dir):
    """rope_scaling_factor switches dynamic NTK on; HF's 'dynamic' rope type is the oracle."""
    ours = tmp_path / "plain"
    make_hf_model("llama", smol_dir, ours, seed=4, max_position_embeddings=32)
    hf = make_hf_model("llama", smol_dir, tmp_path / "dyn", seed=4, max_position_embeddings=32,
                       rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    engine = LLMEngine(model=str(ours), block_size=8, num_cpu_blocks=64, rope_scaling_factor=2.0, session_len=200)
    prompts = random_prompts([20, 90], seed=4)
    for p, lg in zip(prompts, engine_prompt_logits(engine, prompts)):
        assert rel_err(lg, hf_last_logits(hf, p)) < 1e-4


@pytest.mark.parametrize("gemm", ["mkl", "onednn", "native"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_batches_beyond_the_fused_size_match_hf(tmp_path, smol_dir, arch, gemm, monkeypatch):
    """Twelve sequences decoding together take the phased native path under MKL (feature-major products),
    the token-major one under oneDNN, or whole native layers on the panel products, and every prefill step
    the token-major native path (qwen2 adds the qkv bias): still token-identical to transformers. On the
    panels, the layers' and the LM head's row-major weights are released (the panels carry every product, and
    a tied head's embedding rows)."""
    from engine.kernels import cpu_gemm
    from engine.kernels.fused_decode import MAX_TOKENS
    if gemm != "mkl" and not cpu_gemm.backend_available(gemm):
        pytest.skip(f"no {gemm} products on this machine")
    monkeypatch.setattr(cpu_gemm, "_choice", gemm)
    hf = make_hf_model(arch, smol_dir, tmp_path / "m", seed=5)
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=8, max_prefill_tokens=256, num_cpu_blocks=128)
    assert (engine.runner.model.lm_head.packed is not None) == (gemm != "mkl")
    fused = engine.runner.model.fused_decoder
    if fused is None:
        pytest.skip("native CPU kernels unavailable")
    assert fused.panels == (gemm == "native")
    released = [lin.released for layer in engine.runner.model.layers
                for lin in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)]
    assert all(released) if gemm == "native" else not any(released)
    model = engine.runner.model  # the LM head as well; a tied one's embedding then reads its panels (qwen2)
    assert model.lm_head.released == (gemm == "native")
    assert isinstance(model.embed, cpu_gemm.PanelEmbedding) == (gemm == "native" and model.args.tie_word_embeddings)
    from engine.kernels import greedy_head
    gh = engine.runner.greedy_head  # greedy steps screen the released head (random weights: or fall back)
    assert (gh is not None) == (gemm == "native" and greedy_head.available())
    calls = []
    for name in ("run", "run_phased", "run_mixed"):
        fn = getattr(fused, name)
        setattr(fused, name, lambda x, meta, kv, fn=fn, name=name: (
            calls.append((name, x.shape[0], bool(meta.prefills))), fn(x, meta, kv))[1])
    check_model(engine, hf, random_prompts([3, 9, 14, 20, 5, 31, 7, 12, 26, 4, 17, 11], seed=5), n_new=10)
    assert gh is None or gh.screened + gh.fallbacks > 0
    decode_path = {"mkl": "run_phased", "onednn": "run_mixed", "native": "run"}[gemm]
    assert max(n for name, n, pre in calls if name == decode_path and not pre) == 12 > MAX_TOKENS
    assert any(pre for name, _, pre in calls if name == "run_mixed")  # the prompts' prefill
