"""`quantization_config` of a checkpoint's config.json: which quantized layer types to build."""
from __future__ import annotations

from typing import Any, Dict

SUPPORTED_METHODS = ("awq",)


def read_quant_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """{} for a full-precision checkpoint; the validated AWQ settings otherwise (clear errors)."""
    q = cfg.get("quantization_config")
    if not q:
        return {}
    method = str(q.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"quantization_config.quant_method: {q.get('quant_method')!r} is not supported; "
                         f"supported: {list(SUPPORTED_METHODS)}")
    bits = q.get("bits", q.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"quantization_config.bits: {bits} is not supported; supported: [4]")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version: {q.get('version')!r} is not supported; supported: ['gemm']")
    group = q.get("group_size", q.get("q_group_size", 128))
    if group not in (32, 64, 128):
        raise ValueError(f"quantization_config.group_size: {group} is not supported; supported: [32, 64, 128]")
    if q.get("zero_point", True) is not True:
        raise ValueError("quantization_config.zero_point: only asymmetric (zero_point: true) AWQ is supported")
    keep = q.get("modules_to_not_convert") or []
    if not (isinstance(keep, list) and all(isinstance(k, str) and k for k in keep)):
        raise ValueError(f"quantization_config.modules_to_not_convert: {keep!r} is not allowed; a list of module "
                         "names (as AutoAWQ writes it: e.g. [\"down_proj\"]), or null")
    return {"method": method, "bits": bits, "group_size": group, "not_convert": keep}
