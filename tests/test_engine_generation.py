"""Engine behaviour through the pipeline API on SmolLM2: input forms, streaming, stops, seeds, logprobs."""
import pytest
import torch

from engine.generation import GenerationConfig

pytestmark = pytest.mark.slow
G = GenerationConfig


def hf_greedy_ids(hf, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_input_forms(smol_pipe):
    g = G(max_new_tokens=4, temperature=0)
    one = smol_pipe("Hi", g)
    assert isinstance(one.text, str) and one.completion_tokens == len(one.token_ids) <= 4
    many = smol_pipe(["Hi", "Hello there"], g)
    assert len(many) == 2 and many[0].token_ids == one.token_ids
    msgs = [{"role": "user", "content": "Hi"}]
    assert smol_pipe(msgs, g).prompt_tokens > one.prompt_tokens
    assert len(smol_pipe([msgs, msgs], g)) == 2


def test_chat_template_matches_hf(smol_pipe, smol_hf, smol_tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = smol_pipe(msgs, G(max_new_tokens=12, temperature=0))
    ids = smol_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expect = hf_greedy_ids(smol_hf, list(ids), 12)
    assert r.token_ids == expect[:len(r.token_ids)]
    assert r.finish_reason == ("stop" if len(r.token_ids) < 12 else "length")


def test_stream_adds_up_to_full_text(smol_pipe):
    g = G(max_new_tokens=20, temperature=0, ignore_eos=True)
    full = smol_pipe("Tell me about the moon.", g)
    deltas = list(smol_pipe.stream("Tell me about the moon.", g))
    assert "".join(d.text for d in deltas) == full.text
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in deltas) == 20


def test_multi_turn_chat_keeps_history(smol_pipe):
    s = smol_pipe.chat("My name is Ada.", gen_config=G(max_new_tokens=8, temperature=0))
    first_prompt = s.response.prompt_tokens
    s = smol_pipe.chat("What is my name?", session=s, gen_config=G(max_new_tokens=8, temperature=0))
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.response.prompt_tokens > first_prompt + 5


def test_stop_string_across_token_boundary(smol_pipe, smol_tok):
    g = G(max_new_tokens=30, temperature=0, ignore_eos=True)
    base = smol_pipe("Count from one to twenty in words:", g)
    toks = base.token_ids
    # a stop string made of the end of one token and the start of the next
    a, b = smol_tok.decode(toks[:6]), smol_tok.decode(toks[:7])
    piece = smol_tok.decode(toks[6:7])
    assert len(piece) >= 2 and len(a) >= 2
    stop = a[-2:] + piece[:2]
    cut = base.text.index(stop)
    r = smol_pipe("Count from one to twenty in words:", G(max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    assert r.text == base.text[:cut] and r.finish_reason == "stop"
    streamed = "".join(d.text for d in smol_pipe.stream("Count from one to twenty in words:",
                                                        G(max_new_tokens=30, temperature=0, ignore_eos=True, stop=stop)))
    assert streamed == base.text[:cut] and stop not in streamed
    assert b.startswith(a)


def test_stop_token_ids_and_max_new_tokens(smol_pipe):
    base = smol_pipe("Write a sentence about cats.", G(max_new_tokens=16, temperature=0, ignore_eos=True))
    assert len(base.token_ids) == 16 and base.finish_reason == "length"
    stop_id = base.token_ids[5]
    r = smol_pipe("Write a sentence about cats.", G(max_new_tokens=16, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[stop_id]))
    first = base.token_ids.index(stop_id)
    assert r.token_ids == base.token_ids[:first + 1] and r.finish_reason == "stop"


def test_min_new_tokens_overrides_eos(smol_pipe):
    msgs = [{"role": "user", "content": "Reply with just the word yes."}]
    short = smol_pipe(msgs, G(max_new_tokens=60, temperature=0))
    n = len(short.token_ids)
    assert short.finish_reason == "stop" and n < 50  # ended by the end token
    longer = smol_pipe(msgs, G(max_new_tokens=60, temperature=0, min_new_tokens=n + 5))
    assert len(longer.token_ids) >= n + 5
    assert longer.token_ids[:n - 1] == short.token_ids[:n - 1]  # same path until the end token was banned


def test_seed_reproducible_across_batches(smol_pipe):
    g = G(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    alone = smol_pipe("Invent a name for a cat:", g)
    batch = smol_pipe(["Invent a name for a dog:", "Invent a name for a cat:"], [G(max_new_tokens=16, temperature=1.0), g])
    assert batch[1].token_ids == alone.token_ids
    other = smol_pipe("Invent a name for a cat:", G(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=99))
    assert other.token_ids != alone.token_ids


def test_logprobs_match_hf(smol_pipe, smol_hf, smol_tok):
    r = smol_pipe("The sky is", G(max_new_tokens=3, temperature=0, logprobs=3))
    assert len(r.logprobs) == len(r.token_ids)
    ids = smol_tok.encode("The sky is")
    with torch.no_grad():
        lp = torch.log_softmax(smol_hf(torch.tensor([ids])).logits[0, -1], -1)
    first = r.logprobs[0]
    assert first.token_id == r.token_ids[0] == int(lp.argmax())
    assert abs(first.logprob - float(lp.max())) < 1e-4
    assert [t for t, _ in first.top_logprobs] == lp.topk(3).indices.tolist()


@pytest.mark.parametrize("kwargs, field", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_generation_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        G(**kwargs)


def test_bad_prompts_name_field(smol_pipe, smol_engine):
    with pytest.raises(ValueError, match="prompt"):
        smol_pipe("", G())
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        smol_pipe([{"role": "wizard", "content": "hi"}], G())
    with pytest.raises(ValueError, match="session_len"):
        smol_pipe("word " * (smol_engine.session_len + 5), G())
    assert not smol_engine.has_unfinished()
