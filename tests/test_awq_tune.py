"""The W4A16 load-time tuner (engine/kernels/awq_tune.py): tiles, layouts and where the products' inputs
are made, chosen from timings (a fake timer on CPU, where the interpreter runs the kernels) and cached; on a
GPU every candidate checked against the torch product."""
import json

import pytest
import torch

from awq_random import random_awq, rms
from engine.kernels.awq_torch import awq_matmul_reference, dequantize_awq


def test_tuner_picks_the_fastest_sound_tile_and_caches_it(tmp_path, monkeypatch):
    """The per-shape tile choice (kernels/awq_tune.py) under the interpreter: every candidate that fits is
    timed and checked against the torch product, one that fails to compile is dropped, the fastest sound one
    is installed (the default call then uses it and still matches the reference) and written to the cache,
    which a second start reads without timing anything."""
    from engine.kernels import awq_gemv, awq_triton, awq_tune
    if not awq_triton.HAVE_TRITON:
        pytest.skip("triton not installed")
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_gemv import GemvTile, kpack_gemv
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))
    monkeypatch.setattr(awq_gemv, "KPACK_GEMV_TILES", {})
    monkeypatch.setattr(awq_tune, "KPACK_GEMV_TILES", awq_gemv.KPACK_GEMV_TILES)
    cands = [GemvTile(64, 64, 4, 0), GemvTile(32, 0, 2, 1, magic=1), GemvTile(48, 64, 4, 1),  # 48: not a power of 2
             GemvTile(64, 0, 4, 1, 48)]  # a step that does not divide the group: not timed at all
    record = []
    chosen = awq_tune.tune([(256, 96, 64)], "cpu", torch.float32, cands, record=record)
    assert [r["tile"] for r in record] == [list(t) for t in cands[:3]]
    assert [r["ok"] for r in record] == [True, True, False]
    fastest = min(record[:2], key=lambda r: r["us"])
    pick = chosen[(256, 96, 64)]
    assert pick.kpack == GemvTile(*fastest["tile"]) and pick.kpack_us == fastest["us"] and pick.tc is None
    assert awq_gemv.KPACK_GEMV_TILES[(256, 96, 64, torch.float32)] == pick.kpack
    _, _, s, qw, qz = random_awq(256, 96, 64, seed=9)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(kpack_gemv(x, *repack_kpack(qw, qz), s), awq_matmul_reference(x, qw, qz, s.float()),
                          atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "w4a16_tiles.json").read_text())
    assert list(saved.values())[0]["256x96 g64 float32"]["kpack"] == fastest["tile"]
    awq_gemv.KPACK_GEMV_TILES.clear()

    def no_timing(fn):
        raise AssertionError("the cached choice should need no timing")
    assert awq_tune.tune([(256, 96, 64)], "cpu", torch.float32, cands, timer=no_timing) == chosen
    assert awq_gemv.KPACK_GEMV_TILES[(256, 96, 64, torch.float32)] == pick.kpack


