"""Persistent batching under a token budget, with chunked prefill, preemption and prefix caching."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional

from .block_manager import BlockManager
from .messages import RunnerOutput, ScheduledSeq, SchedulerOutput
from .sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64  # most sequences in one step
    max_prefill_tokens: int = 2048  # token budget per step
    num_blocks: int = 256
    block_size: int = 64
    enable_prefix_caching: bool = False


class Scheduler:
    """Plans each step: running sequences first (oldest first), then waiting ones while the budget lasts.

    A sequence that cannot get a block makes the newest running sequence give its blocks back
    (preemption by recompute); it returns to the front of the waiting queue and resumes later.
    """

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.seqs: Dict[str, Sequence] = {}
        self._known_to_runner: set = set()
        self._finished_since_step: List[str] = []
        self.total_preemptions = 0

    # ---- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"request_id: {seq.request_id!r} is already in use")
        need = self.blocks.blocks_needed(seq.max_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"request needs {need} KV blocks but the cache has {self.blocks.num_blocks}")
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, request_id: str, reason: str) -> Optional[Sequence]:
        """End a request (finished or aborted) and free its blocks at once."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if request_id in self._known_to_runner:
            self._known_to_runner.discard(request_id)
            self._finished_since_step.append(request_id)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_since_step)
        self._finished_since_step = []
        budget = self.cfg.max_prefill_tokens
        planned: List[tuple] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 0:  # nothing to compute until the caller appends a token
                i += 1
                continue
            if seq.draft_ids:  # a decode with speculative tokens: they need budget and blocks, else go without
                del seq.draft_ids[max(0, budget - 1):]
                if seq.num_uncomputed != 1 or not self.blocks.can_allocate(seq, 1 + len(seq.draft_ids)):
                    seq.draft_ids = []
                n += len(seq.draft_ids)
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq itself was the newest and gave its blocks back
            self.blocks.allocate(seq, n)
            planned.append((seq, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(planned, budget)
        out.num_preempted = self.total_preemptions
        out.seqs = [self._message(seq, n) for seq, n in planned]
        return out

    def _admit(self, planned: List[tuple], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_batch_size:
            seq = self.waiting[0]
            if not seq.block_ids:
                seq.num_computed_tokens = self.blocks.match_prefix(seq)
                seq.num_cached_tokens = seq.num_computed_tokens
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, n):
                # give back the cached blocks it just matched: a waiting sequence holding blocks starves the
                # running ones, and with several such heads (preempted ones return to the front) nothing runs
                self.blocks.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.blocks.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            planned.append((seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_ids = []
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(seq)

    def _message(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        draft = seq.draft_ids if seq.status is SeqStatus.RUNNING and n == 1 + len(seq.draft_ids) else []
        msg = ScheduledSeq(
            request_id=seq.request_id,
            token_ids=seq.token_ids[start:start + n - len(draft)] + draft,
            start_pos=start,
            block_ids=list(seq.block_ids),
            sample=start + n - len(draft) == seq.num_tokens,
            num_draft=len(draft),
        )
        if seq.request_id not in self._known_to_runner:
            self._known_to_runner.add(seq.request_id)
            msg.params = seq.params
            msg.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]
            msg.output_token_ids = seq.output_token_ids
        return msg

    # ---- results --------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> List[Sequence]:
        """Advance computed counts and append kept drafts and sampled tokens; returns the sequences that grew."""
        grew = []
        for msg in sched.seqs:
            seq = self.seqs.get(msg.request_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted during the step
            seq.draft_ids = []
            kept = result.accepted.get(msg.request_id, ()) if msg.num_draft else ()
            seq.token_ids += kept  # the drafts the runner kept; their K/V is in the cache, the rest is overwritten
            seq.num_computed_tokens = msg.start_pos + len(msg.token_ids) - msg.num_draft + len(kept)
            self.blocks.register_full_blocks(seq)
            tok = result.sampled.get(msg.request_id)
            if tok is not None:
                seq.token_ids.append(tok)
                grew.append(seq)
        return grew
