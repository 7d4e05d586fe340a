"""A GGUF file's 4-bit linear weights kept 4-bit (EngineConfig.gguf_weights = "native").

llama.cpp's Q4_0 and Q4_1 blocks hold 32 weights of one row as 4-bit codes with a float16 scale d (and, for
Q4_1, a float16 minimum m): w = d * q + m, or d * (q - 8). Q4_K's super-blocks of 256 give each 32 of them a
6-bit scale and minimum under two float16 factors, w = d * s * q - dmin * m. Each is an asymmetric group-32
form with a float minimum, which AutoAWQ's integer zero points cannot hold exactly but the native CPU kernel's (scale, min)
pairs can (kernels/w4_cpu.py). So each decoder layer's q/k/v, o, gate/up and down products run on the file's
own codes, scales and minimums: the same weights that the default path dequantizes to float32 (transformers'
conversion), at about a fifth of the bytes a decode step reads (6 bits a weight: 4 for the code, 2 for the
float32 pair shared by 32).

GGUF architectures "llama" (llama.cpp's converter permutes its q and k rows for its RoPE; undone here as
transformers undoes it) and "qwen2" (rows in Hugging Face's order; its q/k/v biases, float32 in the file,
come from the converted checkpoint). The embedding and the norms come from the converted checkpoint as in
the default path. So does any product with a part in another type (a Q4_K_M file keeps
attn_v and ffn_down of some layers in Q6_K, and llama.cpp falls back to Q5_0 / Q8_0 for rows that are not
whole 256-weight super-blocks): it stays a float32 product, and the native decode layers take each product
in its own layout.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Collection, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

GROUP = 32  # weights per Q4_0 / Q4_1 block and per Q4_K sub-block
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # the block types the 4-bit panels hold exactly
# GGUF architecture -> whether llama.cpp's converter interleaved its q and k rows (for its rotary form; Qwen2's
# files keep Hugging Face's order, as its rotary form there is the one Hugging Face uses)
ARCHITECTURES = {"llama": True, "qwen2": False}
# GGUF name (blk.N.<name>.weight) -> (the module under the decoder layer, its part)
LINEARS: Dict[str, Tuple[str, str]] = {
    "attn_q": ("attn.qkv", "q"), "attn_k": ("attn.qkv", "k"), "attn_v": ("attn.qkv", "v"),
    "attn_output": ("attn.o", ""), "ffn_gate": ("mlp.gate_up", "gate"), "ffn_up": ("mlp.gate_up", "up"),
    "ffn_down": ("mlp.down", ""),
}


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float32."""
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def decode_q4(raw: np.ndarray, qtype: str, in_features: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tensor's rows of Q4_0 / Q4_1 / Q4_K blocks, uint8 [out, bytes per row] -> (codes uint8 [out, in] in
    0..15, scale float32 [out, in/32], minimum float32 [out, in/32]), weight = codes * scale + minimum."""
    if qtype not in Q4_TYPES:
        raise ValueError(f"gguf_weights: native needs Q4_0, Q4_1 or Q4_K linear weights; this file has {qtype}")
    per = 256 if qtype == "Q4_K" else GROUP
    if in_features % per:
        raise ValueError(f"gguf_weights: {in_features} inputs are not a whole number of {per}-weight {qtype} blocks")
    out = raw.shape[0]
    if qtype == "Q4_K":
        return _decode_q4_k(np.ascontiguousarray(raw).reshape(out, in_features // 256, 144), out, in_features)
    head = 2 if qtype == "Q4_0" else 4
    blocks = np.ascontiguousarray(raw).reshape(out, in_features // GROUP, head + 16)
    d = _half(blocks, 0)
    qs = blocks[..., head:]
    # a block's byte j holds weight j in its low nibble and weight j + 16 in its high one
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(out, in_features)
    m = _half(blocks, 2) if qtype == "Q4_1" else -8.0 * d
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def _decode_q4_k(blocks: np.ndarray, out: int, in_features: int):
    """Q4_K super-blocks of 256 weights (144 bytes): float16 d and dmin, 12 bytes of 6-bit scales and minimums
    for 8 sub-blocks of 32, then 128 bytes of codes; weight = d * scale_j * q - dmin * min_j. Each sub-block
    is a group of 32 with an exact float32 (scale, min) pair."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    sm = blocks[..., 4:16]
    scale6, min6 = np.empty(blocks.shape[:2] + (8,), np.uint8), np.empty(blocks.shape[:2] + (8,), np.uint8)
    scale6[..., :4], min6[..., :4] = sm[..., 0:4] & 63, sm[..., 4:8] & 63
    # sub-blocks 4-7: low 4 bits in bytes 8-11, high 2 bits in the top bits of bytes 0-3 (scales) / 4-7 (mins)
    scale6[..., 4:] = (sm[..., 8:12] & 0xF) | ((sm[..., 0:4] >> 6) << 4)
    min6[..., 4:] = (sm[..., 8:12] >> 4) | ((sm[..., 4:8] >> 6) << 4)
    # each 32 bytes of codes hold two sub-blocks: the first in the low nibbles, the next in the high ones
    qs = blocks[..., 16:].reshape(out, -1, 4, 1, 32)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=3).reshape(out, in_features)
    scale = (d[..., None] * scale6).reshape(out, -1)
    minimum = -(dmin[..., None] * min6).reshape(out, -1)
    return torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32)), torch.from_numpy(
        minimum.astype(np.float32))


