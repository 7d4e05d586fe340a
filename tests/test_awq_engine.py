"""W4A16 AWQ weights in the engine: the Triton kernel against the torch reference (interpreted on CPU),
the layer against an independent dequantization, and AWQ checkpoints made by quant_jobs served by the engine
against the dense dequantized model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels.awq_torch import awq_matmul_reference, dequantize_awq, pack_columns
from tiny_models import make_hf_model, write_internlm2

ROOT = Path(__file__).resolve().parent.parent


def random_awq(K, N, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.int32)
    s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
    return q, z, s, pack_columns(q), pack_columns(z)


def test_dequantize_matches_the_elementwise_formula():
    q, z, s, qw, qz = random_awq(64, 16, 32)
    w = dequantize_awq(qw, qz, s)
    ref = (q - z.repeat_interleave(32, 0)).float() * s.float().repeat_interleave(32, 0)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("M,K,N,G,split", [(1, 128, 64, 32, 1), (5, 128, 128, 64, 2), (17, 256, 64, 128, 4),
                                           (3, 64, 192, 32, 0), (6, 512, 64, 128, 0)])
def test_triton_w4a16_kernel_matches_reference(M, K, N, G, split):
    from engine.kernels.awq_triton import HAVE_TRITON, awq_matmul
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(K, N, G, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import kpack_matmul
    ref = awq_matmul_reference(x, qw, qz, s.float())
    assert torch.allclose(awq_matmul(x, qw, qz, s, split_k=split), ref, atol=1e-4, rtol=1e-4)
    for dots in (0, 1):  # one reshaped dot, or a dot per nibble (where the K tile allows)
        out = kpack_matmul(x, *repack_kpack(qw, qz), s, split_k=split, nibble_dots=dots)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("K,N,G,block", [(1024, 128, 128, 64), (640, 192, 64, 32), (256, 128, 32, 128),
                                         (352, 64, 32, 64), (512, 96, 128, 0)])
def test_one_row_w4a16_kernels_match_reference(K, N, G, block):
    """The decode kernels over both layouts, with 1 to 3 whole groups per program (3 leaves the last program
    a group past K); each shape runs every kernel in turn, so later calls find the split-K workspace zeroed."""
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_gemv import GemvTile, awq_gemv, kpack_gemv
    from engine.kernels.awq_triton import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(K, N, G, seed=K)
    qk, zk = repack_kpack(qw, qz)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(2))
    ref = awq_matmul_reference(x, qw, qz, s.float())
    for groups in (1, 2, 3):
        out = awq_gemv(x, qw, qz, s, block_p=block // 8, block_k=groups * G)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        for nibble_loop, magic in ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1)):
            out = kpack_gemv(x, qk, zk, s, GemvTile(block or 32, groups * G, 4, nibble_loop, magic=magic))
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tile", [(64, 0, 4, 1, 0, 0, 1),  # all of K in one program: no split, no atomics
                                  (32, 0, 2, 1, 32, 3, 1),  # a loop of 3 unrolled steps of 32 rows (steps past K)
                                  (64, 32, 2, 1, 0, 0, 1),  # a quarter group per program: split 12 ways
                                  (16, 128, 1, 0, 32, 2, 0),  # two iterations of two steps, the 3-D form
                                  (64, 256, 4, 1, 64, 2, 1),  # two iterations of two half-group steps
                                  (128, 128, 4, 2, 32, 2, 1),  # x split into columns, two iterations
                                  (32, 0, 2, 2, 64, 2, 0)])  # the same, exact form, no split
def test_one_row_kernel_steps_loops_and_splits(tile):
    """The K-packed one-row kernel's other forms against the reference at a shape (K 384, group 128) where
    steps, loop iterations and splits do not divide K evenly."""
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_gemv import GemvTile, gemv_plan, kpack_gemv
    from engine.kernels.awq_triton import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    K, N, G = 384, 80, 128
    _, _, s, qw, qz = random_awq(K, N, G, seed=11)
    qk, zk = repack_kpack(qw, qz)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4))
    ref = awq_matmul_reference(x, qw, qz, s.float())
    tile = GemvTile(*tile)
    gemv_plan(tile, K, N, G)
    for _ in range(2):  # the second call finds the split-K workspace the first left zeroed
        assert torch.allclose(kpack_gemv(x, qk, zk, s, tile), ref, atol=1e-4, rtol=1e-4)


def test_one_row_tile_that_does_not_fit_is_refused():
    from engine.kernels.awq_gemv import GemvTile, gemv_plan
    from engine.kernels.awq_triton import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    with pytest.raises(ValueError, match="dividing the group size 128"):
        gemv_plan(GemvTile(64, 0, 4, 1, 48), 384, 64, 128)
    with pytest.raises(ValueError, match="whole steps of 64"):
        gemv_plan(GemvTile(64, 96, 4, 1, 64), 384, 64, 128)
    with pytest.raises(ValueError, match="do not split into 3"):
        gemv_plan(GemvTile(64, 256, 4, 1, 64, 3), 384, 64, 128)
    # (step, unroll, iterations, split, programs): 3 steps of 128 in one program; 384 rows of 64 in 6 programs
    assert gemv_plan(GemvTile(64, 0, 4, 1), 384, 64, 128) == (128, 3, 1, 1, 1)
    assert gemv_plan(GemvTile(32, 64, 4, 1), 384, 64, 128) == (64, 1, 1, 6, 2)


def test_prefill_rows_dequantize_then_multiply():
    """From DEQUANT_MIN_ROWS rows on the K-packed product dequantizes the weight in one kernel (against the
    torch dequantization, exactly) and multiplies it by torch."""
    from engine.kernels.awq_torch import dequantize_kpack, repack_kpack
    from engine.kernels.awq_triton import DEQUANT_MIN_ROWS, HAVE_TRITON, kpack_dequantize, kpack_matmul
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(384, 136, 64, seed=7)
    qk, zk = repack_kpack(qw, qz)
    assert torch.equal(kpack_dequantize(qk, zk, s, torch.float32), dequantize_kpack(qk, zk, s))
    x = torch.randn(DEQUANT_MIN_ROWS + 3, 384, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(kpack_matmul(x, qk, zk, s), awq_matmul_reference(x, qw, qz, s.float()), atol=1e-4, rtol=1e-4)


def test_k_packing_keeps_the_weights():
    from engine.kernels.awq_torch import dequantize_kpack, repack_kpack
    from engine.layers.awq_linear import AwqLinear
    _, _, s, qw, qz = random_awq(64, 32, 16, seed=5)
    qk, zk = repack_kpack(qw, qz)
    assert qk.shape == (8, 32) and zk.dtype == torch.float16
    assert torch.equal(dequantize_kpack(qk, zk, s), dequantize_awq(qw, qz, s))
    layer = AwqLinear(64, [("", 32)], 16)
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", s)):
        layer.load(name, t)
    before = layer(torch.ones(2, 64))
    layer.to_kpack()
    assert layer.kpack and torch.equal(layer(torch.ones(2, 64)), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
def test_triton_w4a16_kernel_on_gpu(M):
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_tc import TcTile, awq_tc_matmul, kpack_tc_matmul
    from engine.kernels.awq_triton import awq_matmul, kpack_matmul
    _, _, s, qw, qz = random_awq(4096, 4096, 128)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
    qw, qz, s = qw.cuda(), qz.cuda(), s.cuda()
    ref = awq_matmul_reference(x.float(), qw, qz, s.float())
    for _ in range(2):  # the second call finds the split-K workspace the first left zeroed
        assert torch.allclose(awq_matmul(x, qw, qz, s).float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.allclose(kpack_matmul(x, *repack_kpack(qw, qz), s).float(), ref, atol=2e-2, rtol=2e-2)
        for fold in (0, 1):  # the tensor-core kernel's two forms (awq_matmul takes it from 2 rows on)
            out = awq_tc_matmul(x, qw, qz, s, TcTile(128, 128, 4, 0, fold))
            assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)
        out = kpack_tc_matmul(x, *repack_kpack(qw, qz), s)  # kpack_matmul's from 2 rows to 255
        assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_awq_layer_on_gpu_same_after_k_packing():
    from engine.layers.awq_linear import AwqLinear
    layer = AwqLinear(512, [("gate", 256), ("up", 256)], 128).cuda()
    _, _, s, qw, qz = random_awq(512, 512, 128, seed=3)
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", s)):
        layer.load(name, t.cuda())
    xs = [torch.randn(m, 512, device="cuda", dtype=torch.float16) for m in (1, 5)]
    ref = [x.float() @ dequantize_awq(qw, qz, s).cuda() for x in xs]
    before = [layer.half()(x) for x in xs]
    layer.to_kpack()
    for x, r, b in zip(xs, ref, before):
        assert torch.allclose(b.float(), r, atol=2e-2, rtol=2e-2)
        assert torch.allclose(layer(x).float(), r, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_down_projection_gates_its_own_input_on_gpu():
    """AwqLinear.forward_gated on the GPU, both layouts, 1 to 300 rows (one-row kernels, tensor cores, the
    dequantized product), against F.silu(gate) * up into the float32 dequantized product."""
    import torch.nn.functional as F
    from engine.layers.awq_linear import AwqLinear
    layer = AwqLinear(11008, [("", 4096)], 128).cuda()
    _, _, s, qw, qz = random_awq(11008, 4096, 128, seed=5)
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", s)):
        layer.load(name, t.cuda())
    layer = layer.half()
    w = dequantize_awq(qw, qz, s).cuda()
    for kpack in (False, True):
        if kpack:
            layer.to_kpack()
        for m in (1, 7, 300):
            gu = torch.randn(m, 2 * 11008, device="cuda", dtype=torch.float16)
            ref = (F.silu(gu[:, :11008]) * gu[:, 11008:]).float() @ w
            assert torch.allclose(layer.forward_gated(gu).float(), ref, atol=3e-2, rtol=2e-2), (kpack, m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_products_norm_their_own_input_on_gpu():
    """AwqLinear.forward_normed on the GPU, both layouts, 1 to 300 rows (one-row kernels, tensor cores, the
    dequantized product), with and without a residual, against torch's float16 RMSNorm into the float32
    dequantized product; the residual sum exact."""
    from engine.layers.awq_linear import AwqLinear
    K, N = 4096, 12288
    layer = AwqLinear(K, [("", N)], 128).cuda()
    _, _, s, qw, qz = random_awq(K, N, 128, seed=6)
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", s)):
        layer.load(name, t.cuda())
    layer = layer.half()
    w = dequantize_awq(qw, qz, s).cuda()
    nw = (torch.rand(K, device="cuda") + 0.5).half()
    for kpack in (False, True):
        if kpack:
            layer.to_kpack()
        for m in (1, 7, 300):
            a, r = (torch.randn(m, K, device="cuda", dtype=torch.float16) for _ in range(2))
            for residual in (r, None):
                x = a + r if residual is not None else a
                y, res = layer.forward_normed(a, residual, nw, 1e-5)
                ref = _rms(x, nw, dtype=torch.float16).float() @ w
                assert torch.allclose(y.float(), ref, atol=3e-2, rtol=2e-2), (kpack, m)
                assert torch.equal(res, x)


def test_fused_awq_layer_loads_parts_and_computes():
    from engine.layers.awq_linear import AwqLinear
    layer = AwqLinear(64, [("q", 32), ("k", 16), ("v", 16)], 32, bias=True)
    parts = {n: random_awq(64, size, 32, seed=i) for i, (n, size) in enumerate([("q", 32), ("k", 16), ("v", 16)])}
    for n, (_, _, s, qw, qz) in parts.items():
        layer.load("qweight", qw, n)
        layer.load("qzeros", qz, n)
        layer.load("scales", s, n)
        layer.load("bias", torch.full((qw.shape[1] * 8,), 0.5), n)
    x = torch.randn(3, 64)
    w = torch.cat([dequantize_awq(p[3], p[4], p[2]) for p in parts.values()], dim=1)  # [in, out]
    assert torch.allclose(layer(x), x @ w + 0.5, atol=1e-5)
    assert torch.allclose(layer.forward_t(x), (x @ w + 0.5).t(), atol=1e-5)
    with pytest.raises(ValueError, match=r"scales\[q\].*group_size"):
        layer.load("scales", torch.zeros(4, 32), "q")


def quantize(model_dir, work, *extra):
    cmd = [sys.executable, "-m", "quant_jobs", "auto_awq", "--model", str(model_dir), "--work-dir", str(work),
           "--w-group-size", "32", "--calib-samples", "4", "--calib-seqlen", "64", "--no-parallel", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return work / "quantized"


@pytest.fixture(scope="module")
def awq_tiny(tmp_path_factory, smol_dir):
    root = tmp_path_factory.mktemp("awq-engine")
    hf = make_hf_model("llama", smol_dir, root / "fp", seed=11)
    write_internlm2(hf, root / "internlm2", smol_dir)
    return {"llama": quantize(root / "fp", root / "w"), "internlm2": quantize(root / "internlm2", root / "wi", "--rtn"),
            "llama_rtn": quantize(root / "fp", root / "wr", "--rtn")}


def test_engine_serves_awq_checkpoint_like_the_dequantized_model(awq_tiny):
    from engine.llm_engine import LLMEngine
    from quant_jobs.dense import logits
    from quant_jobs.model_io import load_full
    from engine.generation import GenerationConfig
    from engine.offline import Pipeline
    eng = LLMEngine(model=str(awq_tiny["llama"]), max_batch_size=4, block_size=16, num_cpu_blocks=32)
    assert type(eng.model.layers[0].attn.qkv).__name__ == "AwqLinear"
    ids = [5, 17, 300, 4000, 12, 99, 7, 2500]
    out = Pipeline(eng)([ids], GenerationConfig(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    dense = load_full(str(awq_tiny["llama"]))  # independent path: unpacked to dense weights at load
    seq = list(ids)
    for _ in range(6):
        seq.append(int(logits(dense, torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_internlm2_awq_checkpoint_matches_llama_in_the_engine(awq_tiny):
    from engine.generation import GenerationConfig
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    gc = GenerationConfig(max_new_tokens=8, temperature=0, ignore_eos=True)
    outs = []
    for name in ("llama_rtn", "internlm2"):
        eng = LLMEngine(model=str(awq_tiny[name]), max_batch_size=4, block_size=16, num_cpu_blocks=32)
        outs.append(Pipeline(eng)([[3, 14, 15, 92, 65]], gc)[0].token_ids)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("patch, message", [
    ({"quant_method": "gptq"}, "quant_method: 'gptq' is not supported"),
    ({"bits": 8}, "bits: 8 is not supported"),
    ({"group_size": 64}, "group_size"),
])
def test_bad_quantization_config_is_a_clear_error(awq_tiny, tmp_path, patch, message):
    import shutil

    from engine.llm_engine import LLMEngine
    bad = tmp_path / "bad"
    shutil.copytree(awq_tiny["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(patch)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        LLMEngine(model=str(bad), num_cpu_blocks=8)


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
    assert torch.allclose(out, awq_matmul_reference(_rms(a + r, w), qw, qz, s.float()), atol=1e-4, rtol=1e-4)
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


def _rms(x, w, eps=1e-5, dtype=None):
    """RMSNorm(x) * w, rounded to ``dtype`` after the normalisation and after the weight (as torch's float16
    layers and gpu_fused.add_rmsnorm round); float32 where dtype is None."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if dtype is None:
        return y * w.float()
    return (y.to(dtype).float() * w.float()).to(dtype)


