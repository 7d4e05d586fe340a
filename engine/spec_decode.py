"""Speculative decoding by prompt lookup (n-gram drafts), as vLLM's ``ngram`` method and HF's
``prompt_lookup_num_tokens``: no draft model, the drafts are the tokens that followed the latest earlier
occurrence of the sequence's last n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) in its
own prompt and output.

A step then computes the last token and up to ``num_speculative_tokens`` drafts of each such sequence in one
pass (each draft a decode row that attends to the ones before it). The runner keeps the drafts that match its
own greedy choices plus one token of its own (model_runner.accept_greedy), or, for sampled requests, each draft
with the probability the request's distribution gives it, drawing from the rest on a rejection
(model_runner.accept_sampled: speculative sampling with a deterministic proposer, as vLLM's rejection
sampler). Greedy outputs are unchanged and sampled ones keep their distribution; a sequence gains up to 1 + k
tokens per step for the price of computing k more rows, which costs little where the step reads weights
rather than computes (small batches on CPU, any batch on a GPU).

Requests with penalties, logprobs or a seed do not take drafts (``eligible``); they decode one token a step in
the same batch.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .core.sequence import Sequence


def eligible(params, num_output: int) -> bool:
    """Whether a request takes drafts: greedy or unseeded sampling (a seed's draws stay those of one token a
    step), no penalties (they would change between a step's rows), no logprobs, min_new_tokens reached."""
    return (params is not None and (params.greedy or params.seed is None) and params.logprobs is None
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and num_output >= params.min_new_tokens)


class _Index:
    """n-gram -> the last position it ended at with a token after it, for n in [nmin, nmax]."""

    __slots__ = ("table", "done")

    def __init__(self):
        self.table: Dict[Tuple[int, ...], int] = {}
        self.done = 0  # positions 0..done-1 have their n-grams entered


LOW_ACCEPTANCE = 0.2  # below this share of drafts kept (a moving average), a request drafts only to probe
PROBE_EVERY = 4  # such a request proposes one draft every this many steps, to notice when its text repeats
RATE_WEIGHT = 0.2  # weight of the latest step in the moving average of drafts kept
RATE_PRIOR = 0.3  # what a request is assumed to keep before its first verified drafts
RATE_STEP = 0.1  # above LOW_ACCEPTANCE, one more draft per this much of the average (up to k)


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 4, prompt_lookup_min: int = 1):
        if num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens: must be >= 1 for the n-gram proposer")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("prompt_lookup_min: must be >= 1 and <= prompt_lookup_max")
        self.k, self.nmax, self.nmin = num_speculative_tokens, prompt_lookup_max, prompt_lookup_min
        self._index: Dict[str, _Index] = {}
        self._rate: Dict[str, float] = {}  # moving average of the share of drafts kept, per request
        self._idle: Dict[str, int] = {}  # steps since a low-acceptance request last probed

    def drop(self, request_id: str) -> None:
        self._index.pop(request_id, None)
        self._rate.pop(request_id, None)
        self._idle.pop(request_id, None)

    def record(self, request_id: str, proposed: int, kept: int) -> None:
        """A verified step's outcome. Drafts that are rarely kept cost rows for nothing (sampling at a high
        temperature keeps few: 9% at 0.8 on the benchmark's prompts, where a batch of 8 then ran 0.75x), so a
        sampled request drafts in proportion to its moving average, and below LOW_ACCEPTANCE only probes with
        one draft now and then. Greedy requests keep k: their drafts are kept far more often (55% on the
        benchmark), and backing off cost them more than it saved (batch 1: 109 -> 98 tok/s)."""
        if proposed:
            r = self._rate.get(request_id, RATE_PRIOR)
            self._rate[request_id] = (1 - RATE_WEIGHT) * r + RATE_WEIGHT * kept / proposed

    def _update(self, ix: _Index, toks: List[int]) -> None:
        # n-grams ending at i enter once token i+1 exists, so a lookup of the last n-gram finds an earlier one
        end = len(toks) - 1
        table = ix.table
        for i in range(ix.done, end):
            for n in range(self.nmin, min(self.nmax, i + 1) + 1):
                table[tuple(toks[i - n + 1:i + 1])] = i
        ix.done = max(ix.done, end)

    def propose(self, seq: Sequence, limit: int) -> Tuple[List[int], int]:
        """Up to min(k, limit) draft tokens to follow ``seq.token_ids``, and the length of the n-gram that
        found them (longer matches are kept more often: the engine prefers them when rows are short)."""
        k = min(self.k, limit)
        if k <= 0:
            return [], 0
        if seq.params is not None and not seq.params.greedy:  # sampled: as many drafts as it tends to keep
            rate = self._rate.get(seq.request_id, RATE_PRIOR)
            if rate < LOW_ACCEPTANCE:
                idle = self._idle[seq.request_id] = self._idle.get(seq.request_id, 0) + 1
                if idle % PROBE_EVERY:
                    return [], 0
            k = min(k, 1 + max(0, int((rate - LOW_ACCEPTANCE) / RATE_STEP)))
        ix = self._index.get(seq.request_id)
        if ix is None:
            ix = self._index[seq.request_id] = _Index()
        toks = seq.token_ids
        self._update(ix, toks)
        L = len(toks)
        for n in range(min(self.nmax, L - 1), self.nmin - 1, -1):
            i = ix.table.get(tuple(toks[L - n:]))
            if i is not None:
                return toks[i + 1:i + 1 + k], n
        return [], 0
