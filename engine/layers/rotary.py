"""Rotary position embedding: default, linear, llama3 and dynamic-NTK scaling."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # float32 arithmetic, as Hugging Face computes it, so positions rotate identically
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    ramp = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short waves
    return inv_freq / factor * (1 - ramp) + inv_freq * ramp


class RotaryEmbedding:
    """Computes cos/sin per token; not an nn.Module because it holds no weights."""

    def __init__(self, head_dim: int, theta: float, max_position: int, scaling: Optional[Dict[str, Any]] = None,
                 dynamic_factor: float = 0.0, device: str = "cpu"):
        scaling = dict(scaling or {})
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        self.head_dim, self.theta, self.max_position = head_dim, theta, max_position
        inv = base_inv_freq(head_dim, theta)
        if rope_type == "linear":
            inv = inv / scaling["factor"]
        elif rope_type == "llama3":
            inv = llama3_inv_freq(inv, scaling)
        elif rope_type == "dynamic" and not dynamic_factor:
            dynamic_factor = scaling.get("factor", 1.0)
        self.dynamic_factor = dynamic_factor
        self.device = device
        self.inv_freq = inv.float().to(device)  # [head_dim/2]

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Per-token inv_freq for dynamic NTK: the base grows with the sequence's length."""
        f, d, m = self.dynamic_factor, self.head_dim, self.max_position
        lens = seq_lens.double().clamp(min=m)
        base = self.theta * ((f * lens / m) - (f - 1)) ** (d / (d - 2))  # [T]
        exps = torch.arange(0, d, 2, dtype=torch.float64, device=seq_lens.device) / d
        return (1.0 / base[:, None] ** exps[None, :]).float()  # [T, head_dim/2]

    def cos_sin(self, positions: torch.Tensor, seq_lens: Optional[torch.Tensor] = None):
        """positions: [T] -> cos, sin: [T, head_dim] (float32)."""
        if self.dynamic_factor and seq_lens is not None and bool((seq_lens > self.max_position).any()):
            freqs = positions.float()[:, None] * self._dynamic_inv_freq(seq_lens)
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]. Rotate-half convention (HF Llama)."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
