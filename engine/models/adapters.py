"""Architecture adapters: checkpoint tensor names -> our parameters, as data.

Each entry maps a checkpoint name (with ``{i}`` for the layer) to (our parameter, shard, transform).
``shard`` names a part of a fused layer; ``transform`` names a function in TRANSFORMS applied first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from .args import ModelArgs

Target = Tuple[str, Optional[str], Optional[str]]  # (param, shard, transform)
QUANT_TENSORS = ("qweight", "qzeros", "scales")


def _llama_names(prefix: str = "model.") -> Dict[str, Target]:
    L = prefix + "layers.{i}."
    table: Dict[str, Target] = {
        prefix + "embed_tokens.weight": ("embed.weight", None, None),
        prefix + "norm.weight": ("norm.weight", None, None),
        "lm_head.weight": ("lm_head.weight", None, None),
        L + "input_layernorm.weight": ("layers.{i}.input_norm.weight", None, None),
        L + "post_attention_layernorm.weight": ("layers.{i}.post_norm.weight", None, None),
        L + "self_attn.o_proj.weight": ("layers.{i}.attn.o.weight", None, None),
        L + "self_attn.o_proj.bias": ("layers.{i}.attn.o.bias", None, None),
        L + "mlp.down_proj.weight": ("layers.{i}.mlp.down.weight", None, None),
        L + "mlp.down_proj.bias": ("layers.{i}.mlp.down.bias", None, None),
    }
    for kind in ("weight", "bias"):
        for proj in "qkv":
            table[L + f"self_attn.{proj}_proj.{kind}"] = (f"layers.{{i}}.attn.qkv.{kind}", proj, None)
        for proj in ("gate", "up"):
            table[L + f"mlp.{proj}_proj.{kind}"] = (f"layers.{{i}}.mlp.gate_up.{kind}", proj, None)
    return table


def _internlm2_names() -> Dict[str, Target]:
    L = "model.layers.{i}."
    return {
        "model.tok_embeddings.weight": ("embed.weight", None, None),
        "model.norm.weight": ("norm.weight", None, None),
        "output.weight": ("lm_head.weight", None, None),
        L + "attention_norm.weight": ("layers.{i}.input_norm.weight", None, None),
        L + "ffn_norm.weight": ("layers.{i}.post_norm.weight", None, None),
        L + "attention.wqkv.weight": ("layers.{i}.attn.qkv.weight", None, "internlm2_wqkv"),
        L + "attention.wqkv.bias": ("layers.{i}.attn.qkv.bias", None, "internlm2_wqkv"),
        L + "attention.wo.weight": ("layers.{i}.attn.o.weight", None, None),
        L + "attention.wo.bias": ("layers.{i}.attn.o.bias", None, None),
        L + "feed_forward.w1.weight": ("layers.{i}.mlp.gate_up.weight", "gate", None),
        L + "feed_forward.w3.weight": ("layers.{i}.mlp.gate_up.weight", "up", None),
        L + "feed_forward.w2.weight": ("layers.{i}.mlp.down.weight", None, None),
    }


def internlm2_wqkv(t: torch.Tensor, a: ModelArgs) -> torch.Tensor:
    """InternLM2 packs rows as [kv_head, (q_per_kv queries, k, v), head_dim]; reorder to [q; k; v]."""
    g = a.num_heads // a.num_kv_heads
    rest = t.shape[1:]
    packed = t.reshape(a.num_kv_heads, g + 2, a.head_dim, *rest)
    q = packed[:, :g].reshape(a.num_heads * a.head_dim, *rest)
    k = packed[:, g].reshape(a.num_kv_heads * a.head_dim, *rest)
    v = packed[:, g + 1].reshape(a.num_kv_heads * a.head_dim, *rest)
    return torch.cat([q, k, v], dim=0)


def internlm2_wqkv_inverse(t: torch.Tensor, a: ModelArgs) -> torch.Tensor:
    """[q; k; v] rows back to InternLM2's packed order (writing checkpoints in the original layout)."""
    g = a.num_heads // a.num_kv_heads
    rest = t.shape[1:]
    q, k, v = t.split([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim])
    packed = torch.cat([q.reshape(a.num_kv_heads, g, a.head_dim, *rest),
                        k.reshape(a.num_kv_heads, 1, a.head_dim, *rest),
                        v.reshape(a.num_kv_heads, 1, a.head_dim, *rest)], dim=1)
    return packed.reshape(-1, *rest)


