"""One call of each one-row W4A16 kernel (AutoAWQ layout, K-packed) on 4096x4096 at its default tile, for
Nsight Compute (bench/gpu_session.sh with NCU=1):
    ncu --clock-control none -k regex:gemv --metrics ... python3 bench/ncu_gemv.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.kernels.awq_torch import repack_kpack  # noqa: E402
from engine.kernels.awq_gemv import awq_gemv, kpack_gemv  # noqa: E402

K = N = 4096
qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), dtype=torch.int32, device="cuda")
qz = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // 128, N // 8), dtype=torch.int32, device="cuda")
s = (torch.rand(K // 128, N, device="cuda") * 0.01).half()
x = torch.randn(1, K, device="cuda", dtype=torch.float16)
awq_gemv(x, qw, qz, s)
kpack_gemv(x, *repack_kpack(qw, qz), s)
torch.cuda.synchronize()