def test_normed_products_make_rmsnorm_as_they_load():
    """q/k/v and gate/up reading the previous product's output and the residual (RMSNorm(x + residual) *
    weight made as x is loaded, the residual sum written out by one program): the one-row kernels over both
    layouts (split over K, so only one program writes the sum; and all of K per program), the tensor-core
    kernels at 1 and 5 rows (float16, every column tile but one skips the write), the first layer's form
    without a residual, and the dispatch (float32 batches norm first), against torch."""
    from engine.kernels.awq_gemv import GemvTile, awq_gemv, kpack_gemv
    from engine.kernels.awq_input import Norm
    from engine.kernels.awq_tc import TcTile, awq_tc_matmul, kpack_tc_matmul
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import HAVE_TRITON, awq_matmul, kpack_matmul
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    K, N, G = 256, 72, 64
    _, _, s, qw, qz = random_awq(K, N, G, seed=41)
    qk, zk = repack_kpack(qw, qz)
    g = torch.Generator().manual_seed(12)
    a, r = 2 * torch.randn(5, K, generator=g), torch.randn(5, K, generator=g)
    w = torch.rand(K, generator=g) + 0.5
    tol = dict(atol=1e-4, rtol=1e-4)
    for residual in (r, None):
        x = a + r if residual is not None else a
        ref = awq_matmul_reference(_rms(x, w), qw, qz, s.float())

        def run(fn, m=1):
            res = torch.full_like(a[:m], float("nan")) if residual is not None else None
            out = fn(a[:m], Norm(residual[:m] if residual is not None else None, w, 1e-5, res))
            if res is not None:
                assert torch.equal(res, x[:m])
            return out
        assert torch.allclose(run(lambda x_, n: awq_gemv(x_, qw, qz, s, block_p=2, block_k=G, norm=n)), ref[:1], **tol)
        for tile in (GemvTile(32, 128, 4, 0), GemvTile(32, 64, 4, 1, magic=1), GemvTile(64, 0, 2, 2, 32, 2, 1)):
            assert torch.allclose(run(lambda x_, n: kpack_gemv(x_, qk, zk, s, tile, norm=n)), ref[:1], **tol)
        for m in (1, 3):
            assert torch.allclose(run(lambda x_, n: awq_matmul(x_, qw, qz, s, norm=n), m), ref[:m], **tol)
            assert torch.allclose(run(lambda x_, n: kpack_matmul(x_, qk, zk, s, norm=n), m), ref[:m], **tol)
    a16, r16, w16 = a.half(), r.half(), w.half()
    x16 = a16 + r16
    ref16 = _rms(x16, w16, dtype=torch.float16).float() @ dequantize_awq(qw, qz, s, torch.float16).float()
    for m in (1, 5):
        for fn in (lambda n, t: awq_tc_matmul(a16[:m], qw, qz, s, t, norm=n),
                   lambda n, t: kpack_tc_matmul(a16[:m], qk, zk, s, t, norm=n)):
            for tile in (TcTile(64, 64, 4, 2, 0), TcTile(32, 64, 4, 2, 1)):
                res = torch.empty_like(a16[:m])
                out = fn(Norm(r16[:m], w16, 1e-5, res), tile)
                assert torch.allclose(out.float(), ref16[:m], atol=4e-3, rtol=2e-3) and torch.equal(res, x16[:m])
    with pytest.raises(ValueError, match="needs a tensor for the residual sum"):
        kpack_gemv(a[:1], qk, zk, s, norm=Norm(r[:1], w, 1e-5))
    with pytest.raises(ValueError, match="norm weight must be"):
        kpack_gemv(a[:1], qk, zk, s, norm=Norm(None, w[:8], 1e-5))


