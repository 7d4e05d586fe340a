"""Block manager: allocation, reference counts, prefix-cache hits and LRU eviction (pure Python)."""
import pytest

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(request_id=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens), max_tokens=40)


def test_allocate_counts_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=5, block_size=4)
    s = seq(range(10))
    assert bm.can_allocate(s, 10)
    bm.allocate(s, 10)
    assert len(s.block_ids) == 3 and bm.num_free_blocks == 2  # ceil(10 / 4)
    s.num_computed_tokens = 10
    assert bm.can_allocate(s, 2) and not bm.can_allocate(s, 11)  # 12 fits in 3 blocks; 21 needs 6
    bm.allocate(s, 2)
    assert len(s.block_ids) == 3
    bm.free(s)
    assert bm.num_free_blocks == 5 and s.block_ids == []


def test_allocate_beyond_capacity_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(9))
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 9)


def _compute(bm, s):
    bm.allocate(s, s.num_uncomputed)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_prefix_hit_shares_blocks_with_refcounts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq(list(range(10)), "a")
    _compute(bm, a)  # blocks: [0..3], [4..7] full, [8, 9] partial
    b = seq(list(range(8)) + [50, 51, 52], "b")
    matched = bm.match_prefix(b)
    assert matched == 8 and b.block_ids == a.block_ids[:2]
    assert bm._ref[a.block_ids[0]] == 2
    bm.free(a)
    assert bm._ref[b.block_ids[0]] == 1  # still held by b
    assert bm.prefix_hit_rate() == pytest.approx(8 / 11)


def test_prefix_match_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq(range(8), "a")
    _compute(bm, a)
    bm.free(a)
    b = seq(range(8), "b")  # identical 8-token prompt: only the first block may be reused
    assert bm.match_prefix(b) == 4


def test_different_prefix_same_block_tokens_do_not_match():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 9], "a")
    _compute(bm, a)
    b = seq([7, 7, 3, 4, 9], "b")  # second block's tokens equal a's, but the prefix differs
    assert bm.match_prefix(b) == 0


def test_cached_blocks_evicted_least_recently_used():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old = seq([1, 2, 9], "old")
    _compute(bm, old)
    bm.free(old)
    new = seq([5, 6, 9], "new")
    _compute(bm, new)
    bm.free(new)
    assert bm.num_free_blocks == 4  # evictable cached blocks count as free
    big = seq(range(100, 106), "big")  # needs 3 blocks: 2 never-cached free ones, then evict the LRU
    bm.allocate(big, 6)
    assert bm.match_prefix(seq([1, 2, 9], "x")) == 0  # the older prefix was evicted first
    assert bm.match_prefix(seq([5, 6, 9], "y")) == 2  # the newer one survived


def test_block_manager_has_no_torch_dependency():
    import subprocess
    import sys
    code = ("import sys; import engine.core.scheduler, engine.core.block_manager; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
