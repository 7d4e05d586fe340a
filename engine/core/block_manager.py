"""Paged KV-cache bookkeeping: free list, reference counts and a hash-keyed prefix cache.

Block ids index the runner's cache tensors. A full block's key is a hash of its tokens and of the
key of the block before it, so equal keys mean equal prefixes. Cached blocks nobody references
stay evictable in least-recently-used order until a new allocation needs them.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Dict, List, Optional, Sequence as Seq

from .sequence import Sequence


def block_hash(parent: Optional[int], tokens: Seq[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: List[Optional[int]] = [None] * num_blocks
        self._by_hash: Dict[int, int] = {}
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # ref 0, still holding a cached prefix
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ---- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return need <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens. Call can_allocate first."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need > self.num_free_blocks:
            raise RuntimeError("allocate: not enough free blocks (call can_allocate first)")
        for _ in range(need):
            seq.block_ids.append(self._take_block())

    def _take_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)  # least recently used cached block
            del self._by_hash[self._hash_of[bid]]
            self._hash_of[bid] = None
        self._ref[bid] = 1
        return bid

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks that hold a cached prefix stay evictable."""
        for bid in reversed(seq.block_ids):  # tail blocks first, so they are evicted before the prefix
            self._ref[bid] -= 1
            if self._ref[bid] == 0:
                if self._hash_of[bid] is not None:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        seq.block_ids = []
        seq.block_hashes = []

    # ---- prefix cache ---------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for ``seq``'s longest cached prefix; returns tokens matched.

        At least one token is always left to compute, so the step that samples has logits.
        """
        if not self.enable_prefix_caching or seq.block_ids:
            return 0
        full = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_tokens
        parent = None
        matched = 0
        for i in range(full):
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            bid = self._by_hash.get(h)
            if bid is None:
                break
            if self._ref[bid] == 0:
                self._evictable.pop(bid, None)
            self._ref[bid] += 1
            seq.block_ids.append(bid)
            seq.block_hashes.append(h)
            parent = h
            matched += 1
        tokens = matched * self.block_size
        self.prefix_hits += tokens
        return tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key every newly filled block of ``seq`` so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(h)
            bid = seq.block_ids[i]
            if h not in self._by_hash and self._hash_of[bid] is None:
                self._by_hash[h] = bid
                self._hash_of[bid] = h

    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
