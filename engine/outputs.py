"""What the engine hands back: per-step deltas and whole responses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One step's news for one request (streaming delta)."""

    request_id: str
    text: str  # new text since the last output
    token_ids: List[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[List[TokenLogprob]] = None
    cached_tokens: int = 0

    def absorb(self, later: "RequestOutput") -> None:
        """Fold a later delta of the same request into this one (a slow consumer gets fewer, larger deltas)."""
        self.text += later.text
        self.token_ids = self.token_ids + later.token_ids
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.prompt_tokens, self.completion_tokens = later.prompt_tokens, later.completion_tokens
        self.cached_tokens = later.cached_tokens
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs


@dataclass
class Response:
    """A finished request, as the pipeline returns it."""

    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: Optional[List[TokenLogprob]] = None
    request_id: str = ""

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}
