"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded draws and logprobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .generation import GenerationConfig


@dataclass
class SamplingState:
    """What the runner keeps per request between steps."""

    params: GenerationConfig
    prompt_ids: List[int]
    output_ids: List[int]
    blocked_until_min: List[int]  # token ids banned while fewer than min_new_tokens are out (ends, stop ids)
    generator: Optional[torch.Generator] = None
    extra: dict = field(default_factory=dict)


def _pad(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition penalty over prompt+output (as HF); presence/frequency over output (as OpenAI)."""
    S, V = logits.shape
    dev = logits.device
    rep = torch.tensor([s.params.repetition_penalty for s in states], device=dev)
    if bool((rep != 1.0).any()):
        seen = _pad([s.prompt_ids + s.output_ids for s in states], V).to(dev)  # [S, L], V = padding
        mask = torch.zeros(S, V + 1, dtype=torch.bool, device=dev).scatter_(1, seen, True)[:, :V]
        r = rep[:, None]
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(mask, penalized, logits)
    pres = torch.tensor([s.params.presence_penalty for s in states], device=dev)
    freq = torch.tensor([s.params.frequency_penalty for s in states], device=dev)
    if bool((pres != 0).any() or (freq != 0).any()):
        out = _pad([s.output_ids for s in states], V).to(dev)
        counts = torch.zeros(S, V + 1, device=dev).scatter_add_(1, out, torch.ones_like(out, dtype=torch.float))[:, :V]
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
    return logits


def apply_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    rows, cols = [], []
    for i, s in enumerate(states):
        if len(s.output_ids) < s.params.min_new_tokens:
            rows += [i] * len(s.blocked_until_min)
            cols += s.blocked_until_min
    if rows:
        logits = logits.clone()
        logits[torch.tensor(rows), torch.tensor(cols)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as masks computed in one sort."""
    dev = logits.device
    temp = torch.tensor([max(s.params.temperature, 1e-5) for s in states], device=dev)
    logits = logits / temp[:, None]
    top_k = torch.tensor([s.params.top_k for s in states], device=dev)
    top_p = torch.tensor([s.params.top_p for s in states], device=dev)
    min_p = torch.tensor([s.params.min_p for s in states], device=dev)
    if not bool((top_k > 0).any() or (top_p < 1).any() or (min_p > 0).any()):
        return logits
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    ranks = torch.arange(V, device=dev)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = ranks >= k
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # mass before this token already covers top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def draw(probs: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Sample one token per row by inverting its cumulative distribution at one uniform draw (from the
    request's own generator when seeded). One random number per row, not one per vocabulary entry: at 64
    rows of a 49k vocabulary 6 ms against 49 ms for exponential noise or torch.multinomial on 2 cores."""
    S, V = probs.shape
    u = torch.rand(S, 1, dtype=torch.float64, device=probs.device)
    for i, s in enumerate(states):
        if s.generator is not None:
            u[i] = torch.rand(1, dtype=torch.float64, device=probs.device, generator=s.generator)
    cdf = probs.double().cumsum(-1)
    # (0, total]: never lands on a zero-probability token at the start of a row
    target = (1.0 - u) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_(max=V - 1).flatten()


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """logits: [S, V] float32 -> (tokens [S], raw log-softmax [S, V] or None)."""
    raw_logprobs = None
    if any(s.params.logprobs is not None for s in states):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = apply_penalties(logits, states)
    logits = apply_min_tokens(logits, states)
    greedy = torch.tensor([s.params.greedy for s in states], device=logits.device)
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        idx = (~greedy).nonzero().flatten()
        sub = [states[i] for i in idx.tolist()]
        probs = filter_logits(logits[idx], sub).softmax(-1)
        tokens[idx] = draw(probs, sub)
    return tokens, raw_logprobs


def gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, states: Sequence[SamplingState]):
    """Per row that asked: (sampled logprob, [(token_id, logprob) for the top n])."""
    out = {}
    for i, s in enumerate(states):
        n = s.params.logprobs
        if n is None:
            continue
        tok_lp = float(raw[i, tokens[i]])
        top = []
        if n > 0:
            vals, ids = raw[i].topk(n)
            top = list(zip(ids.tolist(), vals.tolist()))
        out[i] = (tok_lp, top)
    return out
