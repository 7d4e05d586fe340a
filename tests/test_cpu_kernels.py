"""Native CPU kernels (engine/kernels/csrc/cpu_kernels.c) against torch references; whole layers built on them
are in test_cpu_layers.py."""
import os

import pytest
import torch

from engine.kernels import cpu_native
from engine.layers.attention import AttentionMetadata, torch_decode
from engine.layers.linear import Linear

from test_cpu_layers import _random_model
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


def test_tied_head_is_released_and_its_embedding_reads_the_panels(monkeypatch):
    """An LM head tied to an nn.Embedding (its only other use) is released too: the embedding is replaced by one
    that gathers its rows out of the head's panels, bit for bit the table's rows (a vocabulary of 37: a
    partial last panel), and the head's products of any size match a float64 reference."""
    from engine.kernels import cpu_gemm
    from engine.layers.linear import Linear
    if not cpu_gemm.backend_available("native"):
        pytest.skip("no panel products (AVX-512 native kernels) on this machine")
    monkeypatch.setattr(cpu_gemm, "_choice", "native")
    torch.manual_seed(4)
    model = torch.nn.Module()
    model.inner = torch.nn.Module()
    model.inner.embed, model.head = torch.nn.Embedding(37, 24), Linear(24, 37)
    model.head.weight = model.inner.embed.weight
    table = model.inner.embed.weight.detach().clone()
    assert cpu_gemm.pack_model(model, release=True) == 1
    assert model.head.released and model.head.weight.numel() == 0
    assert isinstance(model.inner.embed, cpu_gemm.PanelEmbedding)
    assert [p.numel() for p in model.parameters()] == [0]  # the table is held once, in the panels
    ids = torch.tensor([[0, 36, 15, 16], [17, 31, 32, 5]])
    rows = model.inner.embed(ids)
    assert rows.shape == (2, 4, 24) and torch.equal(rows, table[ids])
    for M in (1, 3, 20):
        x = torch.randn(M, 24)
        expect = x.double() @ table.double().t()
        y = model.head(x)
        assert y.shape == (M, 37) and float((y.double() - expect).abs().max() / expect.abs().max()) < 1e-5


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
