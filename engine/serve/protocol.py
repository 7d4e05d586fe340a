"""OpenAI request models (chat and completions) and their mapping onto GenerationConfig.

Unknown request fields are ignored, as OpenAI-compatible servers do; known fields are validated and a bad
value is answered with 400 naming the field (``param``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..generation import GenerationConfig

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI's, plus LMDeploy's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # LMDeploy / vLLM extras
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 16 or any(s == "" for s in items):
            raise ValueError("stop: up to 16 non-empty strings")
        return v

    def generation_config(self, max_tokens: Optional[int], logprobs: Optional[int]) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_tokens or 1 << 30, min_new_tokens=min(self.min_tokens, max_tokens or self.min_tokens),
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, ignore_eos=self.ignore_eos, stop=self.stop,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None

    def plain(self) -> Dict[str, str]:
        """Text parts joined; 'developer' is OpenAI's newer name for 'system'."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{i}]: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def to_engine(self) -> tuple:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return [m.plain() for m in self.messages], self.generation_config(max_tokens, lp)


class CompletionRequest(SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name}: not supported")
        return v

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise ValueError("prompt: must not be empty")
        return list(p)

    def to_engine(self) -> tuple:
        return self.prompts(), self.generation_config(self.max_tokens, self.logprobs)
