"""Static per-head KV parameters (``kv_qparams``, from `python -m quant_jobs kv_qparams`): loading them, the
cache's writers using them (torch, the native CPU layers) against the quantization formula applied to the
unquantized cache's own values, and the engine's configuration and errors. The GPU's write kernel with them:
tests/test_gpu_fused.py."""
import pytest
import torch
from safetensors.torch import save_file

from engine.core.messages import ScheduledSeq, SchedulerOutput
from engine.layers.kv_quant import QuantKV, load_kv_qparams, packed_dim, quantize_with
from tiny_models import engine_model



def write_qparams(path, ranges, bits=(8, 4), sym=False):
    """ranges {"k"/"v": (min, max)} each [layers, heads] -> a file in the kv_qparams job's format (zp the
    middle of the range, scale the range over 2^bits - 1)."""
    t = {}
    for b in bits:
        for kind, (mn, mx) in ranges.items():
            t[f"int{b}.{kind}_scale"] = (mx - mn) / (2 ** b - 1)
            t[f"int{b}.{kind}_zp"] = (mx + mn) / 2
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return path


def test_load_turns_the_jobs_zero_points_into_the_caches_minimums(tmp_path):
    mn, mx = torch.tensor([[-1.0, -2.0], [0.5, -4.0]]), torch.tensor([[3.0, 2.0], [1.5, 4.0]])
    f = write_qparams(tmp_path / "kv_qparams.safetensors", {"k": (mn, mx), "v": (2 * mn, 2 * mx)})
    p = load_kv_qparams(str(tmp_path), 8, 2, 2)  # the folder finds the file
    assert p.shape == (2, 2, 2, 2)
    assert torch.allclose(p[:, 0, :, 0], (mx - mn) / 255) and torch.allclose(p[:, 0, :, 1], mn, atol=1e-6)
    assert torch.allclose(p[:, 1, :, 1], 2 * mn, atol=1e-6)
    p4 = load_kv_qparams(str(f), 4, 2, 2, heads=[1])  # a tensor-parallel rank's head
    assert p4.shape == (2, 2, 1, 2) and torch.allclose(p4[:, 0, 0, 0], (mx - mn)[:, 1] / 15)
    with pytest.raises(ValueError, match="2 layers of 3 KV heads"):
        load_kv_qparams(str(f), 8, 2, 3)
    with pytest.raises(ValueError, match="not a kv_qparams.safetensors"):
        load_kv_qparams(str(tmp_path / "nowhere"), 8, 2, 2)
    write_qparams(tmp_path / "only8.safetensors", {"k": (mn, mx), "v": (mn, mx)}, bits=(8,))
    with pytest.raises(ValueError, match="no int4.k_scale"):
        load_kv_qparams(str(tmp_path / "only8.safetensors"), 4, 2, 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_static_write_puts_codes_by_the_slots_own_parameters(bits):
    """QuantKV.write with static pairs: codes round((x - min) / scale) clamped to the range, by hand per head;
    the pairs stay as they were."""
    g = torch.Generator().manual_seed(1)
    KVH, D, nb, bs = 2, 8, 3, 4
    pairs = torch.tensor([[0.05, -1.0], [0.02, -0.5]])  # per head (scale, min)
    data = torch.zeros(nb, KVH, bs, packed_dim(D, bits), dtype=torch.uint8)
    params = pairs[None, :, None, :].expand(nb, KVH, bs, 2).clone()
    cache = QuantKV(data, params, bits, D, torch.float32, static=True)
    x = torch.randn(3, KVH, D, generator=g)
    blocks, offsets = torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0])
    cache.write(blocks, offsets, x)
    qmax = 2 ** bits - 1
    for t in range(3):
        for h in range(KVH):
            want = [min(max(round(((x[t, h, i] - pairs[h, 1]) / pairs[h, 0]).item()), 0), qmax) for i in range(D)]
            got = data[blocks[t], h, offsets[t]]
            if bits == 4:
                got = torch.stack([got & 15, got >> 4], -1).flatten()
            assert got.tolist() == want
    assert torch.equal(params, pairs[None, :, None, :].expand(nb, KVH, bs, 2))


