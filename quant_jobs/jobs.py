"""The steps behind `python -m quant_jobs`: calibrate, auto_awq, kv_qparams (eval_ppl lives in ppl.py).

Every step validates its input before heavy work, shows tqdm progress and returns a summary dict.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from tqdm import tqdm

from engine.models.loader import read_model_args, resolve_model_path

from .awq_search import SearchSettings, apply_result
from .calibrate import finalize, load_stats, save_stats
from .checkpoint import check_group_sizes, write_awq_checkpoint
from .config import AwqOptions, CalibOptions, KvOptions
from .data import calib_windows, check_dataset
from .executor import Executor
from .model_io import load_full, resolve_dtype
from .workdir import atomic_path, check_writable

log = logging.getLogger(__name__)
STATS_FILE = "calib_stats.safetensors"
SEARCH_DIR = "awq_search"


def prepare(o: CalibOptions) -> Tuple[Path, object, Path]:
    """Resolve and check everything cheap first: model, architecture, dataset, seqlen, work dir."""
    model_dir = resolve_model_path(o.model)
    args, _ = read_model_args(model_dir)
    check_dataset(o.calib_dataset)
    if o.calib_seqlen > args.max_position_embeddings:
        raise ValueError(f"calib_seqlen: {o.calib_seqlen} exceeds the model's context "
                         f"(max_position_embeddings {args.max_position_embeddings})")
    return model_dir, args, check_writable(Path(o.work_dir))


def _windows(o: CalibOptions, model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return calib_windows(tok, o.calib_dataset, o.calib_samples, o.calib_seqlen)


def _run_calibration(o: CalibOptions, model_dir: Path, args, work: Path, ex: Executor, capture: bool):
    ids = _windows(o, model_dir)
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc="calibrate", unit="sample") as bar:
        acc, inputs = ex.calibrate(str(model_dir), ids, capture, args.num_layers, bar.update)
    secs = time.perf_counter() - t0
    log.info("calibrated %d samples x %d tokens in %.1f s (%.0f tokens/s)", len(ids), ids.shape[1], secs,
             ids.numel() / secs)
    meta = {"model": str(model_dir), "dataset": o.calib_dataset, "samples": o.calib_samples,
            "seqlen": o.calib_seqlen, "tokens": ids.numel()}
    save_stats(work / STATS_FILE, finalize(acc), meta)
    return inputs, {**meta, "calibrate_s": round(secs, 2)}


def calibrate(o: CalibOptions) -> Dict:
    t0 = time.perf_counter()
    model_dir, args, work = prepare(o)
    ex = Executor(o.parallel, o.device, o.dtype, o.workers)
    _, meta = _run_calibration(o, model_dir, args, work, ex, capture=False)
    return {"step": "calibrate", "seconds": round(time.perf_counter() - t0, 1), "output": str(work / STATS_FILE),
            "layers": args.num_layers, **meta}


# ---- AWQ -------------------------------------------------------------------------------------
def _settings(o: AwqOptions) -> SearchSettings:
    return SearchSettings(bits=o.w_bits, group_size=o.w_group_size, search_scale=o.search_scale, clip=o.clip)


def _search_manifest(o: AwqOptions, model_dir: Path) -> Dict:
    return {"model": str(model_dir), "w_bits": o.w_bits, "w_group_size": o.w_group_size,
            "search_scale": o.search_scale, "clip": o.clip, "calib_dataset": o.calib_dataset,
            "calib_samples": o.calib_samples, "calib_seqlen": o.calib_seqlen}


def finished_layers(work: Path, manifest: Dict, n_layers: int) -> List[int]:
    """Layers whose search result is already saved; refuses results made with other settings."""
    d = work / SEARCH_DIR
    mf = d / "manifest.json"
    if mf.is_file():
        old = json.loads(mf.read_text())
        if old != manifest:
            diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
            raise ValueError(f"work_dir: {d} holds search results made with other settings {diff}; "
                             "use a new work dir or delete that folder")
    else:
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(mf) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))
    return [i for i in range(n_layers) if (d / f"layer_{i:03d}.safetensors").is_file()]


def save_layer_result(work: Path, i: int, result: Dict[str, torch.Tensor], info: Dict) -> None:
    from safetensors.torch import save_file
    with atomic_path(work / SEARCH_DIR / f"layer_{i:03d}.safetensors") as tmp:
        save_file(result, str(tmp), metadata={"layer": str(i), "info": json.dumps(info)})


def load_layer_results(work: Path, n_layers: int) -> List[Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    out = []
    for i in range(n_layers):
        f = work / SEARCH_DIR / f"layer_{i:03d}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"work_dir: {f} is missing; run auto_awq to finish the search")
        out.append(load_file(str(f)))
    return out


def auto_awq(o: AwqOptions) -> Dict:
    t0 = time.perf_counter()
    model_dir, args, work = prepare(o)
    check_group_sizes(args, o.w_group_size)
    dst = Path(o.dst).expanduser() if o.dst else work / "quantized"
    results = None
    skipped = 0
    timing: Dict[str, float] = {}
    if not o.rtn and (o.search_scale or o.clip):
        manifest = _search_manifest(o, model_dir)
        done = finished_layers(work, manifest, args.num_layers)
        todo = [i for i in range(args.num_layers) if i not in done]
        skipped = len(done)
        if done:
            log.info("resuming: %d of %d layers already searched, skipping them", len(done), args.num_layers)
        if todo:
            ex = Executor(o.parallel, o.device, o.dtype, o.workers)
            inputs, meta = _run_calibration(o, model_dir, args, work, ex, capture=True)
            layer_s: List[float] = []
            t_search = time.perf_counter()
            with tqdm(total=len(todo), desc="awq search", unit="layer") as bar:
                def on_done(i, result, info):
                    save_layer_result(work, i, result, info)
                    layer_s.append(info["seconds"])
                    bar.set_postfix_str(f"layer {i} {info['seconds']:.1f}s: " +
                                        " ".join(f"{k}={v:.2f}" for k, v in info["ratios"].items()))
                    bar.update()
                ex.search(str(model_dir), todo, inputs, _settings(o), on_done)
            timing = {"capture_s": meta["calibrate_s"], "search_s": round(time.perf_counter() - t_search, 2),
                      "layer_search_s_mean": round(sum(layer_s) / len(layer_s), 3), "workers": ex.workers}
        results = load_layer_results(work, args.num_layers)
    t_pack = time.perf_counter()
    model = load_full(str(model_dir), "cpu", torch.float32)
    if results is not None:
        for layer, r in zip(model.layers, results):
            apply_result(layer, r)
    log.info("packing %d layers to %s", args.num_layers, dst)
    write_awq_checkpoint(model, model_dir, dst, o.w_bits, o.w_group_size)
    timing["pack_s"] = round(time.perf_counter() - t_pack, 2)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    return {"step": "auto_awq", "method": "rtn" if results is None else "awq", "seconds": round(time.perf_counter() - t0, 1),
            "output": str(dst), "w_bits": o.w_bits, "w_group_size": o.w_group_size, "layers": args.num_layers,
            "layers_resumed": skipped, "checkpoint_MiB": round(size / 2 ** 20, 1), **timing}


# ---- KV-cache parameters --------------------------------------------------------------------
def kv_params(stats: Dict[str, torch.Tensor], n_layers: int, bits: int, sym: bool) -> Dict[str, torch.Tensor]:
    """Per layer and KV head: asymmetric zp = (min+max)/2, scale = (max-min)/(2^bits-1);
    symmetric zp = 0, scale = absmax/(2^(bits-1)-1). -> {k_scale, k_zp, v_scale, v_zp}: [layers, kv_heads]."""
    out = {}
    for kind in ("k", "v"):
        scales, zps = [], []
        for i in range(n_layers):
            mx = stats[f"layers.{i}.attn.{kind}.max"].amax(-1)
            mn = stats[f"layers.{i}.attn.{kind}.min"].amin(-1)
            if sym:
                scales.append(stats[f"layers.{i}.attn.{kind}.absmax"].amax(-1) / (2 ** (bits - 1) - 1))
                zps.append(torch.zeros_like(mx))
            else:
                scales.append((mx - mn) / (2 ** bits - 1))
                zps.append((mx + mn) / 2)
        out[f"{kind}_scale"], out[f"{kind}_zp"] = torch.stack(scales), torch.stack(zps)
    return out


def rank_heads(kv_heads: int, tp: int, rank: int) -> List[int]:
    """The KV heads rank ``rank`` holds: a contiguous split, or one replicated head when tp > kv_heads."""
    if tp <= kv_heads:
        per = kv_heads // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank * kv_heads // tp]


def kv_qparams(o: KvOptions) -> Dict:
    from safetensors.torch import save_file
    t0 = time.perf_counter()
    work = Path(o.work_dir).expanduser()
    stats, meta = load_stats(work / STATS_FILE)
    n_layers = sum(1 for k in stats if k.endswith(".attn.k.max"))
    kv_heads = stats["layers.0.attn.k.max"].shape[0]
    if o.num_tp > 1 and o.num_tp <= kv_heads and kv_heads % o.num_tp:
        raise ValueError(f"num_tp: {o.num_tp} does not divide the {kv_heads} KV heads")
    tensors = {f"int{b}.{k}": v for b in (8, 4) for k, v in kv_params(stats, n_layers, b, o.kv_sym).items()}
    out_dir = work / "kv_qparams"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"symmetric": str(o.kv_sym), "layers": str(n_layers), "kv_heads": str(kv_heads)}
    with atomic_path(out_dir / "kv_qparams.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=info)
    files = [str(out_dir / "kv_qparams.safetensors")]
    if o.num_tp > 1:
        for r in range(o.num_tp):
            idx = torch.tensor(rank_heads(kv_heads, o.num_tp, r))
            path = out_dir / f"kv_qparams.rank{r}.safetensors"
            with atomic_path(path) as tmp:
                save_file({k: v[:, idx].contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={**info, "rank": str(r), "tp": str(o.num_tp)})
            files.append(str(path))
    return {"step": "kv_qparams", "seconds": round(time.perf_counter() - t0, 2), "output": files,
            "layers": n_layers, "kv_heads": kv_heads, "symmetric": o.kv_sym, "calibration": meta.get("dataset")}


__all__ = ["calibrate", "auto_awq", "kv_qparams", "resolve_dtype"]
