"""Decoder layers in native code for CPU float32 steps (csrc/cpu_kernels.c).

- ``run``: decode-only steps up to MAX_TOKENS tokens (MAX_PANEL_TOKENS on panel-packed weights); a whole
  layer is one native call (its own skinny or panel products stream the weights). From SPLIT_MIN_ROWS tokens
  a thread, the whole step is one call instead, each thread taking its own share of the sequences.
- ``run_mixed``: any larger step, decode tokens and prefill chunks together. The layers' products (panel or
  oneDNN on packed weights, else MKL) run token-major between three native phases (norm with the residual add;
  rotary + cache write + causal paged attention; SiLU gate), replacing about twenty torch operations per
  layer and the per-sequence attention calls of prefill chunks.
- ``run_phased``: decode-only steps up to MAX_PHASED_TOKENS when the products are MKL's, which runs
  W @ x^T (feature-major) fastest for a few dozen tokens.

Torch reference: ``models.llama.DecoderLayer.forward`` (tests compare them on random models).
"""
from __future__ import annotations

import ctypes
from typing import List, Optional

import torch

from . import cpu_gemm, cpu_native, w4_cpu
from .w4_cpu import W4Panels

MAX_TOKENS = 8  # decode batches up to this size take the fused path (the skinny-matmul regime)
MAX_PANEL_TOKENS = 256  # with panel-packed weights, decode batches up to here take it: one call per layer
MAX_PHASED_TOKENS = 256  # larger decode batches take the phased path up to here
# A panel decode step of at least this many tokens per thread gives each thread its own share of the
# sequences through every layer (no barriers; one thread's attention reads beside another's products): on
# the 2-core EPYC, cap 32 offline 347 -> 363 tok/s, but 8 rows a thread lost (cap 16: 338 -> 321).
SPLIT_MIN_ROWS = 16


class _LayerWeights(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("in_norm", "post_norm", "w_qkv", "b_qkv", "w_o", "b_o",
                                                "w_gu", "b_gu", "w_down", "b_down")] + \
               [("eps", ctypes.c_float)] + [(n, ctypes.c_int) for n in ("H", "NH", "KVH", "D", "I", "panels")] + \
               [(n, ctypes.c_void_p) for n in ("x_qkv", "x_o", "x_gu", "x_down", "s_qkv", "s_o", "s_gu", "s_down")] + \
               [("group", ctypes.c_int)]


