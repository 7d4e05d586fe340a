"""Sampler: each parameter's effect against hand-computed expectations, and seed reproducibility."""
import math

import torch

from engine.generation import GenerationConfig
from engine.sampler import SamplingState, apply_penalties, filter_logits, gather_logprobs, sample


def st(prompt=(), out=(), seed=None, **kw):
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    return SamplingState(params=GenerationConfig(**kw), prompt_ids=list(prompt), output_ids=list(out),
                         blocked_until_min=[0], generator=g)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    toks, _ = sample(logits, [st(temperature=0), st(top_k=1)])
    assert toks.tolist() == [1, 0]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    out = apply_penalties(logits, [st(prompt=[0], out=[1], repetition_penalty=2.0)])
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 1.0]]))


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, 4)
    out = apply_penalties(logits, [st(prompt=[3], out=[1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)])
    # token 1 seen twice: 0.5 + 2 * 0.25; token 2 once: 0.5 + 0.25; prompt token 3 untouched
    assert torch.allclose(out, torch.tensor([[0.0, -1.0, -0.75, 0.0]]))


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0]])
    out = filter_logits(logits, [st(temperature=0.5)])
    assert torch.allclose(out, torch.tensor([[2.0, 4.0]]))


def test_top_k_top_p_min_p_masks():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    keep = lambda s: torch.isfinite(filter_logits(logits, [s]))[0].tolist()  # noqa: E731
    assert keep(st(top_k=2)) == [True, True, False, False]
    assert keep(st(top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7, 0.75 covers it
    assert keep(st(top_p=0.45)) == [True, False, False, False]
    assert keep(st(min_p=0.35)) == [True, True, False, False]  # threshold 0.175
    assert keep(st(top_p=0.01)) == [True, False, False, False]  # the top token always stays


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    states = [st(temperature=1.0)] * 4000
    toks, _ = sample(logits, states)
    freq = torch.bincount(toks, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_sampling_never_draws_a_masked_token():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])  # zeros at both ends and between
    logits = probs.log().repeat(4000, 1)
    toks, _ = sample(logits, [st(temperature=1.0)] * 4000)
    freq = torch.bincount(toks, minlength=6).float() / 4000
    assert set(toks.tolist()) == {1, 4}
    assert abs(float(freq[1]) - 0.5) < 0.03
    toks, _ = sample(torch.tensor([[3.0, 2.0, 1.0, 0.5]]).repeat(500, 1), [st(temperature=1.0, top_k=2)] * 500)
    assert set(toks.tolist()) == {0, 1}


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)
    draws = lambda seed: [sample(logits, [s])[0].item() for s in [st(seed=seed)] for _ in range(20)]  # noqa: E731
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_min_new_tokens_blocks_end_tokens():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    toks, _ = sample(logits, [st(temperature=0, min_new_tokens=2, out=[1])])
    assert toks.item() != 0  # token 0 is the end token and only one output exists
    toks, _ = sample(logits, [st(temperature=0, min_new_tokens=1, out=[1])])
    assert toks.item() == 0


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    s = st(temperature=0, logprobs=2)
    toks, raw = sample(logits, [s])
    lp = gather_logprobs(raw, toks, [s])[0]
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert abs(lp[0] - (3 - z)) < 1e-6
    assert [t for t, _ in lp[1]] == [2, 1] and abs(lp[1][1][1] - (2 - z)) < 1e-6
