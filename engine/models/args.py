"""Model hyperparameters read from a Hugging Face ``config.json`` (old and new field spellings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: Dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: List[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: Dict[str, Any], architecture: str, qkv_bias_default: bool = False) -> "ModelArgs":
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_scaling") or {})
        params = dict(cfg.get("rope_parameters") or {})  # transformers 5 spelling
        theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
        if params:
            rope = {**{k: v for k, v in params.items() if k != "rope_theta"}, **rope}
        if rope.get("type") and not rope.get("rope_type"):
            rope["rope_type"] = rope["type"]
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        attn_bias = cfg.get("attention_bias", cfg.get("bias", False))
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope,
            qkv_bias=bool(qkv_bias_default or attn_bias),
            o_bias=bool(attn_bias) if architecture != "Qwen2ForCausalLM" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )
