"""Speculative decoding by prompt lookup: the proposer, greedy acceptance, the scheduler's draft rows, and
engine outputs against Hugging Face ``generate`` with drafts on (greedy, stop tokens, lengths, mixed batches)."""
import pytest
import torch

from engine.config import EngineConfig
from engine.core.messages import RunnerOutput
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.sequence import Sequence
from engine.generation import GenerationConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import accept_greedy
from engine.offline import Pipeline
from engine.spec_decode import NgramProposer, eligible
from tiny_models import make_hf_model

G = GenerationConfig


def seq(tokens, rid="r", max_tokens=100):
    return Sequence(request_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens), max_tokens=max_tokens)


# ---- proposer -------------------------------------------------------------------------------
def test_proposer_takes_the_longest_ngram_and_the_tokens_after_it():
    p = NgramProposer(3, prompt_lookup_max=4, prompt_lookup_min=1)
    # the last 3-gram (1, 2, 3) occurred at 0..2; the 4-gram (9, 1, 2, 3) never did
    assert p.propose(seq([1, 2, 3, 9, 1, 2, 3]), limit=10) == ([9, 1, 2], 3)


def test_proposer_prefers_the_latest_match_and_respects_limits():
    p = NgramProposer(2, prompt_lookup_max=3, prompt_lookup_min=1)
    s = seq([5, 6, 5, 7, 5], rid="a")
    assert p.propose(s, limit=10) == ([7, 5], 1)  # 5 last occurred at 2, followed by 7, 5
    assert p.propose(s, limit=1) == ([7], 1)  # room for one draft only
    assert p.propose(s, limit=0) == ([], 0)
    s.token_ids += [8]  # incremental: the index learns the new positions
    assert p.propose(s, limit=10) == ([], 0)  # 8 never occurred before
    s.token_ids += [5, 7]
    assert p.propose(s, limit=10) == ([5, 8], 2)  # (5, 7) last seen at 2..3, followed by 5, 8
    strict = NgramProposer(2, prompt_lookup_max=3, prompt_lookup_min=3)
    assert strict.propose(seq([5, 6, 5, 7, 5], rid="b"), limit=10) == ([], 0)


def test_proposer_backs_off_for_requests_that_keep_few_drafts():
    from engine.spec_decode import PROBE_EVERY
    p = NgramProposer(3)
    s = seq([1, 2, 3, 1, 2, 3, 1], rid="a")
    s.params = G(temperature=0.8)
    assert p.propose(s, limit=10) == ([2], 4)  # the prior (0.3) allows one more than a probe
    for _ in range(10):
        p.record("a", proposed=3, kept=0)  # the average falls well below LOW_ACCEPTANCE
    got = [p.propose(s, limit=10) for _ in range(2 * PROBE_EVERY)]
    assert got.count(([2], 4)) == 2 and got.count(([], 0)) == 2 * PROBE_EVERY - 2  # one-draft probes only
    for _ in range(10):
        p.record("a", proposed=1, kept=1)  # the probes are kept: full drafts again
    assert p.propose(s, limit=10) == ([2, 3, 1], 4)
    p.drop("a")
    assert p.propose(s, limit=10) == ([2], 4)
    g = seq([1, 2, 3, 1, 2, 3, 1], rid="g")
    g.params = G(temperature=0)
    for _ in range(10):
        p.record("g", proposed=3, kept=0)
    assert p.propose(g, limit=10) == ([2, 3, 1], 4)  # greedy requests keep k


def test_proposer_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(2, prompt_lookup_max=2, prompt_lookup_min=3)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(num_speculative_tokens=2, prompt_lookup_max=2, prompt_lookup_min=3)


def test_which_requests_take_drafts():
    assert eligible(G(temperature=0), 0)
    assert eligible(G(do_sample=False, temperature=0.7), 0)
    assert eligible(G(temperature=0.7, top_p=0.9), 0)  # sampled: accept_sampled keeps the distribution
    assert not eligible(G(temperature=0.7, seed=3), 0)  # a seed's draws stay those of one token a step
    assert eligible(G(temperature=0, seed=3), 0)
    assert not eligible(G(temperature=0, repetition_penalty=1.2), 0)
    assert not eligible(G(temperature=0, presence_penalty=0.5), 0)
    assert not eligible(G(temperature=0, logprobs=2), 0)
    assert not eligible(G(temperature=0, min_new_tokens=3), 2) and eligible(G(temperature=0, min_new_tokens=3), 3)


