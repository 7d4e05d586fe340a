"""Build one rank's model: from per-rank shards written by ``python -m engine convert`` (fast: each rank
reads only its file), or by loading the original checkpoint and cutting the rank's share out of it."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..models.args import ModelArgs
from ..models.loader import build_model, load_weights, read_model_args
from ..models.quant_config import read_quant_config
from .partition import RankLayout, plan
from .shard import rank_args, shard_state_dict

logger = logging.getLogger(__name__)
MANIFEST = "raylm_tp.json"


def layouts_for(model_dir: Path, args: ModelArgs, quant: Optional[Dict], tp: int) -> List[RankLayout]:
    """The partition: read from converted shards, else planned (ValueError when tp cannot split the model)."""
    man = model_dir / MANIFEST
    if man.is_file():
        saved = json.loads(man.read_text())
        if saved["tp"] != tp:
            raise ValueError(f"tp: {model_dir} holds shards for tp={saved['tp']}, not tp={tp}; convert again with "
                             f"`python -m engine convert ... --tp {tp}` or use the original checkpoint")
        return [RankLayout(r["rank"], tp, tuple(r["q_heads"]), tuple(r["kv_heads"]), tuple(r["inter"]))
                for r in saved["ranks"]]
    return plan(args.num_heads, args.num_kv_heads, args.intermediate_size, tp, args.head_dim,
                quant["group_size"] if quant else None)


def rank_file(model_dir: Path, rank: int) -> Path:
    return model_dir / f"rank{rank}.safetensors"


def load_rank_model(spec: Dict[str, Any], rank: int, device: str, dtype: torch.dtype):
    model_dir = Path(spec["model_dir"])
    args, cfg = read_model_args(model_dir)
    quant = read_quant_config(cfg)
    layout = layouts_for(model_dir, args, quant, spec["tp"])[rank]
    t0 = time.perf_counter()
    net = build_model(rank_args(args, layout), device, dtype, quant)
    if (model_dir / MANIFEST).is_file():
        from safetensors.torch import load_file
        state = load_file(str(rank_file(model_dir, rank)), device=device)
        src = "converted shard"
    else:
        full = build_model(args, "cpu", dtype, quant)
        load_weights(full, model_dir)
        state = shard_state_dict(full.state_dict(), args, layout, quant["group_size"] if quant else None)
        del full
        src = "full checkpoint"
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and args.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"rank {rank}: shard does not match the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    net.tie_weights()
    net.eval()
    net.kv_head_ids, net.total_kv_heads = list(layout.kv_heads), args.num_kv_heads  # this rank's KV heads
    logger.info("rank %d: %d q heads, %d kv heads, %d mlp columns from the %s in %.1f s", rank, layout.num_heads,
                layout.num_kv_heads, layout.inter[1], src, time.perf_counter() - t0)
    return net
