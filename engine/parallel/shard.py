"""Cut a full model's weights into one rank's share (dense and AWQ tensors alike).

A rank's model is an ordinary LlamaModel whose ModelArgs carry its local head counts and intermediate
size, so every layer, the KV cache and the kernels run unchanged. Column-parallel layers (q/k/v,
gate/up) keep the rows of the rank's heads and columns; row-parallel layers (o, down) keep the matching
input columns and their partial outputs are summed across ranks (``DecoderLayer.reduce``); their bias is
added once, by rank 0. Embedding, norms and LM head are replicated.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Tuple

import torch

from ..models.args import ModelArgs
from .partition import RankLayout

Ranges = List[Tuple[int, int]]

# (dim, divisor) of the output and input index in each tensor kind: dense weight [out, in]; AWQ qweight
# [in, out/8], qzeros [in/G, out/8], scales [in/G, out]
_OUT = {"weight": (0, 1), "bias": (0, 1), "qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}
_IN = {"weight": (1, 1), "qweight": (0, 1), "qzeros": (0, "G"), "scales": (0, "G")}
_KEY = re.compile(r"layers\.(\d+)\.(attn\.qkv|attn\.o|mlp\.gate_up|mlp\.down)\.(\w+)$")


def rank_args(args: ModelArgs, layout: RankLayout) -> ModelArgs:
    return dataclasses.replace(args, num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads,
                               intermediate_size=layout.inter[1])


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _take(t: torch.Tensor, ranges: Ranges, dim: int, div: int) -> torch.Tensor:
    """Indices [a, b) of each range, in index units of ``div`` (8 packed outputs, or a quantization group)."""
    runs = _merge(ranges)
    if any(a % div or b % div for a, b in runs):
        raise ValueError(f"tp: a shard boundary in {runs} does not fall on a multiple of {div}")
    return torch.cat([t.narrow(dim, a // div, (b - a) // div) for a, b in runs], dim).contiguous()


def _head_ranges(heads, head_dim: int, base: int = 0) -> Ranges:
    return [(base + h * head_dim, base + (h + 1) * head_dim) for h in heads]


def shard_state_dict(full: Dict[str, torch.Tensor], args: ModelArgs, layout: RankLayout,
                     group_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``full``: a full model's state_dict (our parameter names) -> this rank's state_dict."""
    D, H, KVH, inter = args.head_dim, args.num_heads, args.num_kv_heads, args.intermediate_size
    s, n = layout.inter
    out_ranges = {
        "attn.qkv": (_head_ranges(layout.q_heads, D) + _head_ranges(layout.kv_heads, D, H * D)
                     + _head_ranges(layout.kv_heads, D, (H + KVH) * D)),
        "mlp.gate_up": [(s, s + n), (inter + s, inter + s + n)],
    }
    in_ranges = {"attn.o": _head_ranges(layout.q_heads, D), "mlp.down": [(s, s + n)]}
    shard = {}
    for key, t in full.items():
        m = _KEY.search(key)
        if m is None:
            shard[key] = t
            continue
        mod, attr = m.group(2), m.group(3)
        if mod in out_ranges:
            dim, div = _OUT[attr]
            shard[key] = _take(t, out_ranges[mod], dim, div)
        elif attr == "bias":  # row-parallel: the partial sums are reduced, so the bias is added once
            shard[key] = t.clone() if layout.rank == 0 else torch.zeros_like(t)
        else:
            dim, div = _IN[attr]
            shard[key] = _take(t, in_ranges[mod], dim, group_size if div == "G" else div)
    return shard