def test_tuner_times_both_layouts_for_float16_and_picks_the_faster(tmp_path, monkeypatch):
    """float16: the tuner also times the tensor-core kernels (over the K-packed layout, folded tiles only, and
    over AutoAWQ's); the layout it picks is the one whose fastest one-row times, summed over the model's
    layers, are the least (summed by hand from the timings here); a default float16 call of awq_matmul then
    takes the picked tensor-core tile."""
    from engine.kernels import awq_gemv, awq_tc, awq_triton, awq_tune
    if not awq_triton.HAVE_TRITON:
        pytest.skip("triton not installed")
    from engine.kernels.awq_tc import TcTile
    from engine.kernels.awq_gemv import GemvTile
    from engine.kernels.awq_triton import awq_matmul
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))
    monkeypatch.setattr(awq_gemv, "KPACK_GEMV_TILES", {})
    monkeypatch.setattr(awq_tune, "KPACK_GEMV_TILES", awq_gemv.KPACK_GEMV_TILES)
    monkeypatch.setattr(awq_tc, "TC_TILES", {})
    monkeypatch.setattr(awq_tune, "TC_TILES", awq_tc.TC_TILES)
    monkeypatch.setattr(awq_tc, "KPACK_TC_TILES", {})
    monkeypatch.setattr(awq_tune, "KPACK_TC_TILES", awq_tc.KPACK_TC_TILES)
    shapes = {(128, 64, 32): 3, (256, 128, 64): 1}
    record = []
    chosen = awq_tune.tune(shapes, "cpu", torch.float16, [GemvTile(64, 64, 4, 1)],
                           [TcTile(64, 64, 4), TcTile(32, 32, 1, 0, 1)], record=record)
    assert all(r["ok"] for r in record) and {r["kind"] for r in record} == {"kpack", "kpack_tc", "tc"}
    assert [r["tile"] for r in record if r["kind"] == "kpack_tc"] == [[32, 32, 1, 0, 1, 0]] * 2  # folded only
    best = {}
    for r in record:
        k = (r["K"], r["N"], r["G"], r["kind"])
        best[k] = min(best.get(k, float("inf")), r["us"])
    for shape, c in chosen.items():
        assert c.kpack_us == best[(*shape, "kpack")] and c.tc_us == best[(*shape, "tc")]
        assert c.kpack_tc_us == best[(*shape, "kpack_tc")]
        assert awq_tc.TC_TILES[shape] == c.tc
        assert (awq_tc.KPACK_TC_TILES.get(shape) == c.kpack_tc) == (c.kpack_tc_us < c.kpack_us)
    kpack = sum(min(best[(*s, "kpack")], best[(*s, "kpack_tc")]) * n for s, n in shapes.items())
    tc = sum(best[(*s, "tc")] * n for s, n in shapes.items())
    assert awq_tune.pick_layout(chosen, shapes) == ("awq" if tc < kpack else "kpack")
    _, _, s, qw, qz = random_awq(256, 128, 64, seed=12)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6)).half()
    ref = x.float() @ dequantize_awq(qw, qz, s, torch.float16).float()
    assert torch.allclose(awq_matmul(x, qw, qz, s).float(), ref, atol=4e-3, rtol=2e-3)


def test_tuner_keeps_the_separate_input_kernel_where_it_times_faster(tmp_path, monkeypatch):
    """tune_inputs: each shape timed making its input inside the product and with its own kernel first
    (silu_mul for the down projections, add_rmsnorm for q/k/v and gate/up); the shapes where the separate
    kernel took less time go to UNGATED / UNNORMED, and calls there still match the reference; the times
    are cached and a second start reads them without timing."""
    import torch.nn.functional as F
    from engine.kernels import awq_triton, awq_tune
    from engine.kernels.awq_input import Norm
    from engine.kernels.awq_torch import repack_kpack
    if not awq_triton.HAVE_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))
    monkeypatch.setattr(awq_triton, "UNGATED", set())
    monkeypatch.setattr(awq_triton, "UNNORMED", set())
    fake = iter([3.0, 1.0, 1.0, 2.0, 2.0, 1.0])  # seconds (inside, apart): gated 128, gated 256, normed 128

    def timer(fn):
        fn()
        return next(fake)
    shapes = {"gated": [(256, 64, 64), (128, 64, 64)], "normed": [(128, 64, 64)]}
    times = awq_tune.tune_inputs(shapes, "cpu", torch.float32, "kpack", timer=timer)
    assert times == {("gated", (128, 64, 64)): (3e6, 1e6), ("gated", (256, 64, 64)): (1e6, 2e6),
                     ("normed", (128, 64, 64)): (2e6, 1e6)}
    assert awq_triton.UNGATED == {(128, 64, 64)} and awq_triton.UNNORMED == {(128, 64, 64)}
    awq_triton.UNGATED.clear()
    awq_triton.UNNORMED.clear()
    assert awq_tune.tune_inputs(shapes, "cpu", torch.float32, "kpack", timer=None) == times  # from the cache
    assert awq_triton.UNGATED == {(128, 64, 64)} and awq_triton.UNNORMED == {(128, 64, 64)}
    _, _, s, qw, qz = random_awq(128, 64, 64, seed=9)
    qk, zk = repack_kpack(qw, qz)
    g = torch.Generator().manual_seed(9)
    gu = torch.randn(1, 256, generator=g)
    ref = awq_matmul_reference(F.silu(gu[:, :128]) * gu[:, 128:], qw, qz, s.float())
    assert torch.allclose(awq_triton.kpack_matmul(gu, qk, zk, s, gated=True), ref, atol=1e-4, rtol=1e-4)
    a, r, w = torch.randn(1, 128, generator=g), torch.randn(1, 128, generator=g), torch.rand(128, generator=g)
    res = torch.empty_like(a)
    out = awq_triton.kpack_matmul(a, qk, zk, s, norm=Norm(r, w, 1e-5, res))
    assert torch.allclose(out, awq_matmul_reference(rms(a + r, w), qw, qz, s.float()), atol=1e-4, rtol=1e-4)
    assert torch.equal(res, a + r)


