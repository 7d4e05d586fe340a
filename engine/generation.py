"""Per-request generation parameters (LMDeploy's GenerationConfig), validated with clear errors."""
from __future__ import annotations

from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GenerationConfig(BaseModel):
    """Sampling and stopping parameters for one request."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(512, ge=1, description="Most tokens to generate")
    min_new_tokens: int = Field(0, ge=0, description="End tokens and stop strings are ignored before this many tokens")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass, in (0, 1]")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability")
    repetition_penalty: float = Field(1.0, gt=0.0, description="CTRL-style penalty on seen tokens; 1 = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from seen tokens' logits")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted per occurrence from logits")
    seed: Optional[int] = Field(None, description="Same seed, same output")
    ignore_eos: bool = Field(False, description="Keep generating past end tokens")
    stop: List[str] = Field(default_factory=list, description="Strings that end generation (not included in the output)")
    stop_token_ids: List[int] = Field(default_factory=list, description="Token ids that end generation")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="Return the sampled token's logprob and this many top ones")
    skip_special_tokens: bool = Field(True, description="Drop special tokens from the text")
    do_sample: Optional[bool] = Field(None, description="False forces greedy; None decides from temperature")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Union[None, str, List[str]]):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if any((not isinstance(s, str)) or s == "" for s in v):
            raise ValueError("stop: each stop string must be a non-empty string")
        return list(v)

    @model_validator(mode="after")
    def _check(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens: must not exceed max_new_tokens")
        return self

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0.0 or self.top_k == 1
