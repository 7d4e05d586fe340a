"""Static look at the W4A16 one-row kernel's candidate tiles, with no GPU: each is compiled by Triton for
an NVIDIA target (sm_90 by default; Triton's wheel carries ptxas), and its SASS is counted: registers,
local memory (spills), shared memory, weight loads by width, and the instructions a thread runs per weight
word it reads (the loop body once; the unrolled steps' words). Memory-bound kernels want wide loads, no
spills, no cross-thread shuffles or barriers in the loop, and few instructions per word.

    python bench/sass_gemv.py [--arch 90] [--shape 4096x4096] [--no-doc]
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import publish  # noqa: E402

SIG = {"x_ptr": "*fp16", "qw_ptr": "*i32", "z_ptr": "*fp16", "s_ptr": "*fp16", "out_ptr": "*fp16",
       "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "K": "i32", "ITERS": "i32", "sqw": "i32", "szg": "i32",
       "ssg": "i32"}
# the input's arguments (engine/kernels/awq_input.py), after each kernel's own
XSIG = {"UP": "i32", "r_ptr": "*fp16", "nw_ptr": "*fp16", "res_ptr": "*fp16", "eps": "fp32"}
ALU = ("FFMA", "FADD", "FMUL", "LOP3", "SHF", "IMAD", "IADD3", "I2F", "F2F", "PRMT", "FSEL", "SEL", "HFMA2",
       "HADD2", "HMUL2", "MOV")


def compile_tile(tile, K: int, N: int, G: int, arch: int, xmode: int = 0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.awq_gemv import _kpack_gemv_kernel, gemv_plan, nibble_form
    step, unroll, iters, split, _ = gemv_plan(tile, K, N, G)
    const = {"BN": tile.block_n, "G": G, "STEP": step, "UNROLL": unroll, "SPLIT_K": split,
             "NIBBLE_LOOP": nibble_form(tile, xmode), "MAGIC": tile.magic, "XMODE": xmode}
    sig = dict(SIG, **XSIG, **{k: "constexpr" for k in const})
    # as a launch specialises them: pointers and sizes divisible by 16 (so loads can be vectorised)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(SIG) if name not in ("ITERS",)}
    src = ASTSource(fn=_kpack_gemv_kernel, signature=sig, constexprs=const, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": tile.warps})
    return c, dict(step=step, unroll=unroll, iters=iters, split=split)


TC_SIG = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "out_ptr": "*fp16",
          "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KS": "i32", "sxm": "i32",
          "sqk": "i32", "szg": "i32", "ssg": "i32", "som": "i32"}


def compile_tc(tile, K: int, N: int, G: int, arch: int, sms: int = 132, kpack: bool = False, M: int = 1,
               xmode: int = 0):
    """A tensor-core kernel (awq_tc.py; ``kpack``: the K-packed one) at ``M`` rows, as its wrapper would
    launch it on ``sms`` SMs (``xmode``: how it makes its input, awq_input.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.awq_tc import _awq_tc_kernel, _kpack_tc_kernel, tc_plan
    BM, BK, split = tc_plan(tile, M, K, N, G, sms)
    const = {"G": G, "BM": BM, "BN": tile.block_n, "BK": BK, "SPLIT_K": split, **({} if kpack else {"FOLD": tile.fold}),
             "XMODE": xmode, "ROW1": M == 1 and xmode > 0}
    names = TC_SIG
    if kpack:  # the K-packed kernel's zeros are float16 and its weight stride is per word row
        names = {("z_ptr" if k == "qz_ptr" else "sqw" if k == "sqk" else k): ("*fp16" if k == "qz_ptr" else v)
                 for k, v in TC_SIG.items()}
    sig = dict(names, **XSIG, **{k: "constexpr" for k in const})
    # KS: whole K tiles
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name != "M"}
    src = ASTSource(fn=_kpack_tc_kernel if kpack else _awq_tc_kernel, signature=sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": tile.warps, **({"num_stages": tile.stages} if tile.stages else {})}
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return c, dict(step=BK, unroll=1, iters=-(-K // (split * BK)), split=split)


def sass_counts(cubin: bytes):
    bindir = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([str(bindir / "nvdisasm"), f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", res))
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)",
                                                               sass, re.M))
    return {k: int(v) for k, v in usage.items()}, ops


def analyse(tile, K, N, G, arch, kind=None, xmode: int = 0):
    from engine.kernels.awq_tc import TcTile
    kind = kind or ("tc" if isinstance(tile, TcTile) else "kpack")
    if kind == "kpack":
        c, plan = compile_tile(tile, K, N, G, arch, xmode)
    else:
        c, plan = compile_tc(tile, K, N, G, arch, kpack=kind == "kpack_tc", xmode=xmode)
    usage, ops = sass_counts(c.asm["cubin"])
    base = collections.Counter()
    for op, n in ops.items():
        base[op.split(".")[0]] += n
    words = plan["step"] // 8 * tile.block_n * plan["unroll"] / (32 * tile.warps)  # per thread, unrolled code
    ldg = {op: n for op, n in ops.items() if op.startswith("LDG")}
    wide = sum(n for op, n in ldg.items() if ".128" in op)
    alu = sum(base[o] for o in ALU)
    return {"kind": kind, "tile": list(tile), **plan, "regs": usage.get("REG"), "local": usage.get("LOCAL"),
            "shared": usage.get("SHARED"), "ldg": sum(ldg.values()), "ldg128": wide,
            "shfl": base["SHFL"], "bar": base["BAR"], "alu": alu, "words_per_thread": words,
            "alu_per_word": alu / words if words else None, "ffma": base["FFMA"], "lop3": base["LOP3"],
            "shf": base["SHF"], "fadd": base["FADD"]}


KINDS = {"kpack": "K-packed FMA", "kpack_tc": "tensor cores, K-packed", "tc": "tensor cores, AutoAWQ layout"}


def render(rows, arch, shape) -> str:
    lines = [f"## W4A16 one-row kernel tiles, static SASS view (`bench/sass_gemv.py`, sm_{arch}, {shape})", "",
             "Compiled by Triton for the GPU on a machine without one; counts are of the SASS (the loop body "
             "once; a split-K program runs its loop several times, its epilogue once). ALU per word: the "
             "instructions a thread runs per packed weight word it reads (8 weights); gated and normed: the "
             "same where the kernel makes its input as it loads x (`engine/kernels/awq_input.py`: SiLU(gate) "
             "* up for the down projection, RMSNorm(x + residual) * w for q/k/v and gate/up). Tiles as in "
             "`engine/kernels/awq_tune.py`.", "",
             "| kernel | tile | regs | spill (B) | shared (B) | global loads (128-bit) | shuffles | barriers | "
             "ALU per word | gated | normed |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def per_word(v):
        return "" if v is None else f"{v:.1f}"
    for r in rows:
        if "error" in r:
            lines.append(f"| {KINDS.get(r['kind'], r['kind'])} | {tuple(r['tile'])} | {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {KINDS[r['kind']]} | {tuple(r['tile'])} | {r['regs']} | {r['local']} | {r['shared']} | {r['ldg']} "
                     f"({r['ldg128']}) | {r['shfl']} | {r['bar']} | {r['alu_per_word']:.1f} | "
                     f"{per_word(r.get('gated_alu_per_word'))} | {per_word(r.get('normed_alu_per_word'))} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", default="4096x4096", help="KxN (group size 128)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    from engine.kernels.awq_tune import CANDIDATES, TC_CANDIDATES
    K, N = map(int, a.shape.split("x"))
    rows = []
    jobs = [(t, "kpack") for t in CANDIDATES] + [(t, "kpack_tc") for t in TC_CANDIDATES if t.fold] + \
        [(t, "tc") for t in TC_CANDIDATES]
    for tile, kind in jobs:
        try:
            rows.append(analyse(tile, K, N, 128, a.arch, kind))
            for xmode, name in ((1, "gated"), (2, "normed")):
                rows[-1][f"{name}_alu_per_word"] = analyse(tile, K, N, 128, a.arch, kind, xmode)["alu_per_word"]
        except Exception as e:  # noqa: BLE001 - a tile the compiler refuses: say so
            rows.append({"kind": kind, "tile": list(tile),
                         "error": f"{type(e).__name__}: {str(e)[:80]}"})
        print(rows[-1], flush=True)
    publish("sass_gemv", {"arch": a.arch, "shape": a.shape, "rows": rows}, render(rows, a.arch, a.shape),
            not a.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
