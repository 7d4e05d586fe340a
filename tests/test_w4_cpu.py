"""W4A16 products on CPU (engine/kernels/w4_cpu.py, csrc/w4_panels.c): the native kernel over 4-bit panels
(the AVX-512 form where the CPU has it, and the AVX2 form, compiled here with AVX-512 switched off) against the
float64 product with the weights dequantized by the torch reference (awq_torch.dequantize_awq), and the AWQ
layer on those panels against the dequantizing layer."""
import ctypes
import shutil
import subprocess

import pytest
import torch

from awq_random import random_awq, rms
from engine.kernels import w4_cpu
from engine.kernels.awq_torch import dequantize_awq

pytestmark = pytest.mark.skipif(not w4_cpu.available(), reason="the native 4-bit products need AVX2 and a C compiler")


def panels(K, N, G, seed=0):
    _, _, s, qw, qz = random_awq(K, N, G, seed)
    return w4_cpu.W4Panels.from_awq(qw, qz, s), dequantize_awq(qw, qz, s).double()


def test_panels_keep_the_weights():
    p, w = panels(96, 40, 32)  # 40 outputs: padded to the kernel's block inside, not outside
    assert p.out_features == 40 and p.in_features == 96 and p.group_size == 32
    assert p.codes.dtype == torch.uint8 and p.codes.numel() * 2 == 96 * -(-40 // w4_cpu._block()) * w4_cpu._block()
    torch.testing.assert_close(p.weight_t().double(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("K, N, G", [(64, 40, 32), (576, 96, 64), (256, 48, 128), (128, 8, 64)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 40])
def test_w4_linear_matches_the_dequantized_product(K, N, G, M):
    p, w = panels(K, N, G, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K + M))
    bias = torch.randn(N)
    ref = x.double() @ w
    for b in (None, bias):
        y = w4_cpu.linear(x, p, b)
        assert y.shape == (M, N) and y.is_contiguous()
        want = ref if b is None else ref + b.double()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_avx2_form_matches_the_dequantized_product(tmp_path):
    """The kernels a CPU with AVX2 but without AVX-512 runs: w4_panels.c compiled with AVX-512 switched off."""
    from engine.kernels import cpu_native
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    so_path = tmp_path / "w4_portable.so"
    flags = [f for f in cpu_native.FLAGS if f != "-march=native"] + ["-march=native", "-mno-avx512f"]
    subprocess.run([cc, *flags, str(cpu_native.CSRC / "w4_panels.c"), "-o", str(so_path)], check=True)
    so = ctypes.CDLL(str(so_path))
    so.w4_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
    assert so.w4_available() == 256  # the AVX2 form, whatever this CPU has
    for K, N, G, M in [(64, 40, 32, 1), (576, 96, 64, 3), (128, 8, 64, 8), (256, 48, 128, 13), (64, 40, 32, 40)]:
        p, w = panels(K, N, G, seed=M)
        x, b = torch.randn(M, K), torch.randn(N)
        y = torch.empty(M, N)
        so.w4_linear(x.data_ptr(), p.codes.data_ptr(), p.pairs.data_ptr(), b.data_ptr(), y.data_ptr(), M, N, K, G,
                     2)
        want = x.double() @ w + b.double()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_awq_layer_on_cpu_panels_matches_the_dequantizing_layer():
    from engine.layers.awq_linear import AwqLinear, use_cpu_layout

    def layer(bias):
        m = AwqLinear(128, [("gate", 64), ("up", 64)], 32, bias=bias)
        for i, part in enumerate(("gate", "up")):
            _, _, s, qw, qz = random_awq(128, 64, 32, seed=i)
            m.load("qweight", qw, part)
            m.load("qzeros", qz, part)
            m.load("scales", s, part)
            if bias:
                m.load("bias", torch.linspace(-1, 1, 64), part)
        return m
    ref, fast = layer(True), layer(True)
    w = ref.weight_t(torch.float64)
    assert use_cpu_layout(torch.nn.ModuleList([fast])) == 1
    assert isinstance(fast.packed, w4_cpu.W4Panels) and fast.qweight.numel() == 0  # held once, as panels
    x, res = torch.randn(5, 128), torch.randn(5, 128)
    want = x.double() @ w + ref.bias.double()
    torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.forward_t(x).double(), want.t(), rtol=1e-5, atol=1e-5)
    nw = torch.rand(128) + 0.5
    y, r = fast.forward_normed(x, res, nw, 1e-5)
    torch.testing.assert_close(r, x + res)
    torch.testing.assert_close(y.double(), rms(x + res, nw).double() @ w + ref.bias.double(), rtol=1e-5, atol=1e-5)
    down = AwqLinear(64, [("", 128)], 32)
    _, _, s, qw, qz = random_awq(64, 128, 32, seed=7)
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", s)):
        down.load(name, t)
    wd = down.weight_t(torch.float64)
    use_cpu_layout(down)
    gu = torch.randn(3, 128)
    act = torch.nn.functional.silu(gu[:, :64]) * gu[:, 64:]
    torch.testing.assert_close(down.forward_gated(gu).double(), act.double() @ wd, rtol=1e-5, atol=1e-5)
