"""Preemption, prefix caching, abort and the asyncio engine on a tiny random Llama, with HF as the oracle."""
import asyncio
import os
import random
import signal
import time

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.engine_process import ProcessEngine
from engine.generation import GenerationConfig
from engine.llm_engine import LLMEngine
from engine.offline import Pipeline
from tiny_models import make_hf_model

G = GenerationConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    hf = make_hf_model("llama", smol_dir, d, seed=11)
    return d, hf


def hf_greedy(hf, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompts(lengths, seed):
    rnd = random.Random(seed)
    return [[rnd.randrange(3, 49152) for _ in range(n)] for n in lengths]


def all_free(engine):
    b = engine.scheduler.blocks
    return b.num_free_blocks == b.num_blocks


def test_preemption_under_block_pressure_keeps_outputs_exact(tiny):
    d, hf = tiny
    # 10 blocks of 8 tokens: four sequences of 20 + 24 tokens cannot all fit at once
    engine = LLMEngine(model=str(d), block_size=8, num_cpu_blocks=10, max_batch_size=8)
    ps = prompts([20, 18, 22, 16], seed=1)
    outs = Pipeline(engine)(ps, G(max_new_tokens=24, temperature=0, ignore_eos=True))
    assert engine.scheduler.total_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 24)
    assert all_free(engine)


