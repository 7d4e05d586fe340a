"""Engine configuration: one typed object, validated once at construction."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EngineConfig(BaseModel):
    """Everything that shapes an engine instance. Field units are in the descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: Optional[str] = Field(
        None, description="Local Hugging Face folder, a .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight and activation dtype; auto = float32 on CPU, float16 on GPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks cuda when present")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree: devices (GPUs, or CPU worker processes) per "
                                         "engine, each a Ray worker actor holding a shard of the model")
    tp_worker_cpus: float = Field(
        1.0, gt=0, description="Logical Ray CPUs each tp worker reserves when the engine creates its own "
                               "placement group (offline use)")
    tp_placement: Literal["STRICT_PACK", "PACK"] = Field(
        "STRICT_PACK", description="Placement strategy of the tp workers' bundles: one node, or PACK across nodes")
    quant_policy: Literal[0, 4, 8] = Field(
        0, description="KV-cache quantization: 0 = off, 8 = int8, 4 = int4, asymmetric per token and head "
                       "(LMDeploy's knob)")
    kv_qparams: Optional[str] = Field(
        None, description="With quant_policy 8 or 4: static per-layer, per-head K/V parameters from "
                          "`python -m quant_jobs kv_qparams` (its .safetensors file, folder or work dir) instead of "
                          "each token's own range")
    block_size: int = Field(64, ge=1, le=1024, description="Tokens per KV-cache block")
    cache_max_entry_count: Optional[float] = Field(
        None, gt=0,
        description="KV-cache budget: a fraction in (0,1) of free device memory after weights load; "
                    "a whole number >= 1 is a block count on GPU, or a size in GiB on CPU. "
                    "Default: 0.8 on GPU, 2 GiB on CPU")
    num_cpu_blocks: Optional[int] = Field(
        None, ge=1, description="Explicit KV block count; overrides cache_max_entry_count (tests, tight budgets)")
    max_batch_size: int = Field(64, ge=1, description="Most sequences in one step")
    max_prefill_tokens: int = Field(2048, ge=1, description="Token budget per step (prefill chunks plus one token per decode)")
    session_len: Optional[int] = Field(
        None, ge=2, description="Most tokens per sequence, prompt plus output; default the model's context length")
    enable_prefix_caching: bool = Field(False, description="Share full KV blocks between requests with the same prefix")
    rope_scaling_factor: float = Field(
        0.0, ge=0.0, description="Dynamic NTK RoPE scaling factor for contexts beyond max_position_embeddings; 0 = off")
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads of the stepping thread; default: every core this process may run on")
    seed: int = Field(0, description="Seed for requests that give none")
    num_speculative_tokens: int = Field(
        0, ge=0, le=16, description="Speculative decoding by prompt lookup (vLLM's ngram method): up to this many "
                                    "draft tokens per sequence and step, verified in the same pass (greedy outputs "
                                    "unchanged, sampled ones keep their distribution); 0 = off")
    speculative_max_rows: int = Field(
        48, ge=1, description="Most decode rows per step, drafts included: drafts cost compute, so large batches "
                              "take fewer (those found by the longest n-grams first)")
    prompt_lookup_max: int = Field(4, ge=1, le=16, description="Longest n-gram matched to find drafts")
    prompt_lookup_min: int = Field(1, ge=1, le=16, description="Shortest n-gram matched to find drafts")
    matmul_precision: Literal["highest", "high"] = Field(
        "highest", description="CPU float32 products (torch's names): highest = IEEE float32; high = on processors "
                               "with AMX, products of 16+ tokens as three bfloat16 tile products (bf16x3: 2-3x the "
                               "float32 rate, about 1e-6 relative error instead of 1e-7); elsewhere the same as highest")
    gguf_weights: Literal["dequantize", "native"] = Field(
        "dequantize", description="A .gguf model (the embedded default included): dequantize = every weight converted "
                                  "to float32 (once, cached); native = its Q4_0/Q4_1/Q4_K linear weights kept 4-bit and "
                                  "computed by the native CPU kernels (the same weights at about a fifth of the bytes; CPU, "
                                  "float32, tp 1, GGUF architecture llama or qwen2; products in other types stay "
                                  "float32)")
    eager_mode: bool = Field(
        False, description="GPU: run every step eagerly; by default decode steps of up to max_batch_size sequences "
                           "replay CUDA graphs captured at start (LMDeploy's eager_mode)")

    @field_validator("cache_max_entry_count")
    @classmethod
    def _budget(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("cache_max_entry_count: a fraction in (0,1) or a whole number >= 1 (blocks on GPU, GiB on CPU)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min: must not exceed prompt_lookup_max")
        if self.device == "cpu" and self.dtype in ("float16",):
            raise ValueError("dtype: float16 is not supported on CPU; use float32 or bfloat16")
        if self.gguf_weights == "native":
            if self.tp > 1:
                raise ValueError("gguf_weights: native runs in one process; use tp 1")
            if self.device == "cuda" or self.dtype not in ("auto", "float32"):
                raise ValueError("gguf_weights: native runs on CPU in float32; set device cpu (or auto without a "
                                 "GPU) and dtype auto or float32")
        return self


def resolve_device(cfg: EngineConfig) -> str:
    import torch
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and cfg.tp == 1 and not torch.cuda.is_available():
        # (with tp > 1 the GPUs belong to the worker actors, not to the process that drives them)
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return cfg.device


def resolve_dtype(cfg: EngineConfig, device: str):
    import torch
    if cfg.dtype == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, cfg.dtype)


def budget_kind(value: Union[int, float]) -> str:
    """'fraction' for (0,1), 'count' otherwise."""
    return "fraction" if 0 < value < 1 else "count"
