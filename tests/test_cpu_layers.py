"""The native CPU layers (engine/kernels/fused_decode.py over csrc/cpu_kernels.c): whole decode steps and
mixed prefill/decode steps, over float32 and over int8 / int4 KV blocks, against the module layers (torch
attention, kv_quant's writes) on the same KV cache. The kernels one by one are in test_cpu_kernels.py."""
import pytest
import torch

from engine.kernels import cpu_native
from engine.layers.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(cpu_native.lib() is None, reason="no C compiler: native kernels not built")


def _random_model(bias: bool, seed: int, heads=(6, 2, 8)):
    """A two-layer Llama with random weights ((query heads, KV heads, head_dim)) and its rotary tables."""
    from engine.layers.rotary import RotaryEmbedding
    from engine.models.args import ModelArgs
    from engine.models.llama import LlamaModel
    a = ModelArgs(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=48, intermediate_size=80,
                  num_layers=2, num_heads=heads[0], num_kv_heads=heads[1], head_dim=heads[2], rms_norm_eps=1e-5,
                  max_position_embeddings=256, rope_theta=10000.0, qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    model = LlamaModel(a)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model, RotaryEmbedding(a.head_dim, a.rope_theta, a.max_position_embeddings, {})


@pytest.mark.parametrize("path,rows", [("run", 11), ("run_phased", 11), ("run_panels", 11), ("run_panels", 2),
                                       ("run_panels", 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_decode_layers_match_the_torch_layers(bias, path, rows, monkeypatch):
    """A decode step of 11 sequences through every layer: the whole-layer native path (on row-major or
    panel-packed weights: 8 + 3 token rows, 48-, 32- and 16-wide output tiles; one and two rows take the
    panel-by-panel stream) and the phased path (MKL products between native phases) against the module
    path, same KV cache."""
    _check_decode_step(bias, path, rows, monkeypatch)


def _check_decode_step(bias, path, rows, monkeypatch, quant_policy=0, heads=(6, 2, 8), bs=4):
    """One decode step through the native path ``path`` and through the module layers (torch attention,
    kv_quant's writes for quantized blocks) over two copies of one KV cache: same outputs, same cache.
    Contexts of up to 4 blocks of ``bs`` tokens."""
    from engine.kernels import cpu_gemm
    from engine.kernels.fused_decode import fused_decoder_for

    model, rope = _random_model(bias, seed=0, heads=heads)
    a = model.args
    if path == "run_panels":
        if not cpu_gemm.native_available():
            pytest.skip("no panel products (AVX-512 native kernels) on this machine")
        monkeypatch.setattr(cpu_gemm, "_choice", "native")
        assert cpu_gemm.pack_model(model) > 0
    fused = fused_decoder_for(model, torch.float32)
    assert fused is not None and fused.panels == (path == "run_panels")
    path = "run" if path == "run_panels" else path
    ctx_lens = [c * bs // 4 for c in [5, 13, 1, 0, 9, 15, 2, 7, 11, 3, 6][:rows]]  # tokens already cached
    B = len(ctx_lens)
    caches = _two_caches(a, 4 * B, bs, quant_policy)
    bt = torch.randperm(4 * B).reshape(B, 4)
    x = torch.randn(B, a.hidden_size)
    pos = torch.tensor(ctx_lens)
    cos, sin = rope.cos_sin(pos)
    meta = AttentionMetadata(positions=pos, slot_blocks=bt.gather(1, (pos // bs)[:, None])[:, 0], slot_offsets=pos % bs,
                             num_decode=B, decode_ctx_lens=pos + 1, decode_block_tables=bt, cos=cos, sin=sin)
    ref = x.clone()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            ref = layer(ref, meta, *caches[0].layer(i))
        out = getattr(fused, path)(x.clone(), meta, caches[1])
    _compare_steps(model, meta, x, out, ref, caches, monkeypatch)


def _two_caches(a, num_blocks: int, bs: int, quant_policy: int = 0):
    """Two KV caches with the same random contents; quantized: integers of any value, ranges (scale * (2^bits
    - 1)) of 0.5 to 4 like the new tokens', any minimum."""
    from engine.layers.attention import KVCache
    caches = [KVCache(a.num_layers, num_blocks, bs, a.num_kv_heads, a.head_dim, torch.float32, "cpu", quant_policy)
              for _ in range(2)]
    if quant_policy:
        caches[0].data.copy_(torch.randint(0, 256, caches[0].data.shape, dtype=torch.uint8))
        caches[0].params[..., 0].uniform_(0.5 / (2 ** quant_policy - 1), 4 / (2 ** quant_policy - 1))
        caches[0].params[..., 1].normal_()
        caches[1].params.copy_(caches[0].params)
    else:
        caches[0].data.normal_()
    caches[1].data.copy_(caches[0].data)
    return caches


def _compare_steps(model, meta, x, out, ref, caches, monkeypatch):
    """A native step (out, caches[1]) against the module layers' (ref, caches[0]). Quantized blocks: the new
    tokens' vectors differ in their last bits (products summed in other orders), so a few of their integers
    may round the other way: the writes agree to one step; the attention is checked on what the native step
    wrote, by the module layers again over that cache with their writes skipped."""
    bits = caches[0].quant_policy
    if not bits:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(caches[1].data, caches[0].data, rtol=1e-5, atol=1e-5)  # same K/V written
        return
    torch.testing.assert_close(caches[1].params, caches[0].params, rtol=1e-5, atol=1e-6)
    assert _unpacked(caches[1].data, bits).sub(_unpacked(caches[0].data, bits)).abs().max() <= 1
    from engine.layers import attention
    monkeypatch.setattr(attention, "write_slots", lambda *args: None)
    ref = x.clone()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            ref = layer(ref, meta, *caches[1].layer(i))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gemm", ["mkl", "onednn", "native"])
@pytest.mark.parametrize("bias,heads", [(False, (6, 2, 8)), (True, (6, 2, 8)), (False, (6, 2, 64)),
                                        (True, (8, 1, 64)), (False, (3, 3, 128))])
def test_native_mixed_step_matches_the_torch_layers(bias, heads, gemm, monkeypatch):
    """Decode tokens and prefill chunks in one step (a fresh prompt, and a chunk continuing a cached prefix,
    both longer than one 16-row attention tile) through the token-major native path, against the module
    path over the same KV cache; products on plain (MKL), oneDNN-packed and panel-packed weights. Head sizes 64 and 128
    take the 512-bit tile kernel where the CPU has it."""
    _check_mixed_step(bias, heads, gemm, monkeypatch)


@pytest.mark.parametrize("gemm", ["mkl", "native"])
@pytest.mark.parametrize("heads", [(6, 2, 8), (8, 1, 64), (3, 3, 128)])
@pytest.mark.parametrize("quant_policy", [8, 4])
def test_native_mixed_step_over_quantized_blocks_matches_the_torch_layers(quant_policy, heads, gemm, monkeypatch):
    """The same mixed step over int8 / int4 blocks: the fresh prompt attends over its own float32 K/V, the
    continuing chunk and the decodes over the dequantized cache, as in the module path."""
    _check_mixed_step(False, heads, gemm, monkeypatch, quant_policy)


def _check_mixed_step(bias, heads, gemm, monkeypatch, quant_policy=0):
    from engine.kernels import cpu_gemm
    from engine.kernels.fused_decode import fused_decoder_for
    from engine.layers.attention import PrefillChunk

    if gemm != "mkl" and not cpu_gemm.backend_available(gemm):
        pytest.skip(f"no {gemm} products on this machine")
    model, rope = _random_model(bias, seed=1, heads=heads)
    a = model.args
    if gemm != "mkl":
        monkeypatch.setattr(cpu_gemm, "_choice", gemm)
        assert cpu_gemm.pack_model(model) > 0
    fused = fused_decoder_for(model, torch.float32)
    bs = 4
    # (cached tokens, new tokens): two decodes, a fresh 17-token prompt, 20 tokens after 9 cached ones
    seqs = [(5, 1), (13, 1), (0, 17), (9, 20)]
    perm = torch.randperm(40).tolist()
    tables = [perm[10 * i:10 * i + 10] for i in range(len(seqs))]
    caches = _two_caches(a, 40, bs, quant_policy)
    pos = torch.cat([torch.arange(s, s + n) for s, n in seqs])
    tok_tables = torch.cat([torch.tensor(t)[None].expand(n, -1) for t, (_, n) in zip(tables, seqs)])
    cos, sin = rope.cos_sin(pos)
    meta = AttentionMetadata(positions=pos, slot_blocks=tok_tables.gather(1, (pos // bs)[:, None])[:, 0],
                             slot_offsets=pos % bs, num_decode=2, decode_ctx_lens=torch.tensor([6, 14]),
                             decode_block_tables=torch.tensor(tables[:2]), cos=cos, sin=sin)
    starts = [0, 1, 2, 19]
    for (s, n), t, row in list(zip(seqs, tables, starts))[2:]:
        meta.prefills.append(PrefillChunk(row, n, s, torch.tensor(t[:-(-(s + n) // bs)]) if s else None))
    meta.spans = torch.tensor([[row, n, s] for row, (s, n) in zip(starts, seqs)], dtype=torch.int32)
    meta.span_block_tables = torch.tensor(tables, dtype=torch.int32)
    x = torch.randn(len(pos), a.hidden_size)
    ref = x.clone()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            ref = layer(ref, meta, *caches[0].layer(i))
        out = fused.run_mixed(x.clone(), meta, caches[1])
    _compare_steps(model, meta, x, out, ref, caches, monkeypatch)


@pytest.mark.parametrize("threads", [2, 3])
def test_decode_step_split_between_threads_matches_the_torch_layers(threads, monkeypatch):
    """A decode step whose sequences are split between the threads, each taking its share through every layer
    (decode_layers_split: 11 rows as 6 + 5 or 3 + 4 + 4), against the module path, same KV cache."""
    from engine.kernels import fused_decode
    monkeypatch.setattr(fused_decode, "SPLIT_MIN_ROWS", 3)
    calls = []
    split = fused_decode.FusedDecoder.splits
    monkeypatch.setattr(fused_decode.FusedDecoder, "splits", lambda self, M, t: calls.append(split(self, M, t)) or
                        calls[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test_fused_decode_layers_match_the_torch_layers(True, "run_panels", 11, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert calls == [True]


def _unpacked(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Cached integers as int16, one per value (int4: two per byte, low nibble first)."""
    d = data.to(torch.int16)
    return d if bits == 8 else torch.stack([d & 15, d >> 4], dim=-1).flatten(-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("D", [8, 40, 64, 128])
def test_native_kv_quantization_writes_the_bytes_of_kv_quant(bits, D):
    """The native decode layers' quantized K/V writes against kv_quant.quantize_vectors on the same vectors:
    identical integers and (scale, min) pairs, to the bit, ties in the rounding and constant vectors included."""
    from engine.kernels import cpu_native
    from engine.layers.kv_quant import quantize_vectors
    so = cpu_native.lib()
    if so is None:
        pytest.skip("native kernels not built")
    torch.manual_seed(D + bits)
    x = torch.randn(300, D) * torch.rand(300, 1) * 4
    x[0] = 0.5  # constant: scale clamped to 1e-8
    x[1, : D // 2], x[1, D // 2:] = 0.0, 3.0  # (x - min) / scale lands on integers and on halves
    x[2] = torch.arange(D) % 3 * 0.5
    q = torch.empty(300, D if bits == 8 else D // 2, dtype=torch.uint8)
    params = torch.empty(300, 2)
    so.kvq_quantize(x.data_ptr(), 300, D, bits, q.data_ptr(), params.data_ptr())
    ref_q, ref_p = quantize_vectors(x, bits)
    assert torch.equal(q, ref_q)
    assert torch.equal(params, ref_p)


@pytest.mark.parametrize("path,rows,threads,bs", [("run", 11, 2, 4), ("run_phased", 11, 2, 4), ("run_panels", 11, 2, 4),
                                                  ("run_panels", 11, 2, 16), ("run_panels", 11, 1, 4),
                                                  ("run_panels", 2, 2, 4), ("run_panels", 11, "split", 4),
                                                  ("run_panels", 11, "split", 16)])
@pytest.mark.parametrize("heads", [(6, 2, 8), (6, 2, 64), (4, 1, 128), (6, 3, 40)])
@pytest.mark.parametrize("quant_policy", [8, 4])
def test_fused_decode_layers_over_quantized_blocks_match_the_torch_layers(quant_policy, heads, path, rows, threads,
                                                                        bs, monkeypatch):
    """int8 / int4 KV blocks in the native decode layers (shared between threads, one thread, or split
    between them; and the phased path): each new token quantized into its slot, and attention over the
    dequantized context, matching the module path's; head sizes of the vector paths (64, 128) and of the
    scalar ones (8, 40); blocks of 4 and of 16 tokens (whole 16-key vectors)."""
    from engine.kernels import fused_decode
    calls = []
    split = fused_decode.FusedDecoder.splits
    monkeypatch.setattr(fused_decode.FusedDecoder, "splits", lambda self, M, t: calls.append(split(self, M, t)) or
                        calls[-1])
    if threads == "split":
        monkeypatch.setattr(fused_decode, "SPLIT_MIN_ROWS", 3)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if threads == 1 else 2)
    try:
        _check_decode_step(True, path, rows, monkeypatch, quant_policy=quant_policy, heads=heads, bs=bs)
    finally:
        torch.set_num_threads(before)
    assert calls == ([] if path == "run_phased" else [threads == "split"])


def test_fused_decode_layers_with_more_threads_than_cores_match_the_torch_layers(monkeypatch):
    """The whole-layer native path on panel-packed weights with seven threads on fewer cores, so that tiles
    change hands inside its o and down products, which add into the residual: against the module path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(7)
    try:
        for _ in range(5):
            test_fused_decode_layers_match_the_torch_layers(True, "run_panels", 11, monkeypatch)
    finally:
        torch.set_num_threads(threads)
