"""Dense (unpaged) forward of the engine's decoder layers for calibration, AWQ search and perplexity.

Every piece takes optional replacement weights, so a search can score a candidate without touching the
module. Shapes: x [B, T, hidden]; cos/sin [T, head_dim].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.models.llama import DecoderLayer, LlamaModel


def rotary_for(model_args, seqlen: int, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    a = model_args
    rope = RotaryEmbedding(a.head_dim, a.rope_theta, a.max_position_embeddings, a.rope_scaling, device=str(device))
    return rope.cos_sin(torch.arange(seqlen, device=device))


def _lin(x, w, b):
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def qkv_states(attn, h, cos, sin, w_qkv: Optional[torch.Tensor] = None):
    """-> q [B, T, heads, D], k and v [B, T, kv_heads, D]; q and k rotated."""
    B, T, _ = h.shape
    D = attn.head_dim
    qkv = _lin(h, attn.qkv.weight if w_qkv is None else w_qkv, attn.qkv.bias)
    q, k, v = attn.qkv.split(qkv)
    q = q.reshape(B * T, attn.num_heads, D)
    k = k.reshape(B * T, attn.num_kv_heads, D)
    c, s = cos.repeat(B, 1), sin.repeat(B, 1)
    q = apply_rotary(q, c, s).view(B, T, attn.num_heads, D)
    k = apply_rotary(k, c, s).view(B, T, attn.num_kv_heads, D)
    return q, k, v.reshape(B, T, attn.num_kv_heads, D)


def attention_context(attn, q, k, v) -> torch.Tensor:
    """Causal attention -> [B, T, heads * D] (the input of o)."""
    rep = attn.num_heads // attn.num_kv_heads
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    ctx = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=attn.scale)
    B, H, T, D = ctx.shape
    return ctx.transpose(1, 2).reshape(B, T, H * D)


def attn_forward(attn, h, cos, sin, w_qkv=None, w_o=None, want_kv: bool = False):
    """-> (output, context) or (output, context, k, v)."""
    q, k, v = qkv_states(attn, h, cos, sin, w_qkv)
    ctx = attention_context(attn, q, k, v)
    out = _lin(ctx, attn.o.weight if w_o is None else w_o, attn.o.bias)
    return (out, ctx, k, v) if want_kv else (out, ctx)


def mlp_forward(mlp, h, w_gate_up=None, w_down=None):
    """-> (output, act) where act = silu(gate) * up is the input of down."""
    gu = _lin(h, mlp.gate_up.weight if w_gate_up is None else w_gate_up, mlp.gate_up.bias)
    gate, up = gu[..., :mlp.inter], gu[..., mlp.inter:]
    act = F.silu(gate) * up
    return _lin(act, mlp.down.weight if w_down is None else w_down, mlp.down.bias), act


def layer_forward(layer: DecoderLayer, x, cos, sin, record=None):
    """One decoder layer. ``record(name, tensor)`` sees every linear's input and K/V (post-RoPE) when given."""
    h = layer.input_norm(x)
    out, ctx, k, v = attn_forward(layer.attn, h, cos, sin, want_kv=True)
    x = x + out
    h2 = layer.post_norm(x)
    mout, act = mlp_forward(layer.mlp, h2)
    if record is not None:
        record("attn.qkv", h)
        record("attn.o", ctx)
        record("mlp.gate_up", h2)
        record("mlp.down", act)
        record("k", k)
        record("v", v)
    return x + mout


@torch.no_grad()
def logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, vocab] (float32)."""
    cos, sin = rotary_for(model.args, ids.shape[1], ids.device)
    x = model.embed(ids)
    for layer in model.layers:
        x = layer_forward(layer, x, cos, sin)
    return F.linear(model.norm(x), model.lm_head.weight).float()
