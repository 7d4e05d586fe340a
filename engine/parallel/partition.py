"""Which attention heads and MLP columns each tensor-parallel rank holds (plain Python, no torch).

Heads move in whole KV groups (a KV head and the query heads that read it), so every rank keeps the
model's grouped-query shape and its KV cache holds only its own KV heads:
- tp <= num_kv_heads: the groups are dealt out in contiguous runs, as evenly as they go (SmolLM2's 3
  groups of 3 over tp=2 give 6 and 3 query heads);
- tp > num_kv_heads: each group's query heads are split over tp / num_kv_heads ranks, and those ranks all
  hold (a replica of) the group's KV head.
The MLP's intermediate columns split evenly; with AWQ weights every split of a row-parallel input must
fall on a quantization-group boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class RankLayout:
    rank: int
    tp: int
    q_heads: Tuple[int, ...]  # global query-head ids, in order
    kv_heads: Tuple[int, ...]  # global KV-head ids this rank holds, in order
    inter: Tuple[int, int]  # (start, size) of this rank's intermediate columns

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)


def working_tps(num_heads: int, num_kv_heads: int, limit: int = 16) -> List[int]:
    out = []
    for tp in range(1, limit + 1):
        try:
            _heads(num_heads, num_kv_heads, tp)
            out.append(tp)
        except ValueError:
            pass
    return out


def _heads(H: int, KVH: int, tp: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    g = H // KVH
    if tp <= KVH:
        out, start = [], 0
        for r in range(tp):
            n = KVH // tp + (1 if r < KVH % tp else 0)
            kv = tuple(range(start, start + n))
            out.append((tuple(range(start * g, (start + n) * g)), kv))
            start += n
        return out
    if tp % KVH == 0 and g % (tp // KVH) == 0:
        per, reps = H // tp, tp // KVH
        return [(tuple(range(r * per, (r + 1) * per)), (r // reps,)) for r in range(tp)]
    raise ValueError(f"tp: {tp} cannot split {H} attention heads in {KVH} KV groups")


def plan(num_heads: int, num_kv_heads: int, intermediate: int, tp: int, head_dim: int,
         group_size: Optional[int] = None) -> List[RankLayout]:
    """One RankLayout per rank; ValueError naming the field and the values that work."""
    if tp < 1:
        raise ValueError(f"tp: must be >= 1 (got {tp})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    try:
        heads = _heads(num_heads, num_kv_heads, tp)
    except ValueError as e:
        raise ValueError(f"{e}; tp values that work for this model: {working_tps(num_heads, num_kv_heads)}") from None
    unit = group_size or 1
    if intermediate % (tp * unit):
        what = f" in quantization groups of {group_size}" if group_size else ""
        raise ValueError(f"tp: intermediate_size {intermediate} does not split into {tp} equal parts{what}")
    if group_size:
        for q, _ in heads:
            if (len(q) * head_dim) % group_size:
                raise ValueError(f"tp: {tp} gives a rank {len(q)} heads ({len(q) * head_dim} inputs of o_proj), not a "
                                 f"multiple of the AWQ group size {group_size}")
    per = intermediate // tp
    return [RankLayout(r, tp, q, kv, (r * per, per)) for r, (q, kv) in enumerate(heads)]