def test_prefix_caching_hits_and_exact_outputs(tiny):
    d, hf = tiny
    engine = LLMEngine(model=str(d), block_size=8, num_cpu_blocks=40, enable_prefix_caching=True)
    shared = prompts([40], seed=2)[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    pipe = Pipeline(engine)
    ra = pipe(a, G(max_new_tokens=8, temperature=0, ignore_eos=True))
    rb = pipe(b, G(max_new_tokens=8, temperature=0, ignore_eos=True))
    assert engine.scheduler.blocks.prefix_hits == 40  # five full blocks of the shared prefix
    assert ra.token_ids == hf_greedy(hf, a, 8) and rb.token_ids == hf_greedy(hf, b, 8)
    assert all_free(engine)  # cached blocks count as free (evictable)


def test_abort_frees_blocks_and_others_continue(tiny):
    d, hf = tiny
    engine = LLMEngine(model=str(d), block_size=8, num_cpu_blocks=40)
    ps = prompts([12, 30], seed=3)
    keep = engine.add_request(ps[0], G(max_new_tokens=10, temperature=0, ignore_eos=True))
    drop = engine.add_request(ps[1], G(max_new_tokens=50, temperature=0, ignore_eos=True))
    got = []
    for _ in range(3):
        got += [t for o in engine.step() if o.request_id == keep for t in o.token_ids]
    used = engine.scheduler.blocks.num_blocks - engine.scheduler.blocks.num_free_blocks
    out = engine.abort(drop)
    assert out.finished and out.finish_reason == "abort"
    assert engine.scheduler.blocks.num_blocks - engine.scheduler.blocks.num_free_blocks < used
    while engine.has_unfinished():
        got += [t for o in engine.step() if o.request_id == keep for t in o.token_ids]
    assert got == hf_greedy(hf, ps[0], 10)
    assert all_free(engine) and engine.abort(drop) is None


def idle_stats(eng, timeout=20.0):
    """Stats once no request runs (an engine process publishes them a moment after it goes idle)."""
    deadline = time.time() + timeout
    while True:
        stats = eng.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 or time.time() > deadline:
            return stats
        time.sleep(0.05)


FRONTS = pytest.mark.parametrize("front", [AsyncEngine, ProcessEngine], ids=["thread", "process"])


@FRONTS
def test_async_engine_concurrent_bad_request_and_disconnect(tiny, front):
    d, hf = tiny
    eng = front(model=str(d), block_size=8, num_cpu_blocks=40)
    ps = prompts([7, 15, 25], seed=4)

    async def collect(p, n):
        toks = []
        async for o in eng.generate(p, G(max_new_tokens=n, temperature=0, ignore_eos=True)):
            toks += o.token_ids
        return toks

    async def bad(prompt, match):
        with pytest.raises(ValueError, match=match):
            async for _ in eng.generate(prompt, G(max_new_tokens=4)):
                pass

    async def walk_away(p):
        agen = eng.generate(p, G(max_new_tokens=200, temperature=0, ignore_eos=True))
        async for _ in agen:
            break  # the client disconnects
        await agen.aclose()

    async def main():
        return await asyncio.gather(collect(ps[0], 9), collect(ps[1], 6), walk_away(ps[2]), collect(ps[2], 5),
                                    bad([1, 10**9], "prompt"), bad([5] * 600, "session_len"))

    try:
        r = asyncio.run(main())
        assert r[0] == hf_greedy(hf, ps[0], 9) and r[1] == hf_greedy(hf, ps[1], 6) and r[3] == hf_greedy(hf, ps[2], 5)
        stats = idle_stats(eng)
        assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == 0
    finally:
        eng.shutdown()


@FRONTS
def test_async_engine_slow_consumer_gets_merged_deltas(tiny, front):
    d, hf = tiny
    eng = front(model=str(d), block_size=8, num_cpu_blocks=40)
    p = prompts([9], seed=5)[0]

    async def slow():
        deltas = []
        async for o in eng.generate(p, G(max_new_tokens=24, temperature=0, ignore_eos=True)):
            deltas.append(o)
            await asyncio.sleep(0.05)  # the engine runs ahead meanwhile
        return deltas

    try:
        deltas = asyncio.run(slow())
        assert [t for o in deltas for t in o.token_ids] == hf_greedy(hf, p, 24)
        assert len(deltas) < 24 and deltas[-1].finished and deltas[-1].completion_tokens == 24
    finally:
        eng.shutdown()


def test_stream_interval_and_message_budget_coalesce_deltas(tiny):
    """An interval (or a message budget shared by the open streams) sends fewer, larger deltas; the tokens
    and the finish are unchanged."""
    d, hf = tiny
    eng = AsyncEngine(model=str(d), block_size=8, num_cpu_blocks=40)
    ps = prompts([9, 11], seed=6)

    async def run(p, **stream):
        deltas = []
        async for o in eng.generate(p, G(max_new_tokens=24, temperature=0, ignore_eos=True), **stream):
            deltas.append(o)
        return deltas

    async def both():  # two open streams at 10 messages/s: each waits about 0.2 s between messages
        return await asyncio.gather(run(ps[0], messages_per_s=10.0), run(ps[1], messages_per_s=10.0))

    try:
        every = asyncio.run(run(ps[0]))
        spaced = asyncio.run(run(ps[0], interval_s=0.2))
        budget = asyncio.run(both())
        # one delta per step when nothing asks for coalescing, unless the consumer lags (then they merge too)
        assert [t for o in every for t in o.token_ids] == hf_greedy(hf, ps[0], 24) and len(every) > len(spaced)
        for deltas, p in ((spaced, ps[0]), (budget[0], ps[0]), (budget[1], ps[1])):
            assert [t for o in deltas for t in o.token_ids] == hf_greedy(hf, p, 24)
            assert len(deltas[0].token_ids) == 1 and deltas[-1].finished  # the first token is never held back
            assert len(deltas) < 24
        # nor is the last: a 5 s interval would hold the second delta, but the finish cuts the wait short
        t0 = time.monotonic()
        held = asyncio.run(run(ps[1], interval_s=5.0))
        assert time.monotonic() - t0 < 2.5
        assert [len(o.token_ids) for o in held] == [1, 23] and held[-1].finished
    finally:
        eng.shutdown()


def test_engine_process_start_failure_and_death(tiny, tmp_path):
    d, _ = tiny
    with pytest.raises(RuntimeError, match="engine process failed to start.*missing-model"):
        ProcessEngine(model=str(tmp_path / "missing-model"))
    eng = ProcessEngine(model=str(d), block_size=8, num_cpu_blocks=40)
    p = prompts([10], seed=7)[0]

    async def long_stream():
        n = 0
        async for o in eng.generate(p, G(max_new_tokens=400, temperature=0, ignore_eos=True)):
            n += len(o.token_ids)
            if n >= 2:
                os.kill(eng._proc.pid, signal.SIGKILL)  # the engine dies mid-stream
        return n

    try:
        eng.check_health()
        with pytest.raises(RuntimeError, match="engine process exited"):
            asyncio.run(long_stream())
        with pytest.raises(RuntimeError, match="not running"):
            eng.check_health()
    finally:
        eng.shutdown()


def test_step_trace_lines_match_the_steps(tiny, tmp_path, monkeypatch):
    """RAYLM_STEP_TRACE: one line per model step, whose token counts add up to the work by hand: every
    prompt token once, then one decode per generated token but the last (it is never fed back)."""
    import json
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("RAYLM_STEP_TRACE", str(path))
    lengths, new = [70, 5, 33], 6
    eng = LLMEngine(model=str(tiny[0]), max_prefill_tokens=48, block_size=16, num_cpu_blocks=64)
    Pipeline(eng)(prompts(lengths, 3), G(max_new_tokens=new, ignore_eos=True, temperature=0))
    eng.trace.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == eng.stats["steps"]
    assert sum(r["tokens"] for r in rows) == sum(lengths) + len(lengths) * (new - 1)
    assert sum(r["decodes"] for r in rows) == len(lengths) * (new - 1)
    assert all(r["tokens"] <= 48 and r["ms"] > 0 and r["seqs"] >= 1 for r in rows)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)
