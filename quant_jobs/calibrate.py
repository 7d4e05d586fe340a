"""Calibration: run samples through the model, keep per-channel statistics and (for AWQ) every layer's input.

Statistics file ``calib_stats.safetensors`` (float32 tensors; metadata: model, dataset, samples, seqlen, tokens):
- ``layers.{i}.{linear}.input.{max,min,mean,absmax,absmean}`` [in_features] for linear in
  ``attn.qkv`` (q/k/v share it), ``attn.o``, ``mlp.gate_up`` (gate/up share it), ``mlp.down``;
- ``layers.{i}.attn.{k,v}.{max,min,absmax}`` [kv_heads, head_dim] over all tokens, K after RoPE (as cached).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .dense import layer_forward, rotary_for
from .model_io import load_full

log = logging.getLogger(__name__)

LINEARS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
Acc = Dict[str, Dict[str, torch.Tensor]]


def _accumulate(acc: Acc, key: str, t: torch.Tensor, keep: int) -> None:
    flat = t.detach().float().reshape(-1, *t.shape[-keep:])
    a = flat.abs()
    cur = {"max": flat.amax(0), "min": flat.amin(0), "absmax": a.amax(0)}
    if keep == 1:
        cur.update(sum=flat.sum(0, dtype=torch.float64), abs_sum=a.sum(0, dtype=torch.float64),
                   count=torch.tensor(float(flat.shape[0]), dtype=torch.float64))
    merge_into(acc, {key: cur})


def merge_into(acc: Acc, other: Acc) -> None:
    """Fold shard statistics into ``acc`` (max/min/absmax by max/min, sums and counts added)."""
    for key, st in other.items():
        mine = acc.get(key)
        if mine is None:
            acc[key] = {k: v.clone() for k, v in st.items()}
            continue
        mine["max"] = torch.maximum(mine["max"], st["max"])
        mine["min"] = torch.minimum(mine["min"], st["min"])
        mine["absmax"] = torch.maximum(mine["absmax"], st["absmax"])
        for k in ("sum", "abs_sum", "count"):
            if k in st:
                mine[k] = mine[k] + st[k]


@torch.no_grad()
def calibrate_shard(model_dir: str, ids: torch.Tensor, capture: bool, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Tuple[Acc, List[Optional[torch.Tensor]]]:
    """ids [n, L] -> (statistics, per-layer inputs [n, L, hidden] or Nones).

    Samples run one at a time, so a layer's captured input does not depend on how samples were sharded.
    """
    model = load_full(model_dir, device, dtype)
    n_layers = len(model.layers)
    cos, sin = rotary_for(model.args, ids.shape[1], device)
    acc: Acc = {}
    inputs: List[List[torch.Tensor]] = [[] for _ in range(n_layers)]
    for row in ids:
        x = model.embed(row[None].to(device))
        for i, layer in enumerate(model.layers):
            if capture:
                inputs[i].append(x.cpu())

            def record(name, t, i=i):
                kv = name in ("k", "v")
                key = f"layers.{i}.attn.{name}" if kv else f"layers.{i}.{name}.input"
                _accumulate(acc, key, t, 2 if kv else 1)
            x = layer_forward(layer, x, cos, sin, record)
    return acc, [torch.cat(xs) if capture else None for xs in inputs]


def finalize(acc: Acc) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, st in acc.items():
        for k in ("max", "min", "absmax"):
            out[f"{key}.{k}"] = st[k].float().contiguous()
        if "count" in st:
            out[f"{key}.mean"] = (st["sum"] / st["count"]).float()
            out[f"{key}.absmean"] = (st["abs_sum"] / st["count"]).float()
    return out


def save_stats(path: Path, stats: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    from .workdir import atomic_path
    with atomic_path(path) as tmp:
        save_file(stats, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def load_stats(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    if not path.is_file():
        raise FileNotFoundError(f"work_dir: {path.parent} has no {path.name}; run `python -m quant_jobs calibrate` "
                                "first")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
