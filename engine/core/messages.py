"""The typed messages that cross between scheduler and model runner, one each way per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute ``token_ids`` at positions start.. start+len."""

    request_id: str
    token_ids: List[int]  # the tokens computed this step (a prefill chunk, or one decode token)
    start_pos: int  # tokens already in the KV cache for this sequence
    block_ids: List[int]  # the sequence's whole block table
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    params: Any = None  # sampling parameters; sent when the runner has not seen the request
    prompt_token_ids: Optional[List[int]] = None  # sent with params, for repetition penalties
    output_token_ids: Optional[List[int]] = None  # sent with params (a resumed request has some)
    num_draft: int = 0  # the last num_draft of token_ids are speculative: verify them (greedy) and sample after


@dataclass
class SchedulerOutput:
    seqs: List[ScheduledSeq] = field(default_factory=list)
    finished_ids: List[str] = field(default_factory=list)  # runner may drop per-request state
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class RunnerOutput:
    """Sampled token per sequence that sampled, plus logprobs when asked."""

    sampled: Dict[str, int] = field(default_factory=dict)
    logprobs: Dict[str, Any] = field(default_factory=dict)  # request_id -> (logprob, [(id, logprob), ...])
    accepted: Dict[str, List[int]] = field(default_factory=dict)  # draft tokens kept, in order before sampled
