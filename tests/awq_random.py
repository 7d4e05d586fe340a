"""Random AutoAWQ tensors and an RMSNorm reference with torch's roundings, for the W4A16 tests."""
import torch

from engine.kernels.awq_torch import pack_columns


def random_awq(K, N, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.int32)
    s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
    return q, z, s, pack_columns(q), pack_columns(z)


def rms(x, w, eps=1e-5, dtype=None):
    """RMSNorm(x) * w, rounded to ``dtype`` after the normalisation and after the weight (as torch's float16
    layers and gpu_fused.add_rmsnorm round); float32 where dtype is None."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if dtype is None:
        return y * w.float()
    return (y.to(dtype).float() * w.float()).to(dtype)