@pytest.mark.parametrize("M,K,N,G,tile", [(1, 256, 128, 64, (64, 64, 4)), (3, 256, 136, 32, (64, 128, 4, 2)),
                                          (17, 384, 64, 128, (64, 64, 4, 3)), (40, 128, 128, 128, (128, 128, 4)),
                                          (1, 512, 128, 128, None), (5, 256, 136, 64, (64, 64, 4, 2, 1)),
                                          (33, 128, 64, 32, (64, 128, 4, 0, 1)), (70, 384, 64, 128, (64, 128, 4, 3, 1))])
def test_tensor_core_kernel_matches_the_float16_reference(M, K, N, G, tile):
    """The tensor-core kernels against x @ the float16 dequantized weight: over AutoAWQ's layout in both forms
    (half2 dequantization into tl.dot; 1 + q/16 into tl.dot with scale and zero after it) and over the
    K-packed layout (folded); rows padded to 16, 32 or 64, columns past N (136 of 64-column tiles), splits
    of K that leave the last split short, K rows per step capped at the group."""
    from engine.kernels.awq_tc import TcTile, awq_tc_matmul, kpack_tc_matmul
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(K, N, G, seed=M + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half()
    ref = x.float() @ dequantize_awq(qw, qz, s, torch.float16).float()
    qk, zk = repack_kpack(qw, qz)
    for _ in range(2):  # the second call finds the split-K workspace the first left zeroed
        out = awq_tc_matmul(x, qw, qz, s, TcTile(*tile) if tile else None)
        assert out.dtype == torch.float16 and torch.allclose(out.float(), ref, atol=4e-3, rtol=2e-3)
        out = kpack_tc_matmul(x, qk, zk, s, TcTile(*tile) if tile else None)  # K-packed: folded in any case
        assert out.dtype == torch.float16 and torch.allclose(out.float(), ref, atol=4e-3, rtol=2e-3)


def test_k_packed_float16_products_take_tensor_cores_and_match(monkeypatch):
    """kpack_matmul in float16: 2-255 rows run the K-packed tensor-core kernel, one row the tuned one-row
    kernel (the tensor-core one where the tuner put it in KPACK_TC_TILES); all against the float16 reference."""
    from engine.kernels import awq_tc
    from engine.kernels.awq_tc import TcTile
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import HAVE_TRITON, kpack_matmul
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(256, 64, 64, seed=21)
    qk, zk = repack_kpack(qw, qz)
    w16 = dequantize_awq(qw, qz, s, torch.float16).float()
    monkeypatch.setattr(awq_tc, "KPACK_TC_TILES", {(256, 64, 64): TcTile(64, 64, 4, 2, 1)})
    for m in (1, 3, 20):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).half()
        assert torch.allclose(kpack_matmul(x, qk, zk, s).float(), x.float() @ w16, atol=4e-3, rtol=2e-3)