# _LayerWeights.panels: the layout of the products' weights (WEIGHTS_* in csrc/cpu_kernels.c)
ROWS, PANELS, W4 = 0, 1, 2  # row-major; cpu_gemm.Panels; w4_cpu.W4Panels (csrc/w4_panels.c)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class FusedDecoder:
    """Holds per-layer weight pointers; ``run`` applies every layer to x [M, hidden] in place."""

    def __init__(self, model, so: ctypes.CDLL):
        a = model.args
        self.so, self.a, self.model = so, a, model
        lins = [lin for layer in model.layers for lin in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)]
        floats = [lin for lin in lins if not isinstance(lin.packed, W4Panels)]
        # the products' layout: the 4-bit panels of W4A16 layers (w4_cpu.py); else that of the float32 ones
        # (beside any 4-bit ones: a GGUF file's Q6_K products, say), panels when they were packed for them
        # (cpu_gemm's native backend)
        self.panels = (W4 if not floats
                       else PANELS if all(isinstance(lin.packed, cpu_gemm.Panels) for lin in floats) else ROWS)
        group = next((lin.packed.group_size for lin in lins if isinstance(lin.packed, W4Panels)), 0)
        self.structs: List[_LayerWeights] = []
        for layer in model.layers:
            at, mlp = layer.attn, layer.mlp
            ptrs = [self._pointers(lin) for lin in (at.qkv, at.o, mlp.gate_up, mlp.down)]  # (weights, x3, pairs)
            self.structs.append(_LayerWeights(
                _ptr(layer.input_norm.weight), _ptr(layer.post_norm.weight), ptrs[0][0], _ptr(at.qkv.bias),
                ptrs[1][0], _ptr(at.o.bias), ptrs[2][0], _ptr(mlp.gate_up.bias),
                ptrs[3][0], _ptr(mlp.down.bias), layer.input_norm.eps,
                a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size, self.panels,
                *(p[1] for p in ptrs), *(p[2] for p in ptrs), group))
        self.layer_array = (_LayerWeights * len(self.structs))(*self.structs)  # for decode_layers_split
        self.scale = a.head_dim ** -0.5
        self.per_token = a.hidden_size + (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + \
            a.num_heads * a.head_dim + 3 * a.intermediate_size

    def _pointers(self, lin):
        """A product's (weights, bf16x3 copy or None, (scale, min) pairs or None) in its layout; the bf16x3
        copies exist under matmul_precision="high" (AMX): products of x3_min_rows()+ rows run on them."""
        if isinstance(lin.packed, W4Panels):
            return lin.packed.codes.data_ptr(), None, lin.packed.pairs.data_ptr()
        if self.panels == PANELS:
            return lin.packed.data.data_ptr(), _ptr(lin.packed.x3.data if lin.packed.x3 is not None else None), None
        return lin.weight.data_ptr(), None, None

    def run(self, x: torch.Tensor, meta, kv) -> torch.Tensor:
        M = x.shape[0]
        blocks, offsets, cos, sin = _slots_and_rotary(meta)
        bt, ctx = _i32(meta.decode_block_tables), _i32(meta.decode_ctx_lens)
        scratch, threads = torch.empty(M * self.per_token, dtype=torch.float32), torch.get_num_threads()
        rotary = (cos.data_ptr(), sin.data_ptr())
        rows = (blocks.data_ptr(), offsets.data_ptr(), bt.data_ptr(), ctx.data_ptr(), bt.shape[1], M, kv.block_size,
                self.scale)
        xp, bits = x.data_ptr(), kv.native_bits  # int8 / int4 blocks: written and read quantized
        if self.splits(M, threads):
            ks, vs, kps, vps = kv.pointer_arrays
            self.so.decode_layers_split(xp, self.layer_array, len(self.structs), *rotary, ks.data_ptr(), vs.data_ptr(),
                                        *rows, scratch.data_ptr(), self.per_token, threads, kps.data_ptr(),
                                        vps.data_ptr(), bits)
            return x
        for w, (k, v), (kp, vp) in zip(self.structs, kv.pointers, kv.param_pointers):
            self.so.decode_layer(xp, ctypes.byref(w), *rotary, k, v, *rows, scratch.data_ptr(), threads, kp, vp, bits)
        return x

    def splits(self, M: int, threads: int) -> bool:
        """Whether a decode step of M tokens splits its sequences between the threads (decode_layers_split):
        on panel products (float32; not the bf16x3 copies, untried there) with SPLIT_MIN_ROWS rows a thread."""
        return self.panels != ROWS and threads > 1 and M >= SPLIT_MIN_ROWS * threads and self.structs[0].x_qkv is None


    def run_mixed(self, x: torch.Tensor, meta, kv) -> torch.Tensor:
        """The layers for any step larger than MAX_TOKENS: token-major products between native phases."""
        a, so = self.a, self.so
        T, H, I, D = x.shape[0], a.hidden_size, a.intermediate_size, a.head_dim
        NH, KVH = a.num_heads, a.num_kv_heads
        blocks, offsets, cos, sin = _slots_and_rotary(meta)
        spans, bt = meta.spans, meta.span_block_tables
        h, act = torch.empty(T, H), torch.empty(T, I)
        threads = torch.get_num_threads()
        # elementwise phases: one thread for a few dozen rows (see run_phased), all of them for prefills
        ew = 1 if T <= 64 else threads
        p = lambda t: t.data_ptr()  # noqa: E731
        add = None
        for i, layer in enumerate(self.model.layers):
            at, mlp = layer.attn, layer.mlp
            so.tm_add_norm(p(x), add, p(layer.input_norm.weight), p(h), T, H, layer.input_norm.eps, ew)
            qkv = at.qkv(h).contiguous()
            att = torch.empty(T, NH * D)
            (k_cache, v_cache), (k_params, v_params) = kv.pointers[i], kv.param_pointers[i]
            so.tm_attention(p(qkv), p(cos), p(sin), k_cache, v_cache, p(blocks), p(offsets), p(spans), p(bt),
                            spans.shape[0], bt.shape[1], T, NH, KVH, D, kv.block_size, self.scale, p(att), threads,
                            k_params, v_params, kv.native_bits)
            o = at.o(att).contiguous()
            so.tm_add_norm(p(x), p(o), p(layer.post_norm.weight), p(h), T, H, layer.post_norm.eps, ew)
            gu = mlp.gate_up(h).contiguous()
            so.tm_silu_mul(p(gu), p(act), T, I, ew)
            down = mlp.down(act).contiguous()
            add = p(down)
        x.add_(down)
        return x

    def run_phased(self, x: torch.Tensor, meta, kv) -> torch.Tensor:
        """The same layers for MAX_TOKENS < M <= MAX_PHASED_TOKENS: MKL products between native phases."""
        a, so = self.a, self.so
        M, H, I, D = x.shape[0], a.hidden_size, a.intermediate_size, a.head_dim
        NH, KVH = a.num_heads, a.num_kv_heads
        QKV = (NH + 2 * KVH) * D
        blocks, offsets, cos, sin = _slots_and_rotary(meta)
        bt, ctx = _i32(meta.decode_block_tables), _i32(meta.decode_ctx_lens)
        e = lambda *shape: torch.empty(*shape, dtype=torch.float32)  # noqa: E731
        h, qkv_t, qkv, att, o_t = e(M, H), e(QKV, M), e(M, QKV), e(M, NH * D), e(H, M)
        gu_t, act_t, down_t = e(2 * I, M), e(I, M), e(H, M)
        # The norms and the gate are microseconds of work: one thread, so that a busy host (HTTP proxies
        # beside the engine) cannot stall them at a barrier waiting for a descheduled second thread.
        threads = torch.get_num_threads()
        p = lambda t: t.data_ptr()  # noqa: E731
        add = None
        for i, layer in enumerate(self.model.layers):
            at, mlp = layer.attn, layer.mlp
            so.hy_add_norm(p(x), add, p(layer.input_norm.weight), p(h), M, H, layer.input_norm.eps, 1)
            _mm(at.qkv, h.t(), qkv_t)
            (k_cache, v_cache), (k_params, v_params) = kv.pointers[i], kv.param_pointers[i]
            so.hy_attention(p(qkv_t), p(qkv), p(cos), p(sin), k_cache, v_cache, p(blocks), p(offsets), p(bt),
                            p(ctx), bt.shape[1], M, NH, KVH, D, kv.block_size, self.scale, p(att), threads,
                            k_params, v_params, kv.native_bits)
            _mm(at.o, att.t(), o_t)
            so.hy_add_norm(p(x), p(o_t), p(layer.post_norm.weight), p(h), M, H, layer.post_norm.eps, 1)
            _mm(mlp.gate_up, h.t(), gu_t)
            so.hy_silu_mul(p(gu_t), p(act_t), M, I, 1)
            _mm(mlp.down, act_t, down_t)
            add = p(down_t)
        x.add_(down_t.t())
        return x


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def _slots_and_rotary(meta):
    """What every native path reads per token: cache slot (block, offset) as int32, cos and sin as float32."""
    return _i32(meta.slot_blocks), _i32(meta.slot_offsets), meta.cos.float().contiguous(), meta.sin.float().contiguous()


def _mm(linear, rhs: torch.Tensor, out: torch.Tensor) -> None:
    """out [N, M] = W @ rhs (+ b): the weight-major product MKL runs fastest for a few dozen tokens."""
    if isinstance(linear.packed, W4Panels):  # 4-bit panels beside float32 weights in MKL's layout
        out.copy_(w4_cpu.linear(rhs.t().contiguous(), linear.packed, linear.bias).t())
    elif linear.packed is not None:  # packed products are token-major; the transposing copy is ~1% of it
        out.copy_(cpu_gemm.linear(rhs.t().contiguous(), linear.packed, linear.bias).t())
    elif linear.bias is None:
        torch.mm(linear.weight, rhs, out=out)
    else:
        torch.addmm(linear.bias[:, None], linear.weight, rhs, out=out)


def fused_decoder_for(model, dtype: torch.dtype) -> Optional[FusedDecoder]:
    """A FusedDecoder when the native library is built and the model fits its assumptions, else None."""
    so = cpu_native.lib()
    a = model.args
    if any(not hasattr(lin, "weight") and not isinstance(getattr(lin, "packed", None), W4Panels)
           for layer in model.layers for lin in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)):
        return None  # quantized (AWQ) layers without the native 4-bit panels: the per-layer path dequantizes them
    if (so is None or dtype != torch.float32 or a.num_heads // a.num_kv_heads > cpu_native.MAX_GROUP
            or a.head_dim % 2 or any(not p.is_contiguous() for p in model.parameters())):
        return None
    return FusedDecoder(model, so)
