"""Tiny random-initialised models written as real Hugging Face folders (Llama, Qwen2, InternLM2).

InternLM2 is not in transformers: its checkpoint is written from a random Llama model by packing
q/k/v into ``wqkv`` head by head, as InternLM2's modelling code documents, so the Llama model is its oracle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


# a tiny model built straight in the engine's own classes (no checkpoint): 2 layers, 4 heads over 2 KV heads of 16
ENGINE_ARGS = dict(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
                   rope_theta=10000.0)


def engine_model(device="cpu", dtype=torch.float32, qkv_bias: bool = False):
    """The ENGINE_ARGS model on ``device`` with random weights (seed 3: norms near 1, the rest std 0.2)."""
    from engine.models.args import ModelArgs
    from engine.models.loader import build_model
    model = build_model(ModelArgs(**ENGINE_ARGS, qkv_bias=qkv_bias), device, dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) + 0.1 * torch.randn(p.shape, generator=g).to(p)
                    if "norm" in name else 0.2 * torch.randn(p.shape, generator=g).to(p))
    return model


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, dst / f.name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Peaky random weights (std 0.1 so greedy has clear winners); norms around 1; biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def make_hf_model(kind: str, tokenizer_dir: Path, out: Path, seed: int = 0, **overrides):
    """kind: llama | qwen2. Returns the HF model (float32, eval) after writing it to ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    vocab = 49152
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **{**TINY, **overrides})
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **{**TINY, **overrides})
    else:
        raise ValueError(kind)
    cfg.eos_token_id = 2
    cfg.bos_token_id = 1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, seed)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copy_tokenizer(tokenizer_dir, out)
    return model


def write_internlm2(llama, out: Path, tokenizer_dir: Path) -> None:
    """Write ``llama``'s weights as an InternLM2 checkpoint (packed wqkv, InternLM2 names)."""
    c = llama.config
    H, KVH = c.num_attention_heads, c.num_key_value_heads
    D = c.hidden_size // H
    g = H // KVH
    sd = llama.state_dict()
    t = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for h in range(KVH):  # per KV head: its g query heads, then its k head, then its v head
            for j in range(g):
                rows.append(q[(h * g + j) * D:(h * g + j + 1) * D])
            rows.append(k[h * D:(h + 1) * D])
            rows.append(v[h * D:(h + 1) * D])
        t[p + "attention.wqkv.weight"] = torch.cat(rows)
        t[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        t[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        t[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        t[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        t[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        t[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": H, "num_key_value_heads": KVH,
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": 10000.0, "bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg))
    copy_tokenizer(tokenizer_dir, out)
