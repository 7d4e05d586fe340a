"""W4A16 AWQ weights in the engine: the Triton kernel against the torch reference (interpreted on CPU),
the layer against an independent dequantization, and AWQ checkpoints made by quant_jobs served by the engine
against the dense dequantized model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels.awq_torch import awq_matmul_reference, dequantize_awq
from awq_random import random_awq
from tiny_models import make_hf_model, write_internlm2

ROOT = Path(__file__).resolve().parent.parent


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


def test_engine_decodes_batches_on_4bit_panels_like_the_dequantized_model(awq_tiny):
    """CPU with AVX-512: the W4A16 layers run on the native 4-bit panels, whole decode layers in native code
    (up to eight rows read the codes straight into the FMAs, more rows dequantize blocks first); prompts of
    different lengths, so steps mix prefill chunks with decodes too."""
    from engine.generation import GenerationConfig
    from engine.kernels import w4_cpu
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    from quant_jobs.dense import logits
    from quant_jobs.model_io import load_full
    if not w4_cpu.available():
        pytest.skip("the native 4-bit products need AVX-512")
    eng = LLMEngine(model=str(awq_tiny["llama"]), max_batch_size=8, block_size=16, num_cpu_blocks=64,
                    max_prefill_tokens=64)
    model = eng.model
    assert isinstance(model.layers[0].mlp.down.packed, w4_cpu.W4Panels)
    assert model.fused_decoder is not None and model.fused_decoder.panels == 2
    prompts = [[(7 * i + 3 * j) % 4000 + 5 for j in range(3 + 9 * i)] for i in range(6)]
    outs = Pipeline(eng)(prompts, GenerationConfig(max_new_tokens=5, temperature=0, ignore_eos=True))
    dense = load_full(str(awq_tiny["llama"]))
    for ids, out in zip(prompts, outs):
        seq = list(ids)
        for _ in range(5):
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


def _keep_full_precision(src, dst, patterns, seed=0):
    """A copy of the AWQ checkpoint ``src`` as AutoAWQ writes one with modules_to_not_convert = ``patterns``:
    the modules whose names contain one of them hold a float16 ``weight`` (new random values at the
    dequantized weight's scale) instead of their qweight/qzeros/scales."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quant_jobs.checkpoint import dequantized_tensors
    shutil.copytree(src, dst)
    state, g = load_file(str(dst / "model.safetensors")), torch.Generator().manual_seed(seed)
    for name, w in dequantized_tensors(iter(sorted(state.items()))):
        base = name[:-len(".weight")]
        if any(p in name for p in patterns) and f"{base}.qweight" in state:
            for kind in ("qweight", "qzeros", "scales"):
                del state[f"{base}.{kind}"]
            state[name] = (torch.randn(w.shape, generator=g) * w.float().std()).half()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = list(patterns)
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("pattern, dense", [("down_proj", ("mlp.down",)), ("self_attn", ("attn.qkv", "attn.o"))])
def test_modules_autoawq_did_not_convert_run_in_full_precision(awq_tiny, tmp_path, pattern, dense):
    """quantization_config.modules_to_not_convert (AutoAWQ's): those products load their float weights and run
    beside the 4-bit ones (on CPU with the native kernels, in the same fused decode layers); greedy tokens
    equal the independently loaded model's (quant_jobs' loader: AWQ triples dequantized, float weights as
    they are) for prompts of different lengths, decode batches mixed with prefill chunks."""
    from engine.generation import GenerationConfig
    from engine.kernels import w4_cpu
    from engine.layers.awq_linear import AwqLinear
    from engine.llm_engine import LLMEngine
    from engine.offline import Pipeline
    from quant_jobs.dense import logits
    from quant_jobs.model_io import load_full
    ckpt = tmp_path / "kept"
    _keep_full_precision(awq_tiny["llama"], ckpt, [pattern])
    eng = LLMEngine(model=str(ckpt), max_batch_size=8, block_size=16, num_cpu_blocks=64, max_prefill_tokens=64)
    if w4_cpu.available():  # the 4-bit and the float32 products in the same native decode layers
        assert eng.model.fused_decoder is not None and eng.model.fused_decoder.panels != 2
    for layer in eng.model.layers:
        for name in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
            assert isinstance(layer.get_submodule(name), AwqLinear) == (name not in dense), name
    prompts = [[(5 * i + 11 * j) % 4000 + 5 for j in range(2 + 7 * i)] for i in range(5)]
    outs = Pipeline(eng)(prompts, GenerationConfig(max_new_tokens=5, temperature=0, ignore_eos=True))
    ref = load_full(str(ckpt))
    for ids, out in zip(prompts, outs):
        seq = list(ids)
        for _ in range(5):
            seq.append(int(logits(ref, torch.tensor([seq]))[0, -1].argmax()))
        assert out.token_ids == seq[len(ids):]


@pytest.mark.parametrize("keep, message", [
    (["v_proj"], r"keeps model.layers.0.self_attn.v_proj in full precision but not "
                 r"model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj"),
    ("down_proj", "modules_to_not_convert: 'down_proj' is not allowed; a list of module names"),
])
def test_modules_to_not_convert_the_engine_cannot_split_are_clear_errors(awq_tiny, tmp_path, keep, message):
    import shutil

    from engine.llm_engine import LLMEngine
    bad = tmp_path / "bad"
    shutil.copytree(awq_tiny["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = keep
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        LLMEngine(model=str(bad), num_cpu_blocks=8)


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