TRANSFORMS: Dict[str, Callable[[torch.Tensor, ModelArgs], torch.Tensor]] = {"internlm2_wqkv": internlm2_wqkv}
INVERSE_TRANSFORMS: Dict[str, Callable[[torch.Tensor, ModelArgs], torch.Tensor]] = {
    "internlm2_wqkv": internlm2_wqkv_inverse}


@dataclass(frozen=True)
class Adapter:
    names: Dict[str, Target]
    qkv_bias: bool = False  # the architecture always has q/k/v bias (Qwen2)
    ignore: Tuple[str, ...] = ("rotary_emb.inv_freq",)

    def target(self, name: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
        base, _, attr = name.rpartition(".")
        if attr in QUANT_TENSORS:  # an AWQ linear's tensors map like its weight would
            hit = self.target(base + ".weight")
            return None if hit is None else (hit[0].rsplit(".", 1)[0] + "." + attr, hit[1], hit[2])
        m = re.search(r"\.(\d+)\.", name)
        key = name if m is None else name[:m.start()] + ".{i}." + name[m.end():]
        hit = self.names.get(key)
        if hit is None:
            return None
        param, shard, tf = hit
        return (param.format(i=m.group(1)) if m else param), shard, tf

    def unconverted(self, keys: List[str], num_layers: int) -> Set[Tuple[int, str]]:
        """The (layer, "attn.qkv" / "attn.o" / "mlp.gate_up" / "mlp.down") products that an AWQ checkpoint's
        ``modules_to_not_convert`` keeps in full precision: those whose checkpoint module names (e.g.
        "model.layers.3.mlp.down_proj") contain one of ``keys``, as transformers matches them. The engine runs
        q/k/v and gate/up as one product each, so all of its parts must match, or none."""
        parts: Dict[Tuple[int, str], Dict[str, bool]] = {}
        for pattern, (param, _, _) in self.names.items():
            m = re.fullmatch(r"layers\.\{i\}\.(attn\.qkv|attn\.o|mlp\.gate_up|mlp\.down)\.weight", param)
            if m is None:
                continue
            for i in range(num_layers):
                name = pattern.format(i=i)[:-len(".weight")]
                parts.setdefault((i, m.group(1)), {})[name] = any(k in name for k in keys)
        dense = set()
        for key, got in parts.items():
            if all(got.values()):
                dense.add(key)
            elif any(got.values()):
                kept = [n for n, v in got.items() if v]
                rest = [n for n, v in got.items() if not v]
                raise ValueError(f"quantization_config.modules_to_not_convert keeps {', '.join(kept)} in full "
                                 f"precision but not {', '.join(rest)}, which the engine runs as one product with "
                                 "it: list all of them or none")
        return dense

    def ignored(self, name: str) -> bool:
        return any(s in name for s in self.ignore)


ADAPTERS: Dict[str, Adapter] = {
    "LlamaForCausalLM": Adapter(_llama_names()),
    "MistralForCausalLM": Adapter(_llama_names()),
    "Qwen2ForCausalLM": Adapter(_llama_names(), qkv_bias=True),
    "InternLM2ForCausalLM": Adapter(_internlm2_names()),
}


def get_adapter(architecture: str) -> Adapter:
    if architecture not in ADAPTERS:
        raise ValueError(f"architectures: {architecture!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[architecture]
