"""Native CPU kernels (engine/kernels/csrc/cpu_kernels.c) against torch references."""
import os

import pytest
import torch

from engine.kernels import cpu_native
from engine.layers.attention import AttentionMetadata, torch_decode
from engine.layers.linear import Linear

from test_kernels import dense_reference, paged_inputs

pytestmark = pytest.mark.skipif(cpu_native.lib() is None, reason="no C compiler: native kernels not built")


@pytest.mark.parametrize("M", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("K", [64, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_torch(M, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(37, K, generator=g)
    b = torch.randn(37, generator=g) if bias else None
    y = cpu_native.skinny_linear_t(x, w, b)
    assert y.shape == (37, M) and y.is_contiguous()
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    torch.testing.assert_close(y.t().double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_layer_uses_native_path_for_few_tokens_and_matches_torch():
    lin = Linear(96, 50, bias=True)
    g = torch.Generator().manual_seed(0)
    lin.weight.data.copy_(torch.randn(50, 96, generator=g))
    lin.bias.data.copy_(torch.randn(50, generator=g))
    for T in (1, 5, 9, 40):  # 9 and 40 take the MKL path
        x = torch.randn(T, 96, generator=g)
        torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 9, 33, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_wide_linear_in_slices_matches_torch(M, bias):
    torch.manual_seed(M)
    layer = Linear(48, 2500, bias=bias)  # 2500 rows: two full 1024-row slices and a 452-row tail
    layer.weight.data.normal_()
    if bias:
        layer.bias.data.normal_()
    x = torch.randn(M, 48)
    ref = x.double() @ layer.weight.double().t() + (layer.bias.double() if bias else 0)
    got = layer.forward_wide(x)
    assert got.shape == (M, 2500) and got.is_contiguous()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_skinny_linear_refuses_what_it_cannot_take():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    assert cpu_native.skinny_linear_t(x.double(), w.double(), None) is None
    assert cpu_native.skinny_linear_t(x, w.t().contiguous().t(), None) is None  # non-contiguous weight


@pytest.mark.parametrize("D,BS,ctx_lens,H,KVH", [(64, 16, [1, 17, 40, 64], 6, 2), (40, 4, [5, 12, 1], 6, 2),
                                                  (8, 64, [130, 3], 6, 2), (64, 64, [200, 3, 64], 9, 1),
                                                  (128, 16, [1, 33, 70], 6, 2),
                                                  (64, 16, [(7 * i) % 50 + 1 for i in range(24)], 9, 3)])
def test_native_paged_decode_matches_dense_and_torch_path(D, BS, ctx_lens, H, KVH):
    """Head sizes 64 and 128 take the 512-bit kernel where the CPU has it (query heads in register groups
    of 4 or 2 per KV head, and the rest one by one); others the generic one. The 24-sequence case hands
    the tasks out in chunks of several, each read behind one read-ahead cursor."""
    q, k, v, bt, ctx = paged_inputs(len(ctx_lens), H, KVH, D, BS, ctx_lens, seed=D)
    kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [blocks, KVH, BS, D]
    out = cpu_native.paged_decode(q, kc, vc, bt.to(torch.int32), ctx.to(torch.int32), 0.125)
    torch.testing.assert_close(out, dense_reference(q, k, v, bt, ctx, 0.125), rtol=1e-5, atol=1e-5)
    meta = AttentionMetadata(positions=ctx - 1, slot_blocks=bt[:, 0], slot_offsets=ctx * 0, num_decode=len(ctx_lens),
                             decode_ctx_lens=ctx, decode_block_tables=bt)
    torch.testing.assert_close(out, torch_decode(q, kc, vc, meta, 0.125), rtol=1e-5, atol=1e-5)


def test_native_decode_falls_back_to_torch_for_int64_tables():
    q, k, v, bt, ctx = paged_inputs(2, 4, 2, 16, 8, [9, 3])
    kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    assert cpu_native.paged_decode(q, kc, vc, bt, ctx, 0.25) is None
    meta = AttentionMetadata(positions=ctx - 1, slot_blocks=bt[:, 0], slot_offsets=ctx * 0, num_decode=2,
                             decode_ctx_lens=ctx, decode_block_tables=bt)
    torch.testing.assert_close(cpu_native.native_decode(q, kc, vc, meta, 0.25), dense_reference(q, k, v, bt, ctx, 0.25),
                               rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("gemm,M", [("onednn", 9), ("onednn", 64), ("native", 2), ("native", 9), ("native", 64),
                                    ("native", 257), ("native", 521)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_a_float64_reference(gemm, M, bias, monkeypatch):
    """200 outputs: four 48-wide panel tiles and one of 8 (a partial 16-output panel, masked stores). The
    panel products take rows 256 at a time: 257 leaves one row for the last chunk, 521 nine."""
    from engine.kernels import cpu_gemm
    if not cpu_gemm.backend_available(gemm):
        pytest.skip(f"no {gemm} products on this machine")
    monkeypatch.setattr(cpu_gemm, "_choice", gemm)
    torch.manual_seed(M)
    lin = Linear(96, 200, bias=bias)
    lin.weight.data.normal_()
    if bias:
        lin.bias.data.normal_()
    assert cpu_gemm.pack_model(lin) == 1
    assert isinstance(lin.packed, cpu_gemm.Panels) == (gemm == "native")
    x = torch.randn(M, 96)
    ref = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    for y in (lin(x), lin.forward_t(x).t(), lin.forward_wide(x)):
        assert y.shape == (M, 200)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    few = torch.randn(1 if gemm == "native" else 3, 96)  # the skinny kernel's range keeps the plain weight
    assert lin.packed_for(few) is None


@pytest.mark.parametrize("M", [2, 40, 521])
def test_panel_products_with_more_threads_than_cores_compute_each_tile_once(M):
    """Seven threads on a host with fewer cores: threads are descheduled mid-product and the others take
    their tiles (a thread that runs out takes tiles from the far end of another's range). Each tile must be
    computed exactly once: a tile done twice would add twice where a product accumulates (a layer's o and
    down products add into the residual), and one skipped would leave its outputs unset. 1000 outputs are 21
    tiles; 521 rows are three 256-row chunks, each a separate round of ranges. Oracle: float64 products."""
    from engine.kernels import cpu_gemm, cpu_native
    if not cpu_gemm.backend_available("native"):
        pytest.skip("no panel products (AVX-512 native kernels) on this machine")
    torch.manual_seed(M)
    w, b, x = torch.randn(1000, 64), torch.randn(1000), torch.randn(M, 64)
    packed = cpu_gemm.pack(w, "native")
    ref = x.double() @ w.double().t() + b.double()
    threads, steals = torch.get_num_threads(), cpu_native.panel_steals()
    torch.set_num_threads(7)
    try:
        for _ in range(30):
            y = cpu_gemm.linear(x, packed, b)
            assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    finally:
        torch.set_num_threads(threads)
    if len(os.sched_getaffinity(0)) < 7:  # oversubscribed: some tiles must have changed hands
        assert cpu_native.panel_steals() > steals


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


def test_released_weights_leave_every_product_to_the_panels(monkeypatch):
    """pack_model(release=True) frees each panel-packed row-major weight (not one the model shares between two
    modules, like a tied LM head); products of any number of rows, one included, then run on the panels,
    against a float64 reference taken before."""
    from engine.kernels import cpu_gemm
    from engine.layers.linear import Linear
    if not cpu_gemm.backend_available("native"):
        pytest.skip("no panel products (AVX-512 native kernels) on this machine")
    monkeypatch.setattr(cpu_gemm, "_choice", "native")
    torch.manual_seed(3)
    model = torch.nn.Module()
    model.a, model.b, model.tied = Linear(40, 70, bias=True), Linear(70, 40), Linear(70, 40)
    for m in (model.a, model.b):
        m.weight.data.normal_()
    model.a.bias.data.normal_()
    model.tied.weight = model.b.weight  # one parameter in two modules: neither may free it
    ref = {n: (m.weight.double().clone(), None if m.bias is None else m.bias.double().clone())
           for n, m in (("a", model.a), ("b", model.b))}
    assert cpu_gemm.pack_model(model, release=True) == 3
    assert model.a.released and model.a.weight.numel() == 0
    assert not model.b.released and not model.tied.released and model.b.weight.shape == (40, 70)
    for M in (1, 2, 5, 20):
        x = torch.randn(M, 40)
        w, b = ref["a"]
        y = model.a(x)
        expect = x.double() @ w.t() + b
        assert y.shape == (M, 70) and float((y.double() - expect).abs().max() / expect.abs().max()) < 1e-5


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_stream_for_one_or_two_rows_matches_a_float64_reference(M, bias):
    """One and two token rows take the panel-by-panel stream: 37 inputs (not a multiple of its four FMA
    chains) and 200 outputs (a partial last panel, masked stores)."""
    from engine.kernels import cpu_gemm
    if not cpu_gemm.backend_available("native"):
        pytest.skip("no panel products (AVX-512 native kernels) on this machine")
    torch.manual_seed(M)
    w, b, x = torch.randn(200, 37), torch.randn(200), torch.randn(M, 37)
    y = cpu_gemm.linear(x, cpu_gemm.pack(w, "native"), b if bias else None)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert y.shape == (M, 200)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_cpu_gemm_setting_is_validated(monkeypatch):
    from engine.kernels import cpu_gemm
    monkeypatch.setattr(cpu_gemm, "_choice", None)
    monkeypatch.setenv(cpu_gemm.ENV, "fast")
    with pytest.raises(ValueError, match="RAYLM_CPU_GEMM='fast': allowed values are auto, native, onednn, mkl"):
        cpu_gemm.backend()
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    assert cpu_gemm.backend() == "mkl"
    monkeypatch.setattr(cpu_gemm, "_choice", None)
    monkeypatch.setattr(cpu_gemm, "native_available", lambda: False)
    monkeypatch.setenv(cpu_gemm.ENV, "native")
    with pytest.raises(ValueError, match="RAYLM_CPU_GEMM='native': that backend is not available"):
        cpu_gemm.backend()


def test_gemm_choice_weighs_each_weight_shape_by_how_many_layers_have_it(monkeypatch):
    """``auto`` is decided on the model's own products: every dense weight shape, timed once and counted as
    often as the model has it (a shape MKL wins once must not outweigh one a packed backend wins in every
    layer)."""
    from engine.kernels import cpu_gemm
    if not cpu_gemm.onednn_available():
        pytest.skip("this torch has no oneDNN linear ops")
    monkeypatch.setattr(cpu_gemm, "native_available", lambda: False)  # MKL against oneDNN alone
    model, _ = _random_model(False, seed=3, heads=(6, 2, 8))  # hidden 48, intermediate 80, 2 layers, vocab 64
    # hand-counted [out, in] shapes: qkv (6 + 2 * 2) * 8 = 80 rows, o, gate_up 2 * 80, down, the LM head
    expected = {(80, 48): 2, (48, 48): 2, (160, 48): 2, (48, 80): 2, (64, 48): 1}
    packed_shapes, timed = [], []
    real_pack = cpu_gemm.pack
    monkeypatch.setattr(cpu_gemm, "pack", lambda w, b=None: packed_shapes.append(tuple(w.shape)) or real_pack(w, b))

    def fake_medians(fns, reps=11):  # (MKL s, oneDNN s): the LM head favours MKL by 20 ms, layers oneDNN by 3
        timed.append(packed_shapes[-1])
        return [0.0, 0.020] if packed_shapes[-1] == (64, 48) else [0.004, 0.001]
    monkeypatch.setattr(cpu_gemm, "_interleaved_medians", fake_medians)
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    monkeypatch.setattr(cpu_gemm, "_choice", None)
    assert cpu_gemm.pack_model(model) == 9  # weighted: MKL 8 * 4 = 32 ms against oneDNN 20 + 8 * 1 = 28 ms
    assert sorted(timed) == sorted(expected)  # each shape timed once
    assert cpu_gemm._choice == "onednn"
    monkeypatch.setattr(cpu_gemm, "_choice", None)
    assert cpu_gemm.backend([torch.randn(*s) for s in expected]) == "mkl"  # one of each: 16 ms against 24 ms
