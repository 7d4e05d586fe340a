"""Quantize a (scaled and clipped) model's linears and write / read AutoAWQ "GEMM" checkpoints.

Tensor names follow the source checkpoint (through the architecture's adapter, inverted), so a Llama model
comes back with ``model.layers.{i}.self_attn.q_proj.qweight`` and an InternLM2 model with its packed
``attention.wqkv.qweight``; quantized linears carry ``qweight``/``qzeros``/``scales``, everything else
is float16.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from engine.models.adapters import INVERSE_TRANSFORMS, get_adapter
from engine.models.llama import LlamaModel
from engine.models.quant_config import read_quant_config as _read_qc

from .quantize import check_group, dequantize, fake_quant, pack_awq, quant_params, quantize, unpack_awq
from .workdir import atomic_dir

QUANT_LINEARS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
SKIP_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def check_group_sizes(args, group_size: int) -> None:
    """Every quantized linear's input size must be a multiple of the group size (clear error naming it)."""
    sizes = {"q_proj/k_proj/v_proj": args.hidden_size, "o_proj": args.num_heads * args.head_dim,
             "gate_proj/up_proj": args.hidden_size, "down_proj": args.intermediate_size}
    for name, n in sizes.items():
        check_group(name, n, group_size)


@torch.no_grad()
def fake_quantize_model(model: LlamaModel, bits: int, group_size: int) -> None:
    for layer in model.layers:
        for lin in QUANT_LINEARS:
            mod = layer.get_submodule(lin)
            mod.weight.data.copy_(fake_quant(mod.weight.data, bits, group_size))


def _quantized(model: LlamaModel, bits: int, group_size: int) -> Dict[str, Tuple[torch.Tensor, ...]]:
    out = {}
    for i, layer in enumerate(model.layers):
        for lin in QUANT_LINEARS:
            w = layer.get_submodule(lin).weight.data.float().cpu()
            sc, z = quant_params(w, bits, group_size)
            out[f"layers.{i}.{lin}"] = (quantize(w, sc, z, bits), sc, z)
    return out


def checkpoint_tensors(model: LlamaModel, bits: int, group_size: int) -> Dict[str, torch.Tensor]:
    args = model.args
    adapter = get_adapter(args.architecture)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    quant = _quantized(model, bits, group_size)
    out: Dict[str, torch.Tensor] = {}
    for pattern, (param_pat, shard, tf) in adapter.names.items():
        for i in (range(args.num_layers) if "{i}" in pattern else [None]):
            ckpt = pattern.format(i=i) if i is not None else pattern
            param = param_pat.format(i=i) if i is not None else param_pat
            if param not in params or (param == "lm_head.weight" and args.tie_word_embeddings):
                continue
            mod_name, attr = param.rsplit(".", 1)
            r0, n = modules[mod_name].offsets[shard] if shard else (0, params[param].shape[0])
            inv = INVERSE_TRANSFORMS[tf] if tf else (lambda t, a: t)
            if mod_name in quant and attr == "weight":
                q, sc, z = (inv(t[r0:r0 + n], args) for t in quant[mod_name])
                base = ckpt[:-len(".weight")]
                out[base + ".qweight"], out[base + ".qzeros"], out[base + ".scales"] = pack_awq(q, sc, z)
            else:
                out[ckpt] = inv(params[param].data[r0:r0 + n].float().cpu(), args).half().contiguous()
    return out


def write_awq_checkpoint(model: LlamaModel, src_dir: Path, dst: Path, bits: int, group_size: int) -> Path:
    """Write to a temporary folder, rename at the end: a crash never leaves a folder that looks complete."""
    from safetensors.torch import save_file
    tensors = checkpoint_tensors(model, bits, group_size)
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((src_dir / "config.json").read_text())
        cfg["torch_dtype"] = "float16"
        cfg["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                      "zero_point": True, "version": "gemm"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in src_dir.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIP_FILES) \
                    and f.name != "model.safetensors.index.json":
                shutil.copy(f, tmp / f.name)
    return dst


def read_quant_config(model_dir: Path) -> Dict:
    return _read_qc(json.loads((Path(model_dir) / "config.json").read_text()))


def dequantized_tensors(tensors: Iterator[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Turn each qweight/qzeros/scales triple into the dequantized ``weight`` [out, in]; pass the rest."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        base, _, kind = name.rpartition(".")
        if kind not in ("qweight", "qzeros", "scales"):
            yield name, t
            continue
        parts = pending.setdefault(base, {})
        parts[kind] = t
        if len(parts) == 3:
            del pending[base]
            yield base + ".weight", unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"])
    if pending:
        raise ValueError(f"checkpoint: incomplete AWQ tensors for {sorted(pending)[:4]}")


__all__ = ["check_group_sizes", "fake_quantize_model", "write_awq_checkpoint", "read_quant_config",
           "dequantized_tensors", "dequantize"]