def _steps(runner):
    """A 9-token prefill, then three decode steps of one sequence (blocks 0 and 1 of 8 slots)."""
    table, prompt = [0, 1], [5, 9, 1, 30, 2, 44, 8, 17, 60]
    out = [runner.logits_for(SchedulerOutput([ScheduledSeq("s", prompt, 0, table, True)]))]
    for i, tok in enumerate((11, 4, 60)):
        out.append(runner.logits_for(SchedulerOutput([ScheduledSeq("s", [tok], len(prompt) + i, table, True)])))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_engine_writes_codes_by_the_static_parameters(bits, tmp_path):
    """A runner with static parameters (the native CPU layers where built, else torch) writes each slot's
    codes as the formula applied to the unquantized runner's own K/V with those parameters: layer 0 (whose
    K/V do not depend on the cache) exactly, within a code where float noise sits on a rounding edge; int8's
    logits stay near the unquantized ones."""
    from engine.model_runner import ModelRunner
    dense = ModelRunner(engine_model(), 4, 8, "cpu", torch.float32, [0])
    ref_logits = _steps(dense)
    # the 12 written positions of blocks 0 and 1: [layers, K/V, KVH, 12, D]
    vals = dense.kv.data[:, :, :2].transpose(2, 3).reshape(2, 2, 2, 16, 16)[:, :, :, :12]
    mn, mx = vals.amin((-1, -2)), vals.amax((-1, -2))  # [L, 2, KVH]: the written positions' range
    f = write_qparams(tmp_path / "q.safetensors", {"k": (mn[:, 0], mx[:, 0]), "v": (mn[:, 1], mx[:, 1])})
    static = load_kv_qparams(str(f), bits, 2, 2)
    runner = ModelRunner(engine_model(), 4, 8, "cpu", torch.float32, [0], quant_policy=bits, kv_static=static)
    got_logits = _steps(runner)
    pairs = runner.kv.params[0, :, :2].transpose(1, 2).reshape(2, 2, 16, 2)[:, :, :12]  # layer 0 [2, KVH, 12, 2]
    assert torch.equal(pairs, static[0][:, :, None, :].expand(2, 2, 12, 2))  # the pairs are left as given
    want = quantize_with(vals[0], pairs[..., 0:1], pairs[..., 1:2], bits)  # [2, KVH, 12, D']
    got = runner.kv.data[0, :, :2].transpose(1, 2).reshape(2, 2, 16, -1)[:, :, :12]
    if bits == 4:
        want, got = (torch.stack([t & 15, t >> 4], -1).flatten(-2).int() for t in (want, got))
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    if bits == 8:  # (int4 over a whole head's static range is coarse on this random model: its codes are the check)
        for a, b in zip(got_logits, ref_logits):
            assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_engine_takes_the_parameters_and_refuses_what_does_not_fit(tmp_path, smol_dir):
    from engine.llm_engine import LLMEngine
    from tiny_models import make_hf_model
    make_hf_model("llama", smol_dir, tmp_path / "m")  # 2 layers, 2 KV heads
    ranges = {kind: (-torch.ones(2, 2), torch.ones(2, 2)) for kind in "kv"}
    good = write_qparams(tmp_path / "good.safetensors", ranges)
    eng = LLMEngine(model=str(tmp_path / "m"), quant_policy=8, kv_qparams=str(good), num_cpu_blocks=8, block_size=16)
    assert eng.runner.kv.static and torch.allclose(eng.runner.kv.params[1, 1, 3, 1, 5], torch.tensor([2 / 255, -1.0]))
    with pytest.raises(ValueError, match="need quant_policy 8 or 4"):
        LLMEngine(model=str(tmp_path / "m"), quant_policy=0, kv_qparams=str(good), num_cpu_blocks=8)
    bad = write_qparams(tmp_path / "bad.safetensors", {k: (-torch.ones(3, 2), torch.ones(3, 2)) for k in "kv"})
    with pytest.raises(ValueError, match="2 layers of 2 KV heads"):
        LLMEngine(model=str(tmp_path / "m"), quant_policy=4, kv_qparams=str(bad), num_cpu_blocks=8)
