"""Per-request state the scheduler tracks: tokens, how many are computed, and the block table."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, List, Optional

_arrival = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's tokens (prompt then output) and its place in the KV cache.

    Everything the scheduler decides is a change to ``num_computed_tokens``: prefill chunks add
    to it, a prefix-cache hit sets it forward, preemption by recompute resets it to 0.
    """

    request_id: str
    token_ids: List[int]
    num_prompt_tokens: int
    max_tokens: int  # prompt + output may not exceed this (session_len or prompt + max_new_tokens)
    params: Any = None  # sampling parameters, opaque to the scheduler
    num_computed_tokens: int = 0
    block_ids: List[int] = field(default_factory=list)
    block_hashes: List[int] = field(default_factory=list)  # hashes of this sequence's full blocks, in order
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    num_cached_tokens: int = 0  # tokens served from the prefix cache at the last admission
    num_preemptions: int = 0
    finish_reason: Optional[str] = None
    draft_ids: List[int] = field(default_factory=list)  # speculative tokens to verify in the next decode step

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]
