"""One call of the one-row W4A16 kernel at two tiles on 4096x4096, for Nsight Compute (bench/gpu_session.sh, NCU=1):
    ncu --clock-control none -k regex:gemv --metrics ... python3 bench/ncu_gemv.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.kernels.awq_triton import awq_gemv  # noqa: E402

K = N = 4096
qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K, N // 8), dtype=torch.int32, device="cuda")
qz = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // 128, N // 8), dtype=torch.int32, device="cuda")
s = (torch.rand(K // 128, N, device="cuda") * 0.01).half()
x = torch.randn(1, K, device="cuda", dtype=torch.float16)
for tile in ((8, 128, 4), (16, 32, 4)):
    awq_gemv(x, qw, qz, s, block_p=tile[0], block_k=tile[1], num_warps=tile[2])
torch.cuda.synchronize()
