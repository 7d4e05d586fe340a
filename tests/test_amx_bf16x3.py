"""matmul_precision="high": float32 products as three bfloat16 products on AMX tiles (csrc/amx_bf16x3.c).

Oracles: float64 products of the same tensors (error bounded by the bf16x3 analysis, and far below what one
bfloat16 product gives), and Hugging Face transformers' float32 generate and logits for whole models.
The kernel tests skip where the processor has no AMX; the engine test then checks the fallback."""
import pytest
import torch

from engine.config import EngineConfig
from engine.kernels import cpu_gemm
from engine.llm_engine import LLMEngine
from test_hf_parity import check_model, random_prompts
from tiny_models import make_hf_model

needs_amx = pytest.mark.skipif(not cpu_gemm.x3_available(), reason="no AMX tiles on this processor")


def _err(y, x, w, b=None):
    """max |y - x w^T - b| over the sum of the products' magnitudes, in float64"""
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    return float(((y.double() - ref).abs() / (x.double().abs() @ w.double().abs().t() + 1e-30)).max())


@needs_amx
@pytest.mark.parametrize("n,k", [(50, 40), (96, 64), (960, 576)])
def test_products_match_float64(n, k):
    """Every token count from one tile's rows to several 32-row blocks and a 256-row chunk boundary, outputs
    and inputs that are not multiples of 32, with a bias: within 1e-5 of the products' magnitudes (dropping
    x_lo w_lo and the parts' rounding cost about 2^-16 per product), and at least 50x closer than one
    bfloat16 product of the same tensors (about 2^-8)."""
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)
    packed = cpu_gemm.Panels(w)
    packed.x3 = cpu_gemm.X3Weight(w)
    for m in (16, 17, 31, 33, 64, 300):
        x = torch.randn(m, k, generator=g)
        y = cpu_gemm.linear(x, packed, b)
        one_bf16 = (x.bfloat16().float() @ w.bfloat16().float().t()) + b
        assert y.shape == (m, n)
        assert _err(y, x, w, b) < 1e-5, m
        assert _err(y, x, w, b) * 50 < _err(one_bf16, x, w, b), m


@needs_amx
def test_few_tokens_keep_the_float32_panels():
    """Below x3_min_rows() rows (X3_MIN_M in the C header) the products stay IEEE float32 (the panels):
    float32-sized error only."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 64, generator=g)
    packed = cpu_gemm.Panels(w)
    packed.x3 = cpu_gemm.X3Weight(w)
    x = torch.randn(cpu_gemm.x3_min_rows() - 1, 64, generator=g)
    assert _err(cpu_gemm.linear(x, packed, None), x, w) < 1e-6


def test_precision_field_is_checked():
    with pytest.raises(ValueError, match="matmul_precision"):
        EngineConfig(matmul_precision="medium")
    with pytest.raises(ValueError, match="matmul_precision"):
        cpu_gemm.pack_model(torch.nn.Linear(2, 2), "low")


def _tiny_linears():
    from engine.layers.linear import Linear
    model = torch.nn.Sequential(Linear(64, 96), Linear(96, 64))
    for m in model:
        m.weight.data.normal_()
    return model


@needs_amx
def test_high_precision_packs_the_panels_after_another_backend_was_chosen(monkeypatch):
    """An earlier engine in the process settled on oneDNN: a model asking for "high" still gets panels with
    their bf16x3 copies (the products dispatch on each weight's packed type)."""
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "_choice", "onednn")
    model = _tiny_linears()
    assert cpu_gemm.pack_model(model, "high") == 2
    assert all(isinstance(m.packed, cpu_gemm.Panels) and m.packed.x3 is not None for m in model)


def test_high_precision_that_cannot_apply_says_so(monkeypatch, caplog):
    """Without AMX, or with RAYLM_CPU_GEMM naming a backend other than the panels, "high" changes nothing, and
    the log says so instead of staying silent."""
    monkeypatch.setattr(cpu_gemm, "_choice", cpu_gemm._choice)  # whatever pack_model settles stays in this test
    if cpu_gemm.x3_available():
        monkeypatch.setenv(cpu_gemm.ENV, "mkl")
        monkeypatch.setattr(cpu_gemm, "_choice", None)
        expect = "RAYLM_CPU_GEMM=mkl"
    else:
        expect = "no AMX"
    with caplog.at_level("WARNING", logger=cpu_gemm.__name__):
        cpu_gemm.pack_model(_tiny_linears(), "high")
    assert any(expect in r.getMessage() and "IEEE float32" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_high_precision_engine_matches_hf(tmp_path, smol_dir, arch, monkeypatch):
    """Twenty prompts decoding together run whole native layers on the bf16x3 copies (20 >= x3_min_rows()) and
    their prefill chunks the token-major products: greedy tokens identical to transformers' float32 generate,
    last-position logits within 1e-4. Without AMX, "high" packs no copies and the same holds."""
    monkeypatch.setattr(cpu_gemm, "_choice", None if cpu_gemm.x3_available() else "native")
    if not cpu_gemm.native_available():
        pytest.skip("no panel products on this machine")
    hf = make_hf_model(arch, smol_dir, tmp_path / "m", seed=6)
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=8, max_prefill_tokens=256, num_cpu_blocks=256,
                       matmul_precision="high")
    model = engine.runner.model
    assert (model.layers[0].mlp.gate_up.packed.x3 is not None) == cpu_gemm.x3_available()
    assert (model.lm_head.packed.x3 is not None) == cpu_gemm.x3_available()
    fused = model.fused_decoder
    assert fused is not None and fused.panels
    assert bool(fused.structs[0].x_gu) == cpu_gemm.x3_available()
    runs = []
    run = fused.run
    fused.run = lambda x, meta, kv: (runs.append(x.shape[0]), run(x, meta, kv))[1]
    lengths = [3, 9, 14, 20, 5, 31, 7, 12, 26, 4, 17, 11, 40, 2, 23, 8, 19, 6, 29, 15]
    check_model(engine, hf, random_prompts(lengths, seed=6), n_new=10)
    assert max(runs) == 20


@needs_amx
@pytest.mark.slow
def test_smollm2_high_precision_matches_hf(smol_hf, smol_tok):
    """SmolLM2 itself, sixteen prompts decoding together on the bf16x3 copies: transformers' tokens and logits.
    (Prompts whose greedy continuation meets EOS within 16 tokens are left out: HF's min_new_tokens masks EOS,
    our ignore_eos does not.)"""
    engine = LLMEngine(max_batch_size=16, block_size=16, max_prefill_tokens=256, cache_max_entry_count=1,
                       matmul_precision="high")
    assert engine.runner.model.fused_decoder.structs[0].x_qkv
    texts = ["Hello", "The capital of France is", "Write a long story about a dragon who learns to code. " * 3,
             "1, 2, 3, 5, 8, 13,", "def fibonacci(n):", "The quick brown fox", "Water boils at",
             "List three colours:", "Once upon a time", "The meaning of life is", "import numpy as np\n",
             "Translate to French: good morning", "2 + 2 =", "The sun rises in the", "In 1492,", "Dear Sir,"]
    check_model(engine, smol_hf, [smol_tok.encode(t) for t in texts], n_new=16)
