"""WikiText-2 perplexity (the GPTQ/AWQ protocol) for full-precision, fake-quantized and packed models."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.models.loader import read_model_args, resolve_model_path

from .awq_search import apply_result
from .checkpoint import check_group_sizes, fake_quantize_model, read_quant_config
from .config import PplOptions
from .data import find_eval_file, wikitext2_test_text
from .dense import logits
from .model_io import load_full, resolve_dtype
from .workdir import atomic_path


def test_windows(tokenizer, eval_file: Path, seqlen: int, limit: Optional[int]) -> torch.Tensor:
    ids = tokenizer(wikitext2_test_text(eval_file), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"seqlen: {seqlen} is longer than the whole evaluation text ({ids.numel()} tokens)")
    n = min(n, limit or n)
    return ids[:n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, desc: str = "ppl") -> Dict:
    """exp(mean NLL) over every predicted token of every window."""
    device = model.embed.weight.device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in tqdm(windows, desc=desc, unit="window"):
        w = w.to(device)
        lg = logits(model, w[None])[0]
        nll += F.cross_entropy(lg[:-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": round(time.perf_counter() - t0, 1)}


def _work_group_size(work: Path) -> Optional[int]:
    for f in (work / "awq_search" / "manifest.json", work / "quantized" / "config.json"):
        if f.is_file():
            d = json.loads(f.read_text())
            return d.get("w_group_size") or (d.get("quantization_config") or {}).get("group_size")
    return None


def _variants(o: PplOptions, work: Optional[Path], packed_model: bool) -> List[str]:
    if o.variants:
        return list(o.variants)
    if packed_model:
        return ["packed"]
    v = ["fp"]
    if work is not None:
        v.append("rtn")
        if (work / "awq_search" / "manifest.json").is_file():
            v.append("awq")
        if (work / "quantized" / "config.json").is_file():
            v.append("packed")
    return v


def eval_ppl(o: PplOptions) -> Dict:
    from transformers import AutoTokenizer

    from .jobs import SEARCH_DIR, load_layer_results
    model_dir = resolve_model_path(o.model)
    args, _ = read_model_args(model_dir)
    packed_model = bool(read_quant_config(model_dir))
    work = Path(o.work_dir).expanduser() if o.work_dir else None
    if work is not None and not work.is_dir():
        raise FileNotFoundError(f"work_dir: no such folder: {work}")
    variants = _variants(o, work, packed_model)
    group = o.w_group_size or (work and _work_group_size(work)) or 128
    if {"rtn", "awq"} & set(variants):
        check_group_sizes(args, group)
    if ({"awq", "packed"} & set(variants)) and work is None and not packed_model:
        raise ValueError("variants: awq and packed need --work-dir (the auto_awq work dir)")
    eval_file = find_eval_file(o.eval_file)
    device = o.device if o.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(o.dtype, device)
    windows = test_windows(AutoTokenizer.from_pretrained(str(model_dir)), eval_file, o.seqlen, o.limit)
    rows = []
    for v in variants:
        src = model_dir
        if v == "packed" and not packed_model:
            src = work / "quantized"
        model = load_full(str(src), device, dtype)
        if v == "awq":
            for layer, r in zip(model.layers, load_layer_results(work, args.num_layers)):
                apply_result(layer, r)
        if v in ("rtn", "awq"):
            fake_quantize_model(model, 4, group)
        r = perplexity(model, windows, desc=v)
        label = {"fp": f"full precision ({str(dtype).replace('torch.', '')})", "rtn": f"RTN w4g{group} (fake)",
                 "awq": f"AWQ w4g{group} (fake)", "packed": "AWQ packed checkpoint (dequantized)"}[v]
        rows.append({"variant": v, "label": label, "model": str(src), **r})
        del model
    res = {"step": "eval_ppl", "dataset": "wikitext2 test", "eval_file": str(eval_file), "seqlen": o.seqlen,
           "windows": int(windows.shape[0]), "rows": rows, "search_dir": str(work / SEARCH_DIR) if work else None}
    out = Path(o.output) if o.output else (work or Path(".")) / "ppl.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    res["output"] = str(out)
    return res


def ppl_table(res: Dict) -> str:
    lines = [f"WikiText-2 test perplexity, seqlen {res['seqlen']}, {res['windows']} windows",
             "| model | perplexity | tokens | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['ppl']:.3f} | {r['tokens']} | {r['seconds']} |" for r in res["rows"]]
    return "\n".join(lines)
