"""The W4A16 products that make their own input as they load x (engine/kernels/awq_input.py): SiLU(gate) * up
for the down projection, RMSNorm(x + residual) * weight for q/k/v and gate/up, against torch (interpreted on
CPU; GPU-marked tests at real sizes)."""
import pytest
import torch

from awq_random import random_awq, rms
from engine.kernels.awq_torch import awq_matmul_reference, dequantize_awq


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
        ref = awq_matmul_reference(rms(x, w), qw, qz, s.float())

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
    ref16 = rms(x16, w16, dtype=torch.float16).float() @ dequantize_awq(qw, qz, s, torch.float16).float()
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
                ref = rms(x, nw, dtype=torch.float16).float() @ w
                assert torch.allclose(y.float(), ref, atol=3e-2, rtol=2e-2), (kpack, m)
                assert torch.equal(res, x)
