"""Quantization building blocks on tiny random models, against Hugging Face transformers and hand formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from quant_jobs.awq_search import SearchSettings, apply_scales, search_layer
from quant_jobs.calibrate import calibrate_shard, finalize
from quant_jobs.dense import layer_forward, logits, rotary_for
from quant_jobs.jobs import kv_params, rank_heads
from quant_jobs.model_io import load_full, load_layer
from quant_jobs.quantize import fake_quant
from tiny_models import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    out = tmp_path_factory.mktemp("tiny-llama")
    hf = make_hf_model("llama", smol_dir, out, seed=3, num_key_value_heads=4, num_hidden_layers=3)
    return out, hf


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_forward_matches_transformers(kind, tmp_path, smol_dir):
    hf = make_hf_model(kind, smol_dir, tmp_path / kind, seed=5)
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = logits(load_full(str(tmp_path / kind)), ids)
    with torch.no_grad():
        ref = hf(ids).logits
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_calibration_statistics_match_transformers_activations(tiny):
    path, hf = tiny
    ids = torch.randint(0, 49152, (3, 32), generator=torch.Generator().manual_seed(1))
    acc, inputs = calibrate_shard(str(path), ids, capture=True)
    st = finalize(acc)
    seen = {}
    hooks = [hf.model.layers[1].self_attn.q_proj.register_forward_hook(
                 lambda m, a, o: seen.setdefault("qkv", []).append(a[0])),
             hf.model.layers[1].mlp.down_proj.register_forward_hook(
                 lambda m, a, o: seen.setdefault("down", []).append(a[0]))]
    keys = []
    with torch.no_grad():
        for row in ids:  # one sample at a time, as calibration runs
            out = hf(row[None], use_cache=True, output_hidden_states=True)
            keys.append(out.past_key_values.layers[1].keys[0].transpose(0, 1))  # [T, kv_heads, D], post-RoPE
            seen.setdefault("in1", []).append(out.hidden_states[1])
    for h in hooks:
        h.remove()
    qkv_in = torch.cat(seen["qkv"]).reshape(-1, 64)
    down_in = torch.cat(seen["down"]).reshape(-1, 128)
    k = torch.cat(keys)
    assert torch.allclose(st["layers.1.attn.qkv.input.max"], qkv_in.amax(0), atol=1e-5)
    assert torch.allclose(st["layers.1.attn.qkv.input.absmean"], qkv_in.abs().mean(0), atol=1e-5)
    assert torch.allclose(st["layers.1.mlp.down.input.min"], down_in.amin(0), atol=1e-5)
    assert torch.allclose(st["layers.1.mlp.down.input.mean"], down_in.mean(0), atol=1e-5)
    assert torch.allclose(st["layers.1.attn.k.max"], k.amax(0), atol=1e-5)
    assert torch.allclose(st["layers.1.attn.k.absmax"], k.abs().amax(0), atol=1e-5)
    assert torch.allclose(inputs[1], torch.cat(seen["in1"]), atol=1e-5)  # the captured input of layer 1


def test_awq_scales_keep_the_function_and_beat_round_to_nearest(tiny):
    path, _ = tiny
    ids = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(2))
    _, inputs = calibrate_shard(str(path), ids, capture=True)
    x = inputs[1]
    layer, args = load_layer(str(path), 1)
    cos, sin = rotary_for(args, x.shape[1])
    ref = layer_forward(layer, x, cos, sin)
    s = SearchSettings(group_size=32, clip=False)
    result, _ = search_layer(layer, x, cos, sin, s)
    assert set(result) == {"scale.qkv", "scale.o", "scale.gate_up", "scale.down"}  # MHA: o shares v's scale
    assert torch.allclose(layer_forward(layer, x, cos, sin), ref, atol=1e-4)  # scaling alone is exact

    def quantized_error(lyr):
        for lin in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
            w = lyr.get_submodule(lin).weight
            w.data.copy_(fake_quant(w.data, 4, 32))
        return (layer_forward(lyr, x, cos, sin) - ref).pow(2).mean().item()

    rtn_layer, _ = load_layer(str(path), 1)
    assert quantized_error(layer) < quantized_error(rtn_layer)


def test_apply_scales_is_the_documented_transform(tiny):
    path, _ = tiny
    layer, _ = load_layer(str(path), 0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    sc = torch.linspace(0.5, 2.0, 64)
    apply_scales(layer, {"scale.qkv": sc})
    assert torch.allclose(layer.input_norm.weight, before["input_norm.weight"] / sc)
    assert torch.allclose(layer.attn.qkv.weight, before["attn.qkv.weight"] * sc[None, :])
    assert torch.equal(layer.attn.o.weight, before["attn.o.weight"])


def test_kv_qparams_formulas():
    stats = {"layers.0.attn.k.max": torch.tensor([[1.0, 3.0], [0.5, 0.25]]),
             "layers.0.attn.k.min": torch.tensor([[-2.0, 0.0], [-0.5, -1.5]]),
             "layers.0.attn.k.absmax": torch.tensor([[2.0, 3.0], [0.5, 1.5]])}
    for k in list(stats):
        stats[k.replace(".k.", ".v.")] = stats[k] * 2
    asym = kv_params(stats, 1, 8, sym=False)
    # head 0: max 3, min -2 -> scale 5/255, zp 0.5; head 1: max 0.5, min -1.5 -> scale 2/255, zp -0.5
    assert torch.allclose(asym["k_scale"], torch.tensor([[5 / 255, 2 / 255]]))
    assert torch.allclose(asym["k_zp"], torch.tensor([[0.5, -0.5]]))
    assert torch.allclose(asym["v_scale"], torch.tensor([[10 / 255, 4 / 255]]))
    sym = kv_params(stats, 1, 4, sym=True)
    assert torch.allclose(sym["k_scale"], torch.tensor([[3 / 7, 1.5 / 7]])) and not sym["k_zp"].any()
    assert rank_heads(4, 2, 1) == [2, 3] and rank_heads(2, 4, 3) == [1]


def test_perplexity_matches_transformers(tiny, tmp_path):
    from quant_jobs.ppl import perplexity
    path, hf = tiny
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(4))
    ours = perplexity(load_full(str(path)), windows)["ppl"]
    with torch.no_grad():
        lg = hf(windows).logits
    nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(ours, math.exp(nll.item()), rel_tol=1e-4)
