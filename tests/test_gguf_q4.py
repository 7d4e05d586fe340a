"""gguf_weights = "native": a GGUF file's Q4_0 / Q4_1 / Q4_K linears kept 4-bit on the native CPU panels.

Oracles: gguf-py's own dequantizer for the block decoding, transformers' conversion of the embedded file
(the float32 checkpoint every other test loads) for the row order, and Hugging Face ``generate`` on that
checkpoint for the engine."""
import shutil

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.kernels import w4_cpu
from engine.models.gguf_q4 import (LINEARS, decode_q4, dense_modules, gguf_tensors, linear_types, read_linears,
                                   unpermute_rows)

gguf = pytest.importorskip("gguf")
needs_w4 = pytest.mark.skipif(not w4_cpu.available(), reason="native 4-bit CPU kernels not built here")

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def dequantized(codes, scale, minimum):
    out, k = codes.shape
    return (codes.float().view(out, k // 32, 32) * scale[..., None] + minimum[..., None]).view(out, k)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_blocks_decode_like_gguf_py(qtype):
    x = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32) * 0.05
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(x, t)
    codes, scale, minimum = decode_q4(raw, qtype, 96)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and codes.shape == (24, 96)
    assert torch.equal(dequantized(codes, scale, minimum), torch.from_numpy(gguf.quants.dequantize(raw, t)))


def test_k_quant_super_blocks_decode_like_gguf_py():
    """Q4_K: random super-blocks (any byte is a valid code or 6-bit scale/min; d and dmin finite float16),
    8 sub-blocks of 32 each with its own pair, the 6-bit fields of sub-blocks 4-7 split over two bytes."""
    rng = np.random.default_rng(1)
    out, k = 6, 512
    raw = rng.integers(0, 256, size=(out, k // 256, 144), dtype=np.uint8)
    for at in (0, 2):
        raw[..., at:at + 2] = rng.uniform(1e-3, 2e-2, size=(out, k // 256, 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(out, -1)
    codes, scale, minimum = decode_q4(raw, "Q4_K", k)
    assert scale.shape == (out, k // 32) and int(codes.max()) <= 15
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))
    assert torch.equal(dequantized(codes, scale, minimum), want)


def test_other_block_types_and_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="Q4_0, Q4_1 or Q4_K.*Q8_0"):
        decode_q4(np.zeros((2, 34), np.uint8), "Q8_0", 32)
    with pytest.raises(ValueError, match="32-weight Q4_1 blocks"):
        decode_q4(np.zeros((2, 20), np.uint8), "Q4_1", 48)
    with pytest.raises(ValueError, match="256-weight Q4_K blocks"):
        decode_q4(np.zeros((2, 144), np.uint8), "Q4_K", 576)


def test_unpermute_undoes_llama_cpp_interleaving_by_hand():
    # 2 heads of 4 rows: llama.cpp stores each head's rows as (0, 2, 1, 3), pairing the two rotary halves
    assert unpermute_rows(2, 8).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_embedded_file_decodes_to_transformers_float_weights(smol_dir):
    from safetensors.torch import load_file

    from engine.default_model import embedded_gguf_path
    state = load_file(str(smol_dir / "model.safetensors"))
    seen = 0
    for i, name, blocks in read_linears(embedded_gguf_path(), 30, 9, 3):
        assert torch.equal(dequantized(*blocks), state[f"model.layers.{i}.{HF_NAMES[name]}.weight"]), (i, name)
        seen += 1
    assert seen == 30 * len(LINEARS)


def test_native_needs_cpu_float32_and_one_process():
    for bad, field in (({"tp": 2}, "tp 1"), ({"device": "cuda"}, "device cpu"), ({"dtype": "bfloat16"}, "float32")):
        with pytest.raises(ValueError, match=f"gguf_weights.*{field}"):
            EngineConfig(gguf_weights="native", **bad)


@needs_w4
def test_native_needs_a_gguf_model(smol_dir):
    from engine.llm_engine import LLMEngine
    with pytest.raises(ValueError, match="gguf_weights: native needs a .gguf model"):
        LLMEngine(model=str(smol_dir), gguf_weights="native", num_cpu_blocks=4)


@needs_w4
@pytest.mark.slow
def test_engine_on_the_files_4bit_weights_matches_hf(smol_hf, smol_tok):
    """The embedded model served on its own Q4_1 blocks: transformers' float32 conversion holds the same
    weights, so greedy tokens equal Hugging Face generate's and the prompts' logits agree to 1e-4; decode
    batches run whole layers natively on the panels, mixed with prefill chunks."""
    from engine.layers.awq_linear import AwqLinear
    from engine.llm_engine import LLMEngine
    from test_hf_parity import check_model
    eng = LLMEngine(gguf_weights="native", max_batch_size=16, block_size=16, max_prefill_tokens=256,
                    num_cpu_blocks=64)
    layers = [m for m in eng.model.modules() if isinstance(m, AwqLinear)]
    assert len(layers) == 30 * 4 and all(isinstance(m.packed, w4_cpu.W4Panels) and m.group_size == 32
                                         for m in layers)
    assert not any(n.endswith(("q_proj", "weight")) for n, _ in eng.model.layers[0].attn.qkv.named_parameters())
    assert eng.model.fused_decoder is not None and eng.model.fused_decoder.panels == 2
    texts = ["Hello", "The capital of France is", "Write a long story about a dragon who learns to code. " * 6,
             "1, 2, 3, 5, 8, 13,"]
    check_model(eng, smol_hf, [smol_tok.encode(t) for t in texts], n_new=24)


def _write_gguf(path, arch, tensors):
    w = gguf.GGUFWriter(str(path), arch)
    for name, (qtype, data) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_other_types_stay_float_and_a_file_without_4bit_blocks_is_a_clear_error(tmp_path):
    """A product with any part in another type (here a Q8_0 attn_v) stays float32 whole; a file whose linears
    are all of other types is refused, and so is another architecture."""
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    mixed = {f"blk.0.{n}.weight": (Q.Q8_0 if n == "attn_v" else Q.Q4_1, x) for n in LINEARS}
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, "llama", mixed)
    types = linear_types(gguf_tensors(path)[1], 1)
    assert types[0, "attn_v"] == "Q8_0" and types[0, "attn_q"] == "Q4_1"
    dense = dense_modules(types)
    assert dense == {(0, "attn.qkv")}
    assert [n for _, n, _ in read_linears(path, 1, 1, 1, dense)] == ["attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    with pytest.raises(ValueError, match=r"Q4_K linear weights; this file has Q8_0 \(blk.0.attn_v.weight\)"):
        list(read_linears(path, 1, 1, 1))  # asked for the blocks of every product
    q8 = tmp_path / "q8.gguf"
    _write_gguf(q8, "llama", {f"blk.0.{n}.weight": (Q.Q8_0, x) for n in LINEARS})
    with pytest.raises(ValueError, match="q8.gguf has Q8_0: serve it with gguf_weights: dequantize"):
        dense_modules(linear_types(gguf_tensors(q8)[1], 1), q8.name)
    with pytest.raises(ValueError, match="has no tensor blk.1.attn_q.weight"):
        linear_types(gguf_tensors(q8)[1], 2, q8.name)
    phi = tmp_path / "phi.gguf"
    _write_gguf(phi, "phi3", {"blk.0.attn_q.weight": (Q.Q4_1, x)})
    with pytest.raises(ValueError, match="architectures 'llama', 'qwen2'; phi.gguf is 'phi3'"):
        list(read_linears(phi, 1, 1, 1))


def _retyped_copy(src, dst, retype):
    """A copy of the GGUF file ``src`` with the tensors named in ``retype`` requantized (through gguf-py) to
    the given types, the way llama.cpp's Q4_K_M and its fallbacks mix types in one file."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    for t in r.tensors:
        if t.name in retype:
            x, q = gguf.quants.dequantize(t.data, t.tensor_type), retype[t.name]
            w.add_tensor(t.name, x.astype(np.float16) if q == gguf.GGMLQuantizationType.F16
                         else gguf.quants.quantize(x, q), raw_dtype=q)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """The embedded file with four linears requantized (see the test); its conversion leaves the cache after."""
    from engine.default_model import converted_dir, embedded_gguf_path
    Q = gguf.GGMLQuantizationType
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    _retyped_copy(embedded_gguf_path(), path, {"blk.0.attn_v.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.F16,
                                               "blk.2.attn_output.weight": Q.Q5_0, "blk.3.ffn_up.weight": Q.Q8_0})
    yield path
    shutil.rmtree(converted_dir(path), ignore_errors=True)


@needs_w4
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "mkl"])
def test_engine_on_a_file_of_mixed_types_matches_hf(mixed_gguf, monkeypatch, backend):
    """The embedded file with four linears requantized to Q8_0, F16 and Q5_0: those products (one of them
    a part of q/k/v, another of gate/up) run in float32 from transformers' conversion of the new file, the
    others on its 4-bit blocks, in one native decode layer. The oracle is Hugging Face generate on that
    conversion. ``backend``: the float32 products on our panels (whole layers natively up to 256 tokens) or
    in MKL's row-major layout (the phased path beyond 8 tokens, its 4-bit products through w4_cpu)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.layers.awq_linear import AwqLinear
    from engine.llm_engine import LLMEngine
    from test_hf_parity import check_model, random_prompts
    path = mixed_gguf  # one file (and one conversion) for both backends
    from engine.kernels import cpu_gemm
    if not cpu_gemm.backend_available(backend):
        pytest.skip(f"no {backend} products on this machine")
    monkeypatch.setattr(cpu_gemm, "_choice", backend)
    eng = LLMEngine(model=str(path), gguf_weights="native", max_batch_size=16, block_size=16,
                    max_prefill_tokens=256, num_cpu_blocks=96)
    dense = {(i, n) for i, layer in enumerate(eng.model.layers) for n in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
             if not isinstance(layer.get_submodule(n), AwqLinear)}
    assert dense == {(0, "attn.qkv"), (1, "mlp.down"), (2, "attn.o"), (3, "mlp.gate_up")}
    assert sum(isinstance(m, AwqLinear) and isinstance(m.packed, w4_cpu.W4Panels)
               for m in eng.model.modules()) == 30 * 4 - 4
    assert eng.model.fused_decoder is not None and eng.model.fused_decoder.panels == (1 if backend == "native" else 0)
    hf = AutoModelForCausalLM.from_pretrained(str(eng.model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(eng.model_dir))
    texts = ["The capital of France is", "Write a long story about a dragon who learns to code. " * 6]
    check_model(eng, hf, [tok.encode(t) for t in texts], n_new=12)  # 2 sequences: one native call a layer
    # 10 decode together: past the 8 tokens of the per-layer native calls on MKL's layout
    check_model(eng, hf, random_prompts([5, 9, 14, 20, 3, 7, 11, 30, 2, 16]), n_new=8)


HF_TO_GGUF = {**{v: k for k, v in HF_NAMES.items()}, "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def _write_qwen2_gguf(hf, path, qtypes):
    """A Qwen2 model written as llama.cpp's converter writes one (rows in Hugging Face's order, norms and
    biases float32), its linears quantized by gguf-py to ``qtypes`` (GGUF name -> type; Q4_1 otherwise), with
    the embedded file's tokenizer (the test model shares its vocabulary)."""
    from engine.default_model import embedded_gguf_path
    c = hf.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    for name, f in gguf.GGUFReader(str(embedded_gguf_path())).fields.items():
        if name.startswith("tokenizer."):
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, name in HF_TO_GGUF.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf_name}.{kind}")
                if t is not None and t.ndim == 2:
                    q = qtypes.get(name, gguf.GGMLQuantizationType.Q4_1)
                    w.add_tensor(f"blk.{i}.{name}.{kind}", gguf.quants.quantize(t, q), raw_dtype=q)
                elif t is not None:
                    w.add_tensor(f"blk.{i}.{name}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_w4
def test_qwen2_file_on_its_4bit_weights_matches_hf(tmp_path, smol_dir):
    """GGUF architecture qwen2 (q/k/v biases; q and k rows not interleaved, unlike llama's): its Q4_1 / Q4_0
    linears on the panels, one Q8_0 product in float32, the biases from the conversion. Oracles: gguf-py's
    dequantizer for the rows the panels hold, Hugging Face generate on transformers' conversion of the file
    for the engine."""
    from transformers import AutoModelForCausalLM

    from engine.llm_engine import LLMEngine
    from test_hf_parity import check_model, random_prompts
    from tiny_models import make_hf_model
    Q = gguf.GGMLQuantizationType
    tiny = make_hf_model("qwen2", smol_dir, tmp_path / "hf", seed=3)
    path = tmp_path / "gguf" / "tiny-qwen2.gguf"
    path.parent.mkdir()
    _write_qwen2_gguf(tiny, path, {"attn_output": Q.Q4_0, "ffn_down": Q.Q8_0})
    arch, tensors = gguf_tensors(path)
    for i, name, blocks in read_linears(path, 2, 4, 2, dense={(0, "mlp.down"), (1, "mlp.down")}):
        t = tensors[f"blk.{i}.{name}.weight"]  # Hugging Face's row order as it is
        assert torch.equal(dequantized(*blocks), torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)))
    eng = LLMEngine(model=str(path), gguf_weights="native", max_batch_size=8, block_size=16, num_cpu_blocks=64)
    layer = eng.model.layers[0]
    assert isinstance(layer.attn.qkv.packed, w4_cpu.W4Panels) and layer.attn.qkv.bias is not None
    assert not isinstance(getattr(layer.mlp.down, "packed", None), w4_cpu.W4Panels)
    assert eng.model.fused_decoder is not None
    hf = AutoModelForCausalLM.from_pretrained(str(eng.model_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    try:
        check_model(eng, hf, random_prompts([3, 17, 40, 70], seed=4), n_new=12)
    finally:
        shutil.rmtree(eng.model_dir, ignore_errors=True)  # the conversion of a file that is gone after the test


def test_conversion_replaces_the_copy_under_the_old_cache_key(tmp_path, smol_dir, monkeypatch):
    """Before its key held the file's path and mtime, the cache kept a conversion under <name>-<size>: the
    next conversion of that file removes it (it would never be read again)."""
    from engine.default_model import cache_root, converted_dir, ensure_converted
    from tiny_models import make_hf_model
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    tiny = make_hf_model("qwen2", smol_dir, tmp_path / "hf", seed=5)
    path = tmp_path / "gguf" / "tiny-old-key.gguf"
    path.parent.mkdir()
    _write_qwen2_gguf(tiny, path, {})
    legacy = cache_root() / "gguf" / f"{path.stem}-{path.stat().st_size}"
    legacy.mkdir(parents=True, exist_ok=True)
    (legacy / "config.json").write_text("{}")
    other = cache_root() / "gguf" / f"{path.stem}-{path.stat().st_size + 1}"  # another file's: kept
    other.mkdir()
    assert ensure_converted(path) == converted_dir(path)
    assert not legacy.exists() and other.is_dir()
