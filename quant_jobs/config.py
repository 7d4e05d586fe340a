"""Typed options of each step (validated once; a bad value names the field and what is allowed)."""
from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class CalibOptions(_Options):
    model: Optional[str] = Field(None, description="model folder, .gguf file or cached hub id; None = embedded SmolLM2")
    work_dir: str = Field("./work_dir", description="where statistics, search results and outputs go")
    calib_dataset: str = Field("wikitext2", description="wikitext2 | c4 | pileval | a .txt/.jsonl/.parquet file")
    calib_samples: int = Field(128, ge=1, le=100_000, description="calibration windows")
    calib_seqlen: int = Field(512, ge=16, description="tokens per calibration window")
    device: Device = Field("auto", description="where tasks compute: cuda when the cluster has GPUs, else cpu")
    dtype: DType = Field("auto", description="compute dtype: float16 on GPU, float32 on CPU by default")
    parallel: bool = Field(True, description="spread shards and layers over the Ray cluster (else in process)")
    workers: Optional[int] = Field(None, ge=1, description="parallel tasks; default one per GPU (CPU) of the cluster")


class AwqOptions(CalibOptions):
    w_bits: int = Field(4, description="weight bits (AutoAWQ GEMM packs 4)")
    w_group_size: int = Field(128, description="input channels sharing a scale and zero point: 32, 64 or 128")
    search_scale: bool = Field(True, description="search activation-aware scales per layer")
    clip: bool = Field(True, description="search weight clipping (q and k are never clipped)")
    rtn: bool = Field(False, description="plain round-to-nearest: no search at all (the baseline)")
    dst: Optional[str] = Field(None, description="output checkpoint folder; default <work_dir>/quantized")

    @field_validator("w_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v != 4:
            raise ValueError(f"w_bits: {v} is not supported; the AutoAWQ GEMM layout packs 4-bit weights only")
        return v

    @field_validator("w_group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError(f"w_group_size: {v} is not supported; use 32, 64 or 128")
        return v


class KvOptions(_Options):
    work_dir: str = Field("./work_dir", description="a work dir holding calib_stats.safetensors")
    kv_sym: bool = Field(False, description="symmetric (absmax) instead of asymmetric (min/max) parameters")
    num_tp: int = Field(1, ge=1, description="also write per-rank files with each rank's KV heads")


class PplOptions(_Options):
    model: Optional[str] = Field(None, description="full-precision model or an AWQ checkpoint; None = embedded")
    work_dir: Optional[str] = Field(None, description="a quant work dir: adds RTN, AWQ (fake) and packed rows")
    variants: Optional[List[Literal["fp", "rtn", "awq", "packed"]]] = Field(
        None, description="rows to evaluate; default fp plus what the work dir holds")
    w_group_size: Optional[int] = Field(None, description="group size for the rtn/awq rows; default the work dir's")
    seqlen: int = Field(2048, ge=16, description="tokens per evaluation window")
    limit: Optional[int] = Field(None, ge=1, description="evaluate only the first N windows")
    eval_file: Optional[str] = Field(None, description="WikiText-2 raw test file; default found under RAYLM_DATA")
    device: Device = "auto"
    dtype: DType = "auto"
    output: Optional[str] = Field(None, description="JSON result path; default <work_dir>/ppl.json or ./ppl.json")