def test_tune_model_sorts_the_products_by_the_input_they_make(tmp_path, monkeypatch):
    """tune_model on a W4A16 model: the down projections' shape is timed gated, q/k/v's and gate/up's normed
    (o's neither); a tensor-parallel model (layers with a reduce) times neither, as its layers run unfused."""
    from engine.kernels import awq_triton, awq_tune
    from engine.kernels.awq_gemv import GemvTile
    from engine.layers.awq_linear import swap_in_awq
    from engine.models.args import ModelArgs
    from engine.models.loader import build_model
    if not awq_triton.HAVE_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))
    tune = awq_tune.tune
    monkeypatch.setattr(awq_tune, "tune", lambda shapes, d, t: tune(shapes, d, t, [GemvTile(32, 0, 4, 1, magic=1)], []))
    made = []
    monkeypatch.setattr(awq_tune, "tune_inputs", lambda shapes, *a: (made.append(shapes), {})[1])
    args = ModelArgs(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     max_position_embeddings=64, rope_theta=10000.0)
    model = build_model(args, "cpu", torch.float32)
    swap_in_awq(model, 32)
    for m in model.modules():
        if hasattr(m, "qweight"):
            m.qweight.random_(-2 ** 31, 2 ** 31 - 1)
            m.qzeros.random_(-2 ** 31, 2 ** 31 - 1)
            m.scales.uniform_(0.001, 0.01)
    assert awq_tune.tune_model(model, "cpu", torch.float32) == "kpack"
    assert made == [{"gated": {(96, 64, 32)}, "normed": {(64, 128, 32), (64, 192, 32)}}]
    for layer in model.layers:
        layer.reduce = lambda t: t
    awq_tune.tune_model(model, "cpu", torch.float32)
    assert len(made) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_candidate_tile_is_sound_on_gpu(tmp_path, monkeypatch):
    """Every candidate tile of the tuner (the three kernels), compiled for the GPU, against the dequantized
    torch product at a Llama-7B shape whose K (11008) no program span divides evenly; the picks are
    installed."""
    from engine.kernels import awq_gemv, awq_tc, awq_tune
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path))
    record = []
    chosen = awq_tune.tune([(11008, 4096, 128)], "cuda", torch.float16, use_cache=False, record=record)
    bad = [(r["kind"], r["tile"], r["max_abs_err"]) for r in record if not r["ok"]]
    folded = [t for t in awq_tune.TC_CANDIDATES if t.fold]
    assert not bad and len(record) == len(awq_tune.CANDIDATES) + len(awq_tune.TC_CANDIDATES) + len(folded)
    assert awq_gemv.KPACK_GEMV_TILES[(11008, 4096, 128, torch.float16)] == chosen[(11008, 4096, 128)].kpack
    assert awq_tc.TC_TILES[(11008, 4096, 128)] == chosen[(11008, 4096, 128)].tc
