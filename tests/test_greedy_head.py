"""The LM head's greedy screen (engine/kernels/greedy_head.py, csrc/greedy_head.c): the token it returns is
the argmax of the full head's float32 logits (the panel products, then torch.argmax), first index on ties."""
import pytest
import torch

from engine.generation import GenerationConfig
from engine.kernels import cpu_gemm, cpu_native, greedy_head

pytestmark = pytest.mark.skipif(cpu_native.lib() is None or not greedy_head.available(),
                                reason="needs the native kernels built with AVX-512 VNNI")


def full_argmax(x, panels):
    return cpu_gemm.linear(x.contiguous(), panels, None).argmax(-1)


def exhaustive(panels):
    """A screen that never gives up for lack of narrowing: what it returns must be exact."""
    gh = greedy_head.GreedyHead(panels)
    gh.max_panels = 1 << 30
    return gh


@pytest.mark.parametrize("V,K", [(1000, 64), (333, 100), (4099, 36)])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 32])
def test_random_logits_argmax_matches_the_full_head(V, K, M):
    """Gaussian logits: many entries near the top, so every one the bound wrongly dropped would show. K of 100
    and 36 leave a partial group of 32 and a partial quad of 4; V a partial panel of 16."""
    g = torch.Generator().manual_seed(V * 100 + M)
    panels = cpu_gemm.Panels(torch.randn(V, K, generator=g) * 0.05)
    gh = exhaustive(panels)
    for trial in range(4):
        x = torch.randn(M, K, generator=g) * (1 + 10 * trial)  # rows of very different magnitudes
        assert torch.equal(gh.tokens(x), full_argmax(x, panels))
    assert gh.fallbacks == 0


def test_exact_int8_groups_with_outlier_activations():
    """Weights that are int8 times a scale per 32 (a GGUF Q8_0 head: no weight rounding left) and hidden states
    with a few large channels (as LLMs have): the bound is at its tightest and still holds."""
    g = torch.Generator().manual_seed(7)
    V, K = 2048, 128
    q = torch.randint(-127, 128, (V, K // 32, 32), generator=g).float()
    w = (q * torch.rand(V, K // 32, 1, generator=g) * 1e-3).reshape(V, K)
    panels = cpu_gemm.Panels(w)
    gh = exhaustive(panels)
    x = torch.randn(64, K, generator=g)
    x[:, [3, 77]] *= 40
    for M in (1, 7, 32):
        assert torch.equal(gh.tokens(x[:M]), full_argmax(x[:M], panels))


def test_ties_resolve_to_the_first_index_as_torch_argmax():
    """Rows 5, 700 and 1500 hold the same weights (in different panels): equal float32 logits."""
    g = torch.Generator().manual_seed(3)
    V, K = 2000, 64
    w = torch.randn(V, K, generator=g) * 0.01
    top = torch.randn(K, generator=g)
    for v in (1500, 700, 5):
        w[v] = top
    panels = cpu_gemm.Panels(w)
    x = torch.stack([top, top * 2, -top])
    want = full_argmax(x, panels)
    assert want[:2].tolist() == [5, 5]
    gh = greedy_head.GreedyHead(panels)
    assert torch.equal(gh.tokens(x), want)


def test_a_clear_winner_is_screened_without_computing_the_rest():
    """Each row's top logit stands well clear of the others: the default share of panels is enough."""
    g = torch.Generator().manual_seed(11)
    V, K = 8192, 96
    w = torch.randn(V, K, generator=g) * 0.02
    x = torch.randn(32, K, generator=g)
    winners = torch.randperm(V, generator=g)[:32]
    w[winners] = x * 0.2  # logit |x|^2 * 0.2 ~ 19 against others ~ N(0, 0.2)
    panels = cpu_gemm.Panels(w)
    gh = greedy_head.GreedyHead(panels)
    got = gh.tokens(x)
    assert got is not None and gh.fallbacks == 0
    assert torch.equal(got, winners) and torch.equal(got, full_argmax(x, panels))


def test_it_gives_up_when_it_cannot_narrow_or_meets_non_finite_values():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1, 64, generator=g).repeat(4096, 1)  # every logit equal: every panel a candidate
    gh = greedy_head.GreedyHead(cpu_gemm.Panels(w))
    assert gh.tokens(torch.randn(2, 64, generator=g)) is None
    x = torch.randn(2, 64, generator=g)
    x[1, 3] = float("nan")
    assert gh.tokens(x) is None
    assert gh.fallbacks == 2 and gh.screened == 0
    bad = torch.randn(64, 64, generator=g)
    bad[10, 10] = float("inf")
    head = torch.nn.Module()
    head.packed, head.released, head.bias = cpu_gemm.Panels(bad), True, None
    assert greedy_head.greedy_head_for(head) is None


def test_engine_screens_plain_greedy_steps_only(tmp_path, smol_dir):
    """A tiny Llama: greedy requests take the screen and give the tokens of the full head (the screen switched
    off); a request that reads the logits (logprobs, a penalty) or samples takes the full head."""
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    from tiny_models import make_hf_model
    make_hf_model("llama", smol_dir, tmp_path / "m", seed=2)
    engine = LLMEngine(model=str(tmp_path / "m"), num_cpu_blocks=64, block_size=8)
    gh = engine.runner.greedy_head
    if gh is None:
        pytest.skip("the engine's LM head is not panel-packed here")
    gh.max_panels = 1 << 30  # random weights: keep every step on the screen
    pipe = Pipeline(engine)
    prompts = [[5, 9, 200, 31], [7] * 11, [100, 3, 4]]
    greedy = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    screened = [o.token_ids for o in pipe(prompts, greedy)]
    assert gh.screened > 0
    engine.runner.greedy_head = None
    assert [o.token_ids for o in pipe(prompts, greedy)] == screened
    engine.runner.greedy_head = gh
    before = gh.screened
    for cfg in (greedy.model_copy(update={"logprobs": 2}), greedy.model_copy(update={"repetition_penalty": 1.3}),
                GenerationConfig(max_new_tokens=4, temperature=0.8, seed=1)):
        out = pipe(prompts[:1], cfg)[0]
        assert len(out.token_ids) == cfg.max_new_tokens
    assert gh.screened == before
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
