"""The Llama-family decoder (Llama, Mistral-style, Qwen2, InternLM2 share it; adapters map their weights)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fused_decode import MAX_PANEL_TOKENS, MAX_PHASED_TOKENS
from ..layers.attention import Attention, AttentionMetadata, KVCache
from ..layers.linear import CPU_NATIVE_MAX_TOKENS_ONEDNN, FusedLinear, Linear
from ..layers.norm import RMSNorm
from .args import ModelArgs


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool):
        super().__init__()
        self.gate_up = FusedLinear(hidden, [("gate", inter), ("up", inter)], bias=bias)
        self.down = Linear(inter, hidden, bias=bias)
        self.inter = inter
        self.fused = False  # GPU: SiLU(gate) * up in one Triton kernel (kernels/gpu_fused.py), or inside W4A16 down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_of(self.gate_up(x))
        if getattr(self.gate_up, "packed", None) is not None and self.gate_up.packed_for(x) is not None:
            # packed products: [T, 2 * inter] row-major
            gu = self.gate_up(x)
            return self.down(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        gu = self.gate_up.forward_t(x)  # [2 * inter, T]: gate rows then up rows, each slice contiguous
        h = F.silu(gu[:self.inter]) * gu[self.inter:]  # [inter, T]
        return self.down(h.t())

    def down_of(self, gu: torch.Tensor) -> torch.Tensor:
        """GPU: the down projection of SiLU(gate) * up from the fused gate/up output [T, 2 inter]."""
        if hasattr(self.down, "forward_gated"):  # W4A16: the down kernel gates its own input
            return self.down.forward_gated(gu)
        from ..kernels.gpu_fused import silu_mul
        return self.down(silu_mul(gu))


def _normed(linear, x: torch.Tensor, residual: Optional[torch.Tensor], norm: RMSNorm):
    """GPU: (linear(RMSNorm(x + residual)), the residual stream x + residual); without a residual (the first
    layer) RMSNorm(x) and x itself."""
    if hasattr(linear, "forward_normed"):  # W4A16: the product makes its input as it loads x
        return linear.forward_normed(x, residual, norm.weight, norm.eps)
    from ..kernels.gpu_fused import norm_residual
    h, residual = norm_residual(x, residual, norm.weight, norm.eps)
    return linear(h), residual


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.attn = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.qkv_bias, a.o_bias)
        self.post_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)
        self.reduce = None  # tensor parallel: sums the row-parallel (o, down) partial outputs over ranks

    def forward(self, x, meta, k_cache, v_cache):
        a = self.attn(self.input_norm(x), meta, k_cache, v_cache)
        x = x + (a if self.reduce is None else self.reduce(a))
        m = self.mlp(self.post_norm(x))
        return x + (m if self.reduce is None else self.reduce(m))

    def forward_fused(self, x, residual, meta, k_cache, v_cache):
        """GPU path (kernels/gpu_fused.py): the residual stream travels beside x and each residual add is
        fused into the next RMSNorm (W4A16: into the next product, awq_input.py); returns (this layer's MLP
        output, the residual stream before it)."""
        qkv, residual = _normed(self.attn.qkv, x, residual, self.input_norm)
        a = self.attn.attend(qkv, meta, k_cache, v_cache)
        gu, residual = _normed(self.mlp.gate_up, a, residual, self.post_norm)
        return self.mlp.down_of(gu), residual


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = Linear(a.hidden_size, a.vocab_size)
        self.fused_decoder = None  # set by the runner on CPU when the native library is built
        self.gpu_fused = False  # set by use_gpu_fused (GPU, Triton, no tensor parallel)

    def use_gpu_fused(self, rope_in_kernel: bool) -> None:
        """Route layers through the fused Triton kernels; ``rope_in_kernel``: decode steps rotate q/k and
        write the cache in one kernel (power-of-two head_dim halves; dense or int8 / int4 blocks), which also
        attends where the layers' decode_fn is the dense Triton one (set that first)."""
        from ..kernels.paged_attention_triton import triton_decode
        from ..kernels.rope_decode_triton import rope_decode_ok
        self.gpu_fused = True
        for layer in self.layers:
            layer.mlp.fused = True
            layer.attn.fused_rope = rope_in_kernel
            # RoPE, K/V write and attention in one kernel where the attention would be the dense Triton one
            layer.attn.fused_attend = (rope_in_kernel and layer.attn.decode_fn is triton_decode
                                       and rope_decode_ok(self.args.head_dim, 2))

    def fused_ok(self, meta: AttentionMetadata, num_tokens: int, limit: int = 0) -> bool:
        from ..kernels.fused_decode import MAX_TOKENS
        return (self.fused_decoder is not None and meta.num_decode == num_tokens <= (limit or MAX_TOKENS)
                and not meta.prefills)

    def _native_step(self, x: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> Optional[torch.Tensor]:
        """The native CPU paths (kernels/fused_decode.py) for this step, or None for the torch layers."""
        fd = self.fused_decoder
        if fd is None:
            return None
        if fd.panels and self.fused_ok(meta, x.shape[0], MAX_PANEL_TOKENS):
            return fd.run(x.contiguous(), meta, kv)  # whole layers in native code on the panel products
        packed = self.layers[0].attn.qkv.packed is not None  # oneDNN's products (panels took the branch above)
        if self.fused_ok(meta, x.shape[0], CPU_NATIVE_MAX_TOKENS_ONEDNN if packed else 0):
            return fd.run(x.contiguous(), meta, kv)
        if self.fused_ok(meta, x.shape[0], MAX_PHASED_TOKENS) and not packed:
            return fd.run_phased(x.contiguous(), meta, kv)  # MKL's feature-major products
        if meta.spans is not None:
            return fd.run_mixed(x.contiguous(), meta, kv)
        return None

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
                sample_idx: torch.Tensor, head: bool = True) -> torch.Tensor:
        """input_ids: [T] -> logits [len(sample_idx), vocab] (float32); ``head=False`` (CPU): the normed hidden
        states of those rows instead, for the greedy screen (kernels/greedy_head.py)."""
        x = self.embed(input_ids)
        if self.gpu_fused:
            from ..kernels.gpu_fused import add_rmsnorm
            residual = None
            for i, layer in enumerate(self.layers):
                x, residual = layer.forward_fused(x, residual, meta, *kv.layer(i))
            x, _ = add_rmsnorm(x, residual, self.norm.weight, self.norm.eps)
            return self.lm_head(x[sample_idx]).float()
        native = self._native_step(x, meta, kv)
        if native is not None:
            x = native
        else:
            for i, layer in enumerate(self.layers):
                k_cache, v_cache = kv.layer(i)
                x = layer(x, meta, k_cache, v_cache)
        x = self.norm(x[sample_idx])
        return self.lm_head.forward_wide(x).float() if head else x