@pytest.mark.parametrize("drafts,best,kept,nxt", [
    ([4, 5, 6], [4, 5, 9, 1], [4, 5], 9),  # third draft rejected: the model's own choice replaces it
    ([4], [3, 8], [], 3),  # first draft rejected: one token, as without drafts
    ([1, 2], [1, 2, 3], [1, 2], 3),  # all kept, plus the token after them
])
def test_greedy_acceptance(drafts, best, kept, nxt):
    assert accept_greedy(drafts, best) == (kept, nxt)


def test_sampled_acceptance_keeps_the_model_distribution():
    """Two drafts (1, then 2) over a 4-token vocabulary: the frequency of each outcome (kept drafts, next
    token) over many draws against its probability by hand: p0[x] for x != 1; p0[1] p1[y] for y != 2;
    p0[1] p1[2] p2[z]."""
    from collections import Counter

    from engine.model_runner import accept_sampled
    from engine.sampler import SamplingState
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.15, 0.4, 0.2], [0.6, 0.1, 0.1, 0.2]])
    gen = torch.Generator().manual_seed(0)
    st = SamplingState(params=G(temperature=1.0), prompt_ids=[], output_ids=[], blocked_until_min=[], generator=gen)
    n = 20000
    got = Counter()
    for _ in range(n):
        kept, nxt = accept_sampled([1, 2], probs, st)
        got[(tuple(kept), nxt)] += 1
    p = probs.tolist()
    want = {((), x): p[0][x] for x in (0, 2, 3)}
    want.update({((1,), y): p[0][1] * p[1][y] for y in (0, 1, 3)})
    want.update({((1, 2), z): p[0][1] * p[1][2] * p[2][z] for z in range(4)})
    assert set(got) <= set(want) and abs(sum(want.values()) - 1) < 1e-6
    for k, w in want.items():
        assert abs(got[k] / n - w) < 0.015, (k, got[k] / n, w)


# ---- scheduler ------------------------------------------------------------------------------
def test_scheduler_sends_drafts_and_keeps_only_accepted_tokens():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=64, num_blocks=16, block_size=4))
    a = seq([1, 2, 3], rid="a", max_tokens=40)
    s.add(a)
    out = s.schedule()
    s.update(out, RunnerOutput(sampled={"a": 10}))
    assert a.token_ids == [1, 2, 3, 10] and a.num_computed_tokens == 3
    a.draft_ids = [11, 12, 13]
    out = s.schedule()
    (m,) = out.seqs
    assert (m.token_ids, m.start_pos, m.num_draft, m.sample) == ([10, 11, 12, 13], 3, 3, True)
    assert len(a.block_ids) == 2  # room for positions 3..6
    s.update(out, RunnerOutput(sampled={"a": 20}, accepted={"a": [11]}))
    # 10 and the kept draft 11 are in the cache; 20 is the next token to compute
    assert a.token_ids == [1, 2, 3, 10, 11, 20] and a.num_computed_tokens == 5 and a.draft_ids == []
    out = s.schedule()
    assert [(m.token_ids, m.start_pos, m.num_draft) for m in out.seqs] == [([20], 5, 0)]


def test_scheduler_trims_drafts_to_budget_and_drops_them_without_blocks():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=3, num_blocks=3, block_size=4))
    a = seq([1, 2, 3], rid="a", max_tokens=12)
    s.add(a)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 4}))
    a.draft_ids = [5, 6, 7, 8]
    out = s.schedule()
    assert out.seqs[0].token_ids == [4, 5, 6] and out.seqs[0].num_draft == 2  # budget 3: the token + 2 drafts
    s.update(out, RunnerOutput(sampled={"a": 7}, accepted={"a": [5, 6]}))
    b = seq([9], rid="b", max_tokens=4)  # takes the last free block
    s.add(b)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 8, "b": 1}))
    assert s.blocks.num_free_blocks == 0
    a.draft_ids = [1, 2]  # position 7 fits a's second block, positions 8-9 would need a third: no drafts
    out = s.schedule()
    assert [(m.request_id, m.num_draft, len(m.token_ids)) for m in out.seqs] == [("a", 0, 1), ("b", 0, 1)]


# ---- engine against transformers -------------------------------------------------------------
def hf_greedy(hf, ids, n, eos=None):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)
    return out[0, len(ids):].tolist()


def looping_prompts(vocab=49152):
    """Prompts that repeat themselves (so that prompt lookup finds drafts), of mixed lengths."""
    return [[7, 8, 9] * 4, [100 + i % 5 for i in range(23)], [300, 301] * 15 + [5], list(range(1000, 1040)) * 2]