def test_gated_products_make_silu_times_up_as_they_load():
    """The MLP's down projection reading the fused gate/up output [M, 2K] itself (SiLU(gate) * up made as x is
    loaded, no kernel of its own): every one-row form over both layouts, the tensor-core kernels at 1 and 5
    rows, and the dispatch (float32 batches ungate first), against torch's F.silu(gate) * up into the
    reference product."""
    import torch.nn.functional as F
    from engine.kernels.awq_gemv import GemvTile, awq_gemv, kpack_gemv
    from engine.kernels.awq_tc import TcTile, awq_tc_matmul, kpack_tc_matmul
    from engine.kernels.awq_torch import repack_kpack
    from engine.kernels.awq_triton import HAVE_TRITON, awq_matmul, kpack_matmul
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    K, N, G = 256, 72, 64
    _, _, s, qw, qz = random_awq(K, N, G, seed=31)
    qk, zk = repack_kpack(qw, qz)
    gu = 3 * torch.randn(5, 2 * K, generator=torch.Generator().manual_seed(8))  # SiLU's tails in play
    x = F.silu(gu[:, :K]) * gu[:, K:]
    ref = awq_matmul_reference(x, qw, qz, s.float())
    tol = dict(atol=1e-4, rtol=1e-4)
    assert torch.allclose(awq_gemv(gu[:1], qw, qz, s, block_p=2, gated=True), ref[:1], **tol)
    for nibble_loop, magic in ((0, 0), (1, 1), (2, 1)):
        out = kpack_gemv(gu[:1], qk, zk, s, GemvTile(32, 128, 4, nibble_loop, magic=magic), gated=True)
        assert torch.allclose(out, ref[:1], **tol)
    for m in (1, 3):  # the dispatch: one-row kernels, then (float32) silu_mul and the tiled kernels
        assert torch.allclose(awq_matmul(gu[:m], qw, qz, s, gated=True), ref[:m], **tol)
        assert torch.allclose(kpack_matmul(gu[:m], qk, zk, s, gated=True), ref[:m], **tol)
    gu16 = gu.half()
    x16 = F.silu(gu16[:, :K]) * gu16[:, K:]
    ref16 = x16.float() @ dequantize_awq(qw, qz, s, torch.float16).float()
    for m in (1, 5):
        for tile in (TcTile(64, 64, 4, 2, 0), TcTile(64, 64, 4, 2, 1)):
            out = awq_tc_matmul(gu16[:m], qw, qz, s, tile, gated=True)
            assert torch.allclose(out.float(), ref16[:m], atol=4e-3, rtol=2e-3)
        out = kpack_tc_matmul(gu16[:m], qk, zk, s, TcTile(64, 64, 4, 2, 1), gated=True)
        assert torch.allclose(out.float(), ref16[:m], atol=4e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="not gate and up halves"):
        kpack_gemv(gu[:1, :-1], qk, zk, s, gated=True)


def test_tensor_core_kernel_refuses_what_it_cannot_run():
    from engine.kernels.awq_tc import TcTile, awq_tc_matmul
    from engine.kernels.awq_triton import HAVE_TRITON
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    _, _, s, qw, qz = random_awq(64, 32, 32)
    with pytest.raises(ValueError, match="x must be float16"):
        awq_tc_matmul(torch.zeros(1, 64), qw, qz, s)
    with pytest.raises(ValueError, match="must divide the group size 32"):
        awq_tc_matmul(torch.zeros(1, 64).half(), qw, qz, s, TcTile(32, 24, 4))


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
