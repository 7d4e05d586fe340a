"""``python -m engine convert MODEL --tp T --dst DIR``: write per-rank shards that tp workers load directly.

DIR becomes a model folder (config, tokenizer and generation files copied) plus ``rank{r}.safetensors``
(each rank's tensors under the engine's own parameter names) and ``raylm_tp.json`` (the partition). A
replica pointed at DIR with the same tp skips reading and cutting the full checkpoint. The folder is
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from ..models.loader import load_model, read_model_args, resolve_model_path
from ..models.quant_config import read_quant_config
from .loading import MANIFEST, layouts_for, rank_file
from .shard import shard_state_dict

logger = logging.getLogger(__name__)
_SIDE_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja")


def convert(model: Optional[str], tp: int, dst: str, dtype: str = "float32") -> Dict:
    src = resolve_model_path(model)
    if (src / MANIFEST).is_file():
        raise ValueError(f"model: {src} already holds converted shards; convert the original checkpoint")
    out = Path(dst).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"dst: {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    args, cfg = read_model_args(src)
    quant = read_quant_config(cfg)
    layouts = layouts_for(src, args, quant, tp)  # errors before loading anything
    t0 = time.perf_counter()
    full, _ = load_model(str(src), "cpu", getattr(torch, dtype))
    state = full.state_dict()
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors stores no aliases
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        from safetensors.torch import save_file
        for lay in layouts:
            shard = shard_state_dict(state, args, lay, quant["group_size"] if quant else None)
            save_file({k: v.contiguous() for k, v in shard.items()}, str(rank_file(tmp, lay.rank)))
        for f in src.iterdir():
            if f.name in _SIDE_FILES or f.name.startswith("tokenizer"):
                shutil.copy(f, tmp / f.name)
        manifest = {"tp": tp, "source": str(src), "dtype": dtype,
                    "ranks": [{"rank": l.rank, "q_heads": list(l.q_heads), "kv_heads": list(l.kv_heads),
                               "inter": list(l.inter)} for l in layouts]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = [rank_file(out, r).stat().st_size for r in range(tp)]
    return {"dst": str(out), "tp": tp, "seconds": time.perf_counter() - t0,
            "rank_MiB": [round(s / 2**20, 1) for s in sizes]}
