"""`python -m quant_jobs <step> ...` (the same command under `ray job submit --working-dir . -- ...`).

Steps mirror `lmdeploy lite`: calibrate, auto_awq, kv_qparams, eval_ppl. ``--config preset.yaml`` reads
defaults from a quantization job preset (see configs/); flags on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

from pydantic import ValidationError

from .config import AwqOptions, CalibOptions, KvOptions, PplOptions

STEPS = {"calibrate": CalibOptions, "auto_awq": AwqOptions, "kv_qparams": KvOptions, "eval_ppl": PplOptions}
BOOL = argparse.BooleanOptionalAction


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder, .gguf, or cached hub id (default: embedded SmolLM2)")
    p.add_argument("--work-dir")
    p.add_argument("--calib-dataset", help="wikitext2 | c4 | pileval | a .txt/.jsonl/.parquet file")
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-seqlen", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--parallel", action=BOOL, help="Ray tasks over the cluster (--no-parallel: in process)")
    p.add_argument("--workers", type=int, help="parallel tasks (default: one per GPU, or per CPU)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quant_jobs", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    for name in STEPS:
        p = sub.add_parser(name)
        p.add_argument("--config", help="a quantization job preset (YAML); flags override it")
        if name in ("calibrate", "auto_awq"):
            _add_calib(p)
        if name == "auto_awq":
            p.add_argument("--w-bits", type=int)
            p.add_argument("--w-group-size", type=int)
            p.add_argument("--search-scale", action=BOOL)
            p.add_argument("--clip", action=BOOL)
            p.add_argument("--rtn", action="store_true", default=None, help="round-to-nearest baseline, no search")
            p.add_argument("--dst", help="output folder (default <work-dir>/quantized)")
        if name == "kv_qparams":
            p.add_argument("--work-dir")
            p.add_argument("--kv-sym", action="store_true", default=None)
            p.add_argument("--num-tp", type=int)
        if name == "eval_ppl":
            p.add_argument("--model")
            p.add_argument("--work-dir")
            p.add_argument("--variants", help="comma list of fp,rtn,awq,packed")
            p.add_argument("--w-group-size", type=int)
            p.add_argument("--seqlen", type=int)
            p.add_argument("--limit", type=int)
            p.add_argument("--eval-file")
            p.add_argument("--device", choices=["auto", "cpu", "cuda"])
            p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
            p.add_argument("--output")
    return ap


def _preset(path: str, step: str) -> Dict:
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping")
    if data.get("step") not in (None, step):
        raise ValueError(f"config: {path} is a preset for step {data['step']!r}, not {step!r}")
    data.pop("step", None)
    return data


def options(ns: argparse.Namespace):
    fields = {k: v for k, v in vars(ns).items() if k not in ("step", "config") and v is not None}
    if "variants" in fields:
        fields["variants"] = [v.strip() for v in fields["variants"].split(",") if v.strip()]
    base = _preset(ns.config, ns.step) if ns.config else {}
    return STEPS[ns.step](**{**base, **fields})


def summary(res: Dict) -> str:
    from .ppl import ppl_table
    width = 72
    lines = ["=" * width, f" quant_jobs {res['step']}: done in {res.get('seconds', '?')} s"]
    if res["step"] == "eval_ppl":
        lines += [" " + line for line in ppl_table(res).splitlines()]
    for k, v in res.items():
        if k not in ("step", "seconds", "rows"):
            lines.append(f"   {k:<16} {v}")
    lines.append("=" * width)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("RAYLM_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ns = parser().parse_args(argv)
    try:
        opts = options(ns)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            print(f"error: {loc}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # an unreadable or mismatched preset
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import jobs, ppl
    run = {"calibrate": jobs.calibrate, "auto_awq": jobs.auto_awq, "kv_qparams": jobs.kv_qparams,
           "eval_ppl": ppl.eval_ppl}[ns.step]
    try:
        res = run(opts)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(res))
    print("RESULT " + json.dumps(res, default=str))
    return 0
