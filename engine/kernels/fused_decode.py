"""Whole decoder layers in one native call for small decode-only CPU steps (csrc/cpu_kernels.c).

Torch reference: ``models.llama.DecoderLayer.forward`` (tests compare the two on random models).
"""
from __future__ import annotations

import ctypes
from typing import List, Optional

import torch

from . import cpu_native

MAX_TOKENS = 8  # decode batches up to this size take the fused path (the skinny-matmul regime)


class _LayerWeights(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("in_norm", "post_norm", "w_qkv", "b_qkv", "w_o", "b_o",
                                                "w_gu", "b_gu", "w_down", "b_down")] + \
               [("eps", ctypes.c_float)] + [(n, ctypes.c_int) for n in ("H", "NH", "KVH", "D", "I")]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class FusedDecoder:
    """Holds per-layer weight pointers; ``run`` applies every layer to x [M, hidden] in place."""

    def __init__(self, model, so: ctypes.CDLL):
        a = model.args
        self.so, self.a = so, a
        self.structs: List[_LayerWeights] = []
        for layer in model.layers:
            at, mlp = layer.attn, layer.mlp
            self.structs.append(_LayerWeights(
                _ptr(layer.input_norm.weight), _ptr(layer.post_norm.weight), _ptr(at.qkv.weight), _ptr(at.qkv.bias),
                _ptr(at.o.weight), _ptr(at.o.bias), _ptr(mlp.gate_up.weight), _ptr(mlp.gate_up.bias),
                _ptr(mlp.down.weight), _ptr(mlp.down.bias), layer.input_norm.eps,
                a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size))
        self.scale = a.head_dim ** -0.5
        self.per_token = a.hidden_size + (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + \
            a.num_heads * a.head_dim + 3 * a.intermediate_size

    def run(self, x: torch.Tensor, meta, kv) -> torch.Tensor:
        M = x.shape[0]
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        blocks, offsets = i32(meta.slot_blocks), i32(meta.slot_offsets)
        bt, ctx = i32(meta.decode_block_tables), i32(meta.decode_ctx_lens)
        cos, sin = meta.cos.float().contiguous(), meta.sin.float().contiguous()
        scratch = torch.empty(M * self.per_token, dtype=torch.float32)
        threads = torch.get_num_threads()
        for i, w in enumerate(self.structs):
            k_cache, v_cache = kv.layer(i)
            self.so.decode_layer(x.data_ptr(), ctypes.byref(w), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                 v_cache.data_ptr(), blocks.data_ptr(), offsets.data_ptr(), bt.data_ptr(),
                                 ctx.data_ptr(), bt.shape[1], M, kv.block_size, self.scale, scratch.data_ptr(),
                                 threads)
        return x


def fused_decoder_for(model, dtype: torch.dtype) -> Optional[FusedDecoder]:
    """A FusedDecoder when the native library is built and the model fits its assumptions, else None."""
    so = cpu_native.lib()
    a = model.args
    if any(not hasattr(layer.attn.qkv, "weight") for layer in model.layers):
        return None  # quantized (AWQ) layers: the per-layer path dequantizes them
    if (so is None or dtype != torch.float32 or a.num_heads // a.num_kv_heads > cpu_native.MAX_GROUP
            or a.head_dim % 2 or any(not p.is_contiguous() for p in model.parameters())):
        return None
    return FusedDecoder(model, so)
