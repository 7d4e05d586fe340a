"""Token log-likelihoods through the engine's own paged KV cache (perplexity of a cache configuration).

A window is prefilled in chunks of ``chunk`` tokens: from the second chunk on, attention reads every earlier
token (and the chunk itself) back from the cache blocks, quantized or not, as decoding would.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .core.messages import ScheduledSeq, SchedulerOutput


@torch.inference_mode()
def window_logits(engine, ids: List[int], chunk: int = 128) -> torch.Tensor:
    """Logits [len(ids), vocab] at every position, prefilled in chunks through the paged cache.
    The engine must be idle (it borrows blocks from 0)."""
    runner = engine.runner
    bs = runner.block_size
    need = -(-len(ids) // bs)
    if need > runner.num_blocks or engine.has_unfinished():
        raise ValueError(f"window: {len(ids)} tokens need {need} free KV blocks of an idle engine")
    blocks = list(range(need))
    out = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        msg = ScheduledSeq("score", part, start, blocks, sample=True)
        out.append(runner.logits_for(SchedulerOutput(seqs=[msg]), all_rows=True))
    return torch.cat(out)


def window_nll(engine, ids: List[int], chunk: int = 128) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1."""
    logits = window_logits(engine, ids, chunk)
    targets = torch.tensor(ids[1:], device=logits.device)
    return F.cross_entropy(logits[:-1], targets, reduction="sum").item()
