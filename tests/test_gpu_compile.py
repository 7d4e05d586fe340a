"""The W4A16 Triton kernels (the forms that make their input included), the fused RoPE + attention decode
kernel, the RoPE + quantized K/V write kernel and the split quantized attention compiled for NVIDIA GPUs on
this machine, GPU or not: Triton's wheel carries ptxas, so a form the interpreter runs but the GPU compiler
refuses (a layout it cannot lower, registers or shared memory past the limits) fails here rather than first
on a lent GPU. Counting the compiled code is bench/sass_gemv.py's business; this checks that each form
compiles to a cubin for sm_80 and sm_90.

The compiles run in a subprocess without TRITON_INTERPRET (the test session interprets kernels on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

# (kernel, tile, K, N, group, rows[, xmode]): the one-row FMA kernel's forms, and the tensor-core kernels over
# both layouts at one row and at the 32 to 255 rows they take in batches (row tiles of 16, 32 and 64); xmode
# (awq_input.py): 1 the down projection reading the fused gate/up output, 2 and 3 the products that norm
# their input
CASES = [
    ("kpack", [256, 128, 4, 0, 0, 0, 0], 11008, 4096, 128, 1),
    ("kpack", [1024, 128, 4, 2, 32, 4, 1], 11008, 4096, 128, 1),
    ("kpack", [32, 0, 4, 1, 128, 4, 1], 11008, 4096, 128, 1),
    ("tc", [128, 128, 4, 0, 0, 0], 4096, 12288, 128, 1),
    ("tc", [128, 128, 4, 0, 1, 0], 4096, 12288, 128, 32),
    ("tc", [256, 128, 4, 0, 1, 1], 4096, 12288, 128, 1),
    ("kpack_tc", [128, 128, 4, 0, 1, 0], 4096, 12288, 128, 1),
    ("kpack_tc", [128, 128, 4, 0, 1, 0], 4096, 12288, 128, 200),
    ("kpack_tc", [64, 32, 2, 0, 1, 0], 576, 3072, 32, 8),
    ("kpack", [1024, 128, 4, 2, 32, 4, 1], 11008, 4096, 128, 1, 1),
    ("kpack", [256, 128, 4, 1, 0, 0, 1], 11008, 4096, 128, 1, 1),
    ("tc", [128, 128, 4, 0, 1, 0], 11008, 4096, 128, 1, 1),
    ("kpack_tc", [128, 128, 4, 0, 1, 0], 11008, 4096, 128, 32, 1),
    ("kpack", [256, 128, 4, 0, 0, 0, 0], 4096, 12288, 128, 1, 2),
    ("kpack", [32, 0, 4, 1, 128, 4, 1], 4096, 22016, 128, 1, 2),
    ("kpack", [512, 64, 4, 2, 0, 0, 1], 4096, 12288, 128, 1, 3),
    ("tc", [128, 128, 4, 0, 1, 0], 4096, 22016, 128, 1, 2),
    ("tc", [128, 128, 4, 0, 0, 0], 4096, 12288, 128, 64, 3),
    ("kpack_tc", [128, 128, 4, 0, 1, 0], 4096, 22016, 128, 16, 2),
]

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench.sass_gemv import compile_tc, compile_tile
from engine.kernels.awq_tc import TcTile
from engine.kernels.awq_gemv import GemvTile
out = []
for arch in (80, 90):
    for kind, tile, K, N, G, M, *xmode in json.loads(sys.argv[2]):
        try:
            if kind == "kpack":
                c, _ = compile_tile(GemvTile(*tile), K, N, G, arch, xmode=sum(xmode))
            else:
                c, _ = compile_tc(TcTile(*tile), K, N, G, arch, kpack=kind == "kpack_tc", M=M, xmode=sum(xmode))
            out.append([arch, kind, tile, M, len(c.asm["cubin"]) > 0, ""])
        except Exception as e:
            out.append([arch, kind, tile, M, False, f"{type(e).__name__}: {str(e)[:300]}"])
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton


def compile_kernel(fn, sig, const, name, tag):  # one attention-side kernel, both archs
    for arch in (80, 90):
        try:
            src = ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in const}), constexprs=const)
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            out.append([arch, name, tag, 1, len(c.asm["cubin"]) > 0, ""])
        except Exception as e:
            out.append([arch, name, tag, 1, False, f"{type(e).__name__}: {str(e)[:300]}"])


def ints(*names):
    return {k: "i32" for k in names}


from engine.kernels.rope_decode_triton import _rope_decode_kernel
sig = {"qkv_ptr": "*fp16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_ptr": "*fp16", "v_ptr": "*fp16",
       "blk_ptr": "*i64", "off_ptr": "*i64", "bt_ptr": "*i32", "ctx_ptr": "*i32", "fresh_ptr": "*i32",
       "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "scale": "fp32", "CHUNK": "i32",
       **ints("s_t", "s_c", "s_kb", "s_kh", "s_ks", "s_btb", "s_ot", "s_oh", "H", "KVH")}
for G, HALF, S in ((1, 64, 1), (3, 32, 4)):  # Llama-2-7B's heads; SmolLM2's 9 heads over 3 KV heads, split
    compile_kernel(_rope_decode_kernel, sig, {"G": G, "G_PAD": 4 if G == 3 else 1, "HALF": HALF, "BS": 64,
                                              "SPLITS": S}, "rope_decode", [G, HALF, S])
from engine.kernels.rope_write_quant import _rope_write_quant_kernel
sig = {"qkv_ptr": "*fp16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_out_ptr": "*fp16", "kd_ptr": "*u8",
       "kp_ptr": "*fp16", "vd_ptr": "*u8", "vp_ptr": "*fp16", "blk_ptr": "*i64", "off_ptr": "*i64",
       **ints("s_t", "s_c", "s_qt", "s_qh", "s_db", "s_dh", "s_ds", "s_pb", "s_ph", "s_ps", "H", "KVH")}
for bits in (8, 4):
    compile_kernel(_rope_write_quant_kernel, sig, {"HALF": 64, "BITS": bits, "STATIC": bits == 4},
                   "rope_write_quant", [bits])
from engine.kernels.paged_attention_quant_triton import _paged_decode_quant_kernel
sig = {"q_ptr": "*fp16", "kd_ptr": "*u8", "kp_ptr": "*fp16", "vd_ptr": "*u8", "vp_ptr": "*fp16", "bt_ptr": "*i32",
       "ctx_ptr": "*i32", "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "sm_scale": "fp32", "CHUNK": "i32",
       **ints("s_qb", "s_qh", "s_db", "s_dh", "s_ds", "s_pb", "s_ph", "s_ps", "s_btb", "s_ob", "s_oh", "KVH")}
for bits, S in ((8, 1), (4, 4)):
    compile_kernel(_paged_decode_quant_kernel, sig, {"G": 1, "G_PAD": 1, "W": 128 if bits == 8 else 64, "BS": 64,
                                                     "BITS": bits, "SPLITS": S}, "quant_decode", [bits, S])
print(json.dumps(out))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_w4a16_kernels_compile_for_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), json.dumps(CASES)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(CASES) + 12
    failed = [r for r in results if not r[4]]
    assert not failed, failed