@pytest.mark.parametrize("k", [1, 4])
def test_tiny_llama_with_drafts_matches_hf(tmp_path, smol_dir, k):
    hf = make_hf_model("llama", smol_dir, tmp_path / "m", seed=11)
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=8, max_prefill_tokens=64, num_cpu_blocks=64,
                       num_speculative_tokens=k)
    prompts = looping_prompts()
    outs = Pipeline(engine)(prompts, G(max_new_tokens=20, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 20, eos=[]) and o.finish_reason == "length"
    assert engine.stats["draft_tokens"] > 0
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_drafts_under_preemption_and_prefix_caching_match_hf(tmp_path, smol_dir):
    """A cache too small for every sequence at once (preemption by recompute mid-run) and prefix caching
    (a prompt sharing forty tokens with another): drafts' blocks come and go, outputs stay transformers'."""
    hf = make_hf_model("llama", smol_dir, tmp_path / "m", seed=12)
    engine = LLMEngine(model=str(tmp_path / "m"), block_size=4, max_prefill_tokens=64, num_cpu_blocks=34,
                       enable_prefix_caching=True, num_speculative_tokens=3)
    prompts = looping_prompts()
    prompts.append(prompts[3][:40] + [5, 6])
    outs = Pipeline(engine)(prompts, G(max_new_tokens=20, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 20, eos=[])
    assert engine.scheduler.total_preemptions > 0 and engine.stats["draft_tokens"] > 0
    assert engine.scheduler.blocks.prefix_hits > 0
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


@pytest.mark.slow
def test_smollm2_with_drafts_matches_hf_and_stops_inside_drafts(smol_dir, smol_hf, smol_tok):
    engine = LLMEngine(max_batch_size=8, block_size=16, max_prefill_tokens=256, cache_max_entry_count=1,
                       num_speculative_tokens=4)
    pipe = Pipeline(engine)
    texts = ["Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat",
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,", "Write a long story about a dragon who learns to code. " * 3]
    prompts = [smol_tok.encode(t) for t in texts]
    refs = [hf_greedy(smol_hf, p, 40, eos=[]) for p in prompts]
    outs = pipe(prompts, G(max_new_tokens=40, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    assert engine.stats["accepted_draft_tokens"] > 20  # these texts repeat: most steps keep drafts
    gh = engine.runner.greedy_head  # the drafts' rows were verified on the LM head's greedy screen (VNNI)
    assert gh is None or gh.screened > 0
    # lengths that end inside a step's drafts
    for n in (1, 2, 7, 13):
        assert pipe(prompts[0], G(max_new_tokens=n, temperature=0, ignore_eos=True)).token_ids == refs[0][:n]
    # a stop token that a kept draft reaches: the output ends there, as transformers' does with it as EOS
    stop = refs[1][9]
    r = pipe(prompts[1], G(max_new_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop]))
    assert r.token_ids == hf_greedy(smol_hf, prompts[1], 40, eos=[stop]) and r.finish_reason == "stop"
    # a stop string inside a step's kept drafts: the text ends before it, as in transformers' text
    ref_text = smol_tok.decode(refs[0])
    stop_s = ref_text[len(ref_text) // 2:len(ref_text) // 2 + 4]
    r = pipe(prompts[0], G(max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop_s]))
    assert r.text == ref_text[:ref_text.index(stop_s)] and r.finish_reason == "stop"
    # unseeded sampled requests take drafts too (low temperature: the drafts are often the likely tokens)
    before = engine.stats["accepted_draft_tokens"]
    sampled = pipe(prompts, G(max_new_tokens=24, temperature=0.3, ignore_eos=True))
    assert all(len(o.token_ids) == 24 for o in sampled) and engine.stats["accepted_draft_tokens"] > before
    # seeded and penalised requests decode beside drafted ones, unchanged by them
    g_seed = G(max_new_tokens=24, temperature=0.8, seed=7)
    g_pen = G(max_new_tokens=24, temperature=0, repetition_penalty=1.3)
    plain = Pipeline(LLMEngine(max_batch_size=8, block_size=16, max_prefill_tokens=256, cache_max_entry_count=1))
    mixed = pipe(prompts, [g_seed, g_pen, G(max_new_tokens=24, temperature=0, ignore_eos=True)])
    alone = plain(prompts[:2], [g_seed, g_pen])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    assert mixed[2].token_ids == refs[2][:24]
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
