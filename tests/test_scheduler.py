"""Scheduler: token budget, chunked prefill, preemption and resume, abort, prefix-cache hits (pure Python)."""
from engine.core.messages import RunnerOutput
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.sequence import Sequence, SeqStatus


def mk(rid, n, max_tokens=60):
    return Sequence(request_id=rid, token_ids=list(range(1, n + 1)), num_prompt_tokens=n, max_tokens=max_tokens)


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    res = RunnerOutput(sampled={m.request_id: token for m in out.seqs if m.sample})
    s.update(out, res)
    return out


def test_chunked_prefill_keeps_decodes_running():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=16, num_blocks=64, block_size=4))
    s.add(mk("short", 3))
    out = run_step(s)
    assert [(m.request_id, len(m.token_ids), m.sample) for m in out.seqs] == [("short", 3, True)]
    s.add(mk("long", 40))
    out = run_step(s)
    # the running sequence decodes one token; the long prompt gets the rest of the budget
    assert [(m.request_id, len(m.token_ids), m.sample) for m in out.seqs] == [("short", 1, True), ("long", 15, False)]
    out = run_step(s)
    assert [(m.request_id, len(m.token_ids), m.start_pos) for m in out.seqs] == [("short", 1, 4), ("long", 15, 15)]
    out = run_step(s)
    assert [(m.request_id, len(m.token_ids), m.sample) for m in out.seqs] == [("short", 1, True), ("long", 10, True)]
    assert s.seqs["long"].num_output_tokens == 1


def test_max_batch_size_limits_running():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_prefill_tokens=100, num_blocks=64, block_size=4))
    for i in range(3):
        s.add(mk(f"r{i}", 5))
    out = run_step(s)
    assert [m.request_id for m in out.seqs] == ["r0", "r1"]
    assert [q.request_id for q in s.waiting] == ["r2"]


def test_preempts_newest_and_resumes_by_recompute():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100, num_blocks=4, block_size=4))
    s.add(mk("old", 7, max_tokens=16))
    s.add(mk("new", 7, max_tokens=16))
    run_step(s)  # each takes 2 blocks (all 4) and samples its 8th token
    run_step(s)  # the 8th tokens fill the blocks; 9th tokens sampled
    assert s.blocks.num_free_blocks == 0
    out = run_step(s)  # old needs a third block for its 9th token: new is preempted
    assert [m.request_id for m in out.seqs] == ["old"]
    new = s.seqs["new"]
    assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0 and new.block_ids == []
    assert new.output_token_ids == [7, 7]  # output so far is kept and recomputed on resume
    assert s.waiting[0] is new and s.total_preemptions == 1
    s.finish("old", "stop")
    out = run_step(s)
    assert [(m.request_id, len(m.token_ids), m.start_pos) for m in out.seqs] == [("new", 9, 0)]
    assert out.seqs[0].sample


def test_sequence_preempts_itself_when_it_is_newest():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100, num_blocks=2, block_size=4))
    s.add(mk("a", 4, max_tokens=8))
    s.add(mk("b", 3, max_tokens=8))
    run_step(s)  # a: 4 tokens + 1 sampled (block 1 full); b: 3 + 1
    out = run_step(s)  # a needs a new block; b is newest and gives its block back
    assert [m.request_id for m in out.seqs] == ["a"]
    assert s.seqs["b"].status is SeqStatus.WAITING


def test_abort_frees_blocks_immediately_and_reports_to_runner():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100, num_blocks=16, block_size=4))
    s.add(mk("a", 10))
    s.add(mk("b", 10))
    run_step(s)
    assert s.blocks.num_free_blocks == 16 - 6
    s.finish("a", "abort")
    assert s.blocks.num_free_blocks == 16 - 3
    s.finish("waiting-never-seen", "abort")  # unknown ids are ignored
    out = s.schedule()
    assert out.finished_ids == ["a"]
    s.finish("b", "abort")
    assert s.blocks.num_free_blocks == 16 and not s.has_work()


def test_prefix_cache_hit_skips_computed_tokens():
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100, num_blocks=16, block_size=4, enable_prefix_caching=True))
    s.add(mk("a", 10))
    run_step(s)
    s.finish("a", "stop")
    b = mk("b", 12)  # shares a's first 10 tokens: two full blocks (8 tokens) are reused
    s.add(b)
    out = run_step(s)
    assert out.seqs[0].start_pos == 8 and len(out.seqs[0].token_ids) == 4
    assert b.num_cached_tokens == 8


def test_request_larger_than_cache_is_rejected():
    import pytest
    s = Scheduler(SchedulerConfig(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(mk("huge", 5, max_tokens=20))


def test_waiting_sequence_that_cannot_start_gives_back_its_prefix_blocks():
    """A prefix-cache hit attaches cached blocks at admission; when the rest does not fit, they go back, so
    that waiting sequences never hold blocks the running ones need."""
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100, num_blocks=6, block_size=4, enable_prefix_caching=True))
    s.add(mk("a", 10, max_tokens=12))
    run_step(s)
    s.finish("a", "stop")  # a's two full blocks stay cached (evictable)
    s.add(Sequence(request_id="c", token_ids=list(range(100, 115)), num_prompt_tokens=15, max_tokens=16))
    run_step(s)  # c holds four blocks
    b = mk("b", 20, max_tokens=24)  # a's prefix, then needs five blocks in all: only two are left
    s.add(b)
    out = run_step(s)
    assert [m.request_id for m in out.seqs] == ["c"]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and s.blocks.num_free_blocks == 2
    s.finish("c", "stop")
    out = run_step(s)
    assert out.seqs[0].request_id == "b" and out.seqs[0].start_pos == 8  # the cached prefix is still there
