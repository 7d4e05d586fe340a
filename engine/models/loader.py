"""Find a model on disk and load it: config -> adapter -> meta-device model -> weights from safetensors."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

import torch

from ..default_model import default_model_dir, ensure_converted
from .adapters import TRANSFORMS, get_adapter
from .args import ModelArgs
from .llama import LlamaModel
from .quant_config import read_quant_config
from .safetensors_read import read_tensors

logger = logging.getLogger(__name__)


def resolve_model_path(model: Optional[str]) -> Path:
    """None -> the embedded model; a .gguf file -> its cached conversion; a folder; or a hub id in the local cache.

    Never downloads: a hub id that is not on disk is an error.
    """
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: {path} has no config.json (expected a Hugging Face model folder)")
        return path
    if path.exists():
        raise ValueError(f"model: {path} is neither a model folder nor a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        cached = _hub_cache_lookup(model)
        if cached is not None:
            return cached
        raise FileNotFoundError(
            f"model: {model!r} is not on disk. This engine never downloads weights (HF_HUB_OFFLINE is honoured); "
            "download the model elsewhere and pass its local folder.")
    raise FileNotFoundError(f"model: no such folder or file: {path}")


def _hub_cache_lookup(repo_id: str) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the local cache (or hub library missing)
        return None


def read_model_args(model_dir: Path) -> Tuple[ModelArgs, Dict]:
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"config.json: {model_dir} names no architecture")
    adapter = get_adapter(archs[0])
    return ModelArgs.from_config(cfg, archs[0], qkv_bias_default=adapter.qkv_bias), cfg


def _weight_files(model_dir: Path):
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if files:
        return files, "bin"
    raise FileNotFoundError(f"model: {model_dir} holds no *.safetensors or pytorch_model*.bin weights")


def _iter_tensors(model_dir: Path):
    files, kind = _weight_files(model_dir)
    for f in files:
        if kind == "safetensors":  # plain reads: a mapped file's pages would count as resident while loading
            yield from read_tensors(f)
        else:
            state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()


def build_model(args: ModelArgs, device: str, dtype: torch.dtype, quant: Optional[Dict] = None) -> LlamaModel:
    """On the meta device, AWQ layers swapped in when ``quant`` (read_quant_config) says so (but for its
    "dense" modules, see swap_in_awq), then allocated."""
    with torch.device("meta"):
        model = LlamaModel(args)
        if quant:
            from ..layers.awq_linear import swap_in_awq
            dense = set(quant.get("dense", ()))
            if quant.get("not_convert"):  # AutoAWQ's modules_to_not_convert: full-precision products
                dense |= get_adapter(args.architecture).unconverted(quant["not_convert"], args.num_layers)
            swap_in_awq(model, quant["group_size"], dense)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    return model


def load_weights(model: LlamaModel, model_dir: Path, tensors=None) -> None:
    """``tensors``: an iterator of (checkpoint name, tensor) to load instead of the folder's files."""
    args = model.args
    adapter = get_adapter(args.architecture)
    modules = dict(model.named_modules())
    loaded: Set[Tuple[str, Optional[str]]] = set()
    unused = []
    with torch.no_grad():
        for name, tensor in (tensors if tensors is not None else _iter_tensors(model_dir)):
            target = adapter.target(name)
            if target is None:
                if not adapter.ignored(name):
                    unused.append(name)
                continue
            param, shard, tf = target
            mod_name, attr = param.rsplit(".", 1)
            if tf is not None:
                tensor = _transform(tf, attr, tensor, args)
            mod = modules[mod_name]
            if hasattr(mod, "load"):
                mod.load(attr, tensor, shard)
            else:
                dst = getattr(mod, attr).data
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(dst.shape)}")
                dst.copy_(tensor.to(dst.dtype))
            loaded.add((param, shard))
    _check_complete(model, loaded, unused)


def _transform(tf: str, attr: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Row transforms act on the output dimension, which AWQ tensors keep in (packed) columns."""
    fn = TRANSFORMS[tf]
    if attr in ("qweight", "qzeros"):
        from ..kernels.awq_torch import pack_columns, unpack_columns
        return pack_columns(fn(unpack_columns(tensor).t(), args).t())
    if attr == "scales":
        return fn(tensor.t(), args).t()
    return fn(tensor, args)


def _check_complete(model: LlamaModel, loaded, unused) -> None:
    have = {p for p, _ in loaded}
    missing = []
    modules = dict(model.named_modules())
    quant_buffers = [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales")
                     and getattr(modules[n.rsplit(".", 1)[0]], "packed", None) is None]  # packed: filled from elsewhere
    missing += [n for n in quant_buffers if n not in have]
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        if name not in have:
            missing.append(name)
    for mod_name, mod in model.named_modules():
        for attr in ("weight", "bias", "qweight", "qzeros", "scales"):
            offsets = getattr(mod, "offsets", None)
            if offsets and f"{mod_name}.{attr}" in have and getattr(mod, attr) is not None:
                shards = {s for p, s in loaded if p == f"{mod_name}.{attr}"}
                if None not in shards and shards != set(offsets):
                    missing.append(f"{mod_name}.{attr}[{sorted(set(offsets) - shards)}]")
    if missing:
        raise ValueError(f"checkpoint: missing tensors for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unused:
        logger.warning("checkpoint: %d tensors not used, e.g. %s", len(unused), unused[:4])


def load_model(model: Optional[str], device: str, dtype: torch.dtype) -> Tuple[LlamaModel, Path]:
    model_dir = resolve_model_path(model)
    args, cfg = read_model_args(model_dir)
    quant = read_quant_config(cfg)
    _weight_files(model_dir)  # fail before building anything
    t0 = time.perf_counter()
    net = build_model(args, device, dtype, quant)
    load_weights(net, model_dir)
    net.eval()
    logger.info("loaded %s (%s, %d layers%s) in %.1f s", model_dir.name, args.architecture, args.num_layers,
                f", AWQ w4 g{quant['group_size']}" if quant else "", time.perf_counter() - t0)
    return net, model_dir
