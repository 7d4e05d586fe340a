"""AWQ search for one decoder layer: activation-aware scales per group, then weight clipping.

Groups that share a scale (the previous op absorbs 1/s, the linears take s on their input channels):
qkv with the input norm; o with v (only when v's output feeds o one to one, i.e. no grouped-query
attention); gate/up with the post-attention norm; down with up. Each group's loss is the MSE of the
inspected module's output (attention, o, MLP, down) against full precision, over a grid of ratios.

Result keys (the artifact saved per layer): ``scale.{qkv,o,gate_up,down}`` [in_features] and
``clip.{attn.qkv.v,attn.o,mlp.gate_up,mlp.down}`` [rows, groups] (the clamp bound per row and group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .dense import attn_forward, mlp_forward
from .quantize import fake_quant


@dataclass(frozen=True)
class SearchSettings:
    bits: int = 4
    group_size: int = 128
    search_scale: bool = True
    clip: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_rows: int = 64  # output rows scored at once in the clip search (bounds memory)


def _linear(x, w, b):
    return F.linear(x, w, b)


def search_scale(x: torch.Tensor, weights: List[torch.Tensor], run: Callable, ref: torch.Tensor,
                 s: SearchSettings) -> Tuple[torch.Tensor, float]:
    """Grid over ratio r: scales = mean|x|^r, normalised; keep the one with the lowest output MSE."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    best, best_loss, best_r = None, float("inf"), -1.0
    for k in range(s.n_grid):
        r = k / s.n_grid
        sc = x_mean.pow(r).clamp(min=1e-4)
        sc = sc / (sc.max() * sc.min()).sqrt()
        cand = [(fake_quant(w * sc.to(w.dtype), s.bits, s.group_size) / sc.to(w.dtype)) for w in weights]
        loss = (ref - run(cand)).float().pow(2).mean().item()
        if loss < best_loss:
            best, best_loss, best_r = sc.clone(), loss, r
    if best is None:  # every candidate gave NaN: keep the weights as they are
        best = torch.ones_like(x_mean)
    return best, best_r


