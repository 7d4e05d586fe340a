"""Load the engine's model (whole, or one decoder layer) for quantization work, on any adapter architecture."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

import torch

from engine.models.adapters import TRANSFORMS, get_adapter
from engine.models.args import ModelArgs
from engine.models.llama import DecoderLayer, LlamaModel
from engine.models.loader import _iter_tensors, _weight_files, build_model, load_weights, read_model_args


def load_full(model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaModel:
    """The whole model; an AWQ checkpoint comes back with its weights dequantized."""
    from .checkpoint import dequantized_tensors, read_quant_config
    path = Path(model_dir)
    args, _ = read_model_args(path)
    model = build_model(args, device, dtype)
    tensors = dequantized_tensors(_iter_tensors(path)) if read_quant_config(path) else None
    load_weights(model, path, tensors)
    return model.eval()


def _layer_tensors(model_dir: Path, adapter, index: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """Only the tensors of one layer (safetensors are memory-mapped, so other layers are never read)."""
    files, kind = _weight_files(model_dir)
    tag = f".{index}."
    for f in files:
        if kind == "safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    if tag in name:
                        yield name, fh.get_tensor(name)
        else:
            state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            yield from ((n, t) for n, t in state.items() if tag in n)


@torch.no_grad()
def load_layer(model_dir: str, index: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tuple[DecoderLayer, ModelArgs]:
    args, _ = read_model_args(Path(model_dir))
    adapter = get_adapter(args.architecture)
    with torch.device("meta"):
        layer = DecoderLayer(args)
    layer = layer.to(dtype).to_empty(device=device)
    modules = dict(layer.named_modules())
    prefix = f"layers.{index}."
    for name, tensor in _layer_tensors(Path(model_dir), adapter, index):
        target = adapter.target(name)
        if target is None or not target[0].startswith(prefix):
            continue
        param, shard, tf = target
        if tf is not None:
            tensor = TRANSFORMS[tf](tensor, args)
        mod_name, attr = param[len(prefix):].rsplit(".", 1)
        mod = modules[mod_name]
        if hasattr(mod, "load"):
            mod.load(attr, tensor, shard)
        else:
            getattr(mod, attr).data.copy_(tensor.to(dtype))
    return layer.eval(), args


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