def unpermute_rows(heads: int, rows: int) -> torch.Tensor:
    """Index of the GGUF row that holds each Hugging Face row of a Llama q or k weight: llama.cpp's converter
    stores each head's two rotary halves interleaved (rows (h, i, half) instead of (h, half, i))."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def gguf_tensors(path: Path) -> Tuple[str, Dict[str, object]]:
    """(the GGUF file's architecture, its tensors by name as gguf-py ReaderTensors); one of ARCHITECTURES."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch not in ARCHITECTURES:
        raise ValueError(f"gguf_weights: native supports GGUF architectures {', '.join(map(repr, ARCHITECTURES))}; "
                         f"{path.name} is {arch!r}")
    return arch, {t.name: t for t in reader.tensors}


def linear_types(tensors: Dict[str, object], num_layers: int, name: str = "model") -> Dict[Tuple[int, str], str]:
    """(layer, GGUF name) -> the block type of each decoder linear (e.g. "Q4_K", "Q6_K", "F16")."""
    types = {}
    for i in range(num_layers):
        for n in LINEARS:
            t = tensors.get(f"blk.{i}.{n}.weight")
            if t is None:
                raise ValueError(f"gguf_weights: {name} has no tensor blk.{i}.{n}.weight")
            types[i, n] = t.tensor_type.name
    return types


def dense_modules(types: Dict[Tuple[int, str], str], name: str = "model") -> Set[Tuple[int, str]]:
    """The (layer, module) products that stay float32: those with any part in a type other than Q4_TYPES (a
    Q4_K_M file's Q6_K attn_v and ffn_down, say); a fused module (q/k/v, gate/up) is one product. A file
    with none left on 4-bit blocks is refused."""
    dense = {(i, LINEARS[n][0]) for (i, n), t in types.items() if t not in Q4_TYPES}
    if len(dense) == len({(i, LINEARS[n][0]) for (i, n) in types}):
        raise ValueError(f"gguf_weights: native needs {', '.join(Q4_TYPES)} linear weights; {name} has "
                         f"{', '.join(sorted(set(types.values())))}: serve it with gguf_weights: dequantize")
    return dense


def read_linears(path: Path, num_layers: int, heads: int, kv_heads: int,
                 dense: Collection[Tuple[int, str]] = (), opened: Optional[Tuple[str, Dict[str, object]]] = None):
    """Yield (layer, GGUF name, (codes, scale, minimum)) for each decoder linear outside ``dense`` modules,
    rows in Hugging Face order. ``opened``: gguf_tensors(path) when the caller has it (gguf-py parses the
    whole file's metadata, the tokenizer's too: about 2 s for SmolLM2's)."""
    arch, tensors = opened or gguf_tensors(path)
    linear_types(tensors, num_layers, path.name)  # every linear is there
    for i in range(num_layers):
        for name, (mod, _) in LINEARS.items():
            if (i, mod) in dense:
                continue
            t = tensors[f"blk.{i}.{name}.weight"]
            try:
                codes, scale, minimum = decode_q4(t.data, t.tensor_type.name, int(t.shape[0]))
            except ValueError as e:  # name the tensor
                raise ValueError(f"{e} ({t.name})") from None
            if ARCHITECTURES[arch] and name in ("attn_q", "attn_k"):
                idx = unpermute_rows(heads if name == "attn_q" else kv_heads, codes.shape[0])
                codes, scale, minimum = codes[idx], scale[idx], minimum[idx]
            yield i, name, (codes, scale, minimum)


def fill_from_gguf(model, path: Path, dense: Collection[Tuple[int, str]] = (),
                   opened: Optional[Tuple[str, Dict[str, object]]] = None) -> int:
    """Give each decoder layer's AwqLinear (built with group size 32, see load_native; ``dense`` modules are
    plain Linear) 4-bit panels made from the GGUF file's own blocks, in place of AutoAWQ's tensors; -> how
    many products."""
    from ..kernels.w4_cpu import W4Panels, available, to_huge_pages
    from ..layers.awq_linear import QUANT_TENSORS
    if not available():
        raise ValueError("gguf_weights: native needs the native 4-bit CPU kernels (AVX-512, or AVX2 and FMA)")
    a = model.args
    parts: Dict[Tuple[int, str], Dict[str, Tuple]] = {}
    for i, name, blocks in read_linears(path, a.num_layers, a.num_heads, a.num_kv_heads, dense, opened):
        mod, part = LINEARS[name]
        parts.setdefault((i, mod), {})[part] = blocks
    made: List = []
    for (i, mod), got in parts.items():
        lin = model.layers[i].get_submodule(mod)
        order = list(lin.offsets) or [""]
        for p in order:
            size = lin.offsets[p][1] if p else lin.out_features
            if tuple(got[p][0].shape) != (size, lin.in_features):
                raise ValueError(f"gguf_weights: layer {i} {mod} {p or 'weight'} is {tuple(got[p][0].shape)} in "
                                 f"the file but {(size, lin.in_features)} in the model")
        codes, scale, minimum = (torch.cat([got[p][k] for p in order]) for k in range(3))
        lin.packed = W4Panels.from_codes(codes.t(), scale.t(), minimum.t())
        for n in QUANT_TENSORS:  # the panels are the weights; AutoAWQ's tensors are never filled
            setattr(lin, n, torch.empty(0, dtype=getattr(lin, n).dtype))
        made.append(lin.packed)
    to_huge_pages(made)
    return len(made)


def load_native(name: Optional[str]):
    """EngineConfig.gguf_weights = "native": the model of a .gguf file (None: the embedded one) with its
    decoder linears on the file's 4-bit blocks and the rest (embedding, norms, any biases) from the converted
    checkpoint, whose float32 copies of those linears are read past; -> (model, converted folder)."""
    from ..default_model import embedded_gguf_path
    from ..layers.awq_linear import AwqLinear
    from .adapters import get_adapter
    from .loader import _iter_tensors, build_model, load_weights, read_model_args, resolve_model_path
    path = embedded_gguf_path() if name is None else Path(name).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"gguf_weights: native needs a .gguf model (or the embedded default); model is {name!r}")
    t0 = time.perf_counter()
    model_dir = resolve_model_path(name)
    args, _ = read_model_args(model_dir)
    opened = gguf_tensors(path)
    types = linear_types(opened[1], args.num_layers, path.name)
    dense = dense_modules(types, path.name)
    net = build_model(args, "cpu", torch.float32, {"group_size": GROUP, "dense": dense})
    n = fill_from_gguf(net, path, dense, opened)
    del opened  # the reader's map of the file
    adapter, modules = get_adapter(args.architecture), dict(net.named_modules())

    def rest():
        for tname, tensor in _iter_tensors(model_dir):
            target = adapter.target(tname)
            if target is not None:
                mod, attr = target[0].rsplit(".", 1)
                if attr == "weight" and isinstance(modules[mod], AwqLinear):
                    continue
            yield tname, tensor

    load_weights(net, model_dir, rest())
    net.eval()
    others = sorted({t for t in types.values() if t not in Q4_TYPES})
    logger.info("loaded %s with %d of %d decoder products on the GGUF's own 4-bit blocks (%s)%s in %.1f s",
                model_dir.name, n, 4 * args.num_layers, path.name,
                f"; {len(dense)} in float32 (their {', '.join(others)} tensors, as converted)" if dense else "",
                time.perf_counter() - t0)
    return net, model_dir