def search_clip(w: torch.Tensor, x: torch.Tensor, s: SearchSettings) -> torch.Tensor:
    """Per (row, group) clamp bound that minimises the group's partial output error -> [rows, groups]."""
    rows, cols = w.shape
    G = s.group_size
    x = x.reshape(-1, cols)
    x = x[0::max(1, x.shape[0] // s.clip_tokens)][:s.clip_tokens].float()
    xg = x.reshape(1, x.shape[0], cols // G, G)
    best_all = []
    for r0 in range(0, rows, s.clip_rows):
        wb = w[r0:r0 + s.clip_rows].float().reshape(-1, 1, cols // G, G)
        org_out = (xg * wb).sum(-1)  # [rb, tokens, groups]
        org_max = wb.abs().amax(-1, keepdim=True)  # [rb, 1, groups, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(s.max_shrink * s.n_grid)):
            mx = org_max * (1 - i / s.n_grid)
            cur = torch.clamp(wb, -mx, mx)
            q = fake_quant(cur.reshape(cur.shape[0], cols), s.bits, G).reshape(cur.shape)
            err = ((xg * q).sum(-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = mx[better]
        best_all.append(best_max.reshape(-1, cols // G))
    return torch.cat(best_all).to(w.dtype)


def o_shares_v(layer) -> bool:
    a = layer.attn
    return a.qkv.offsets["v"][1] == a.o.in_features


@torch.no_grad()
def search_layer(layer, x: torch.Tensor, cos, sin, s: SearchSettings) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Searches on ``layer`` (left with the scales and clips applied) -> (result tensors, chosen ratios)."""
    a, m = layer.attn, layer.mlp
    h = layer.input_norm(x)
    out_attn, ctx = attn_forward(a, h, cos, sin)
    h2 = layer.post_norm(x + out_attn)
    out_mlp, act = mlp_forward(m, h2)
    groups = [("qkv", h, [a.qkv.weight], lambda w: attn_forward(a, h, cos, sin, w_qkv=w[0])[0], out_attn)]
    if o_shares_v(layer):
        groups.append(("o", ctx, [a.o.weight], lambda w: _linear(ctx, w[0], a.o.bias), None))
    groups.append(("gate_up", h2, [m.gate_up.weight], lambda w: mlp_forward(m, h2, w_gate_up=w[0])[0], out_mlp))
    groups.append(("down", act, [m.down.weight], lambda w: _linear(act, w[0], m.down.bias), None))
    result: Dict[str, torch.Tensor] = {}
    ratios: Dict[str, float] = {}
    inputs = {"qkv": h, "o": ctx, "gate_up": h2, "down": act}
    if s.search_scale:
        for name, inp, ws, run, ref in groups:
            ref = run(ws) if ref is None else ref
            result[f"scale.{name}"], ratios[name] = search_scale(inp, ws, run, ref, s)
        apply_scales(layer, result)
    if s.clip:
        for lin, group, rows in clip_targets(layer):
            sc = result.get(f"scale.{group}")
            inp = inputs[group] if sc is None else inputs[group] / sc.to(inputs[group].dtype)
            w = dict(layer.named_modules())[lin].weight
            r0, n = rows
            result[f"clip.{lin}{'.v' if lin == 'attn.qkv' else ''}"] = search_clip(w[r0:r0 + n], inp, s)
        apply_clips(layer, result)
    return {k: v.float().contiguous().cpu() for k, v in result.items()}, ratios


def clip_targets(layer) -> List[Tuple[str, str, Tuple[int, int]]]:
    """(linear, its scale group, (first row, rows)); q and k are never clipped (attention scores are fragile)."""
    a, m = layer.attn, layer.mlp
    return [("attn.qkv", "qkv", a.qkv.offsets["v"]), ("attn.o", "o", (0, a.o.out_features)),
            ("mlp.gate_up", "gate_up", (0, m.gate_up.out_features)), ("mlp.down", "down", (0, m.down.out_features))]


@torch.no_grad()
def apply_scales(layer, result: Dict[str, torch.Tensor]) -> None:
    a, m = layer.attn, layer.mlp

    def rows_div(mod, part, sc):
        r0, n = mod.offsets[part]
        mod.weight.data[r0:r0 + n] /= sc[:, None]
        if mod.bias is not None:
            mod.bias.data[r0:r0 + n] /= sc

    for name, sc in result.items():
        if not name.startswith("scale."):
            continue
        group = name[len("scale."):]
        sc = sc.to(a.qkv.weight.dtype).to(a.qkv.weight.device)
        if group == "qkv":
            layer.input_norm.weight.data /= sc
            a.qkv.weight.data *= sc[None, :]
        elif group == "o":
            rows_div(a.qkv, "v", sc)
            a.o.weight.data *= sc[None, :]
        elif group == "gate_up":
            layer.post_norm.weight.data /= sc
            m.gate_up.weight.data *= sc[None, :]
        elif group == "down":
            rows_div(m.gate_up, "up", sc)
            m.down.weight.data *= sc[None, :]


@torch.no_grad()
def apply_clips(layer, result: Dict[str, torch.Tensor]) -> None:
    mods = dict(layer.named_modules())
    for lin, _, (r0, n) in clip_targets(layer):
        key = f"clip.{lin}{'.v' if lin == 'attn.qkv' else ''}"
        if key not in result:
            continue
        w = mods[lin].weight.data[r0:r0 + n]
        mx = result[key].to(w.dtype).to(w.device)
        G = w.shape[1] // mx.shape[1]
        g = w.reshape(n, -1, G)
        w.copy_(torch.clamp(g, -mx[..., None], mx[..., None]).reshape(n, -1))


def apply_result(layer, result: Dict[str, torch.Tensor]) -> None:
    apply_scales(layer, result)
    apply_clips(layer, result)
