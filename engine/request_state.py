"""Per-request output bookkeeping in the engine: detokenization, stop conditions, streaming holdback."""
from __future__ import annotations

from typing import List, Optional

from .core.sequence import Sequence
from .detokenizer import IncrementalDetokenizer
from .generation import GenerationConfig
from .outputs import RequestOutput, TokenLogprob


class RequestState:
    def __init__(self, seq: Sequence, params: GenerationConfig, tokenizer, eos_token_ids: List[int]):
        self.seq, self.params = seq, params
        self.detok = IncrementalDetokenizer(tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                            params.skip_special_tokens)
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text = ""
        self.emitted_text = 0
        self.emitted_tokens = 0
        self.logprobs: Optional[List[TokenLogprob]] = [] if params.logprobs is not None else None
        self.emitted_logprobs = 0
        self.finish_reason: Optional[str] = None

    @property
    def num_output(self) -> int:
        return self.seq.num_output_tokens

    def on_token(self, token_id: int, logprob=None) -> Optional[str]:
        """Record a sampled token; returns a finish reason when the request is done."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(TokenLogprob(token_id, logprob[0], logprob[1]))
        past_min = self.num_output >= self.params.min_new_tokens
        if token_id in self.end_ids and past_min:
            return self._finish("stop")
        before = len(self.text)
        self.text += self.detok.add(token_id)
        if self.params.stop and past_min and self._match_stop(before):
            return self._finish("stop")
        if self.num_output >= self.seq.max_tokens - self.seq.num_prompt_tokens:
            return self._finish("length")
        return None

    def _match_stop(self, before: int) -> bool:
        search_from = max(0, before - self.holdback)
        hits = [i for i in (self.text.find(s, search_from) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def _finish(self, reason: str) -> str:
        if reason == "length":
            self.text += self.detok.flush()
        self.finish_reason = reason
        return reason

    def take_delta(self, finished: bool) -> RequestOutput:
        """The text, tokens and logprobs not yet handed out (holding back a possible stop-string start)."""
        end = len(self.text) if finished else max(self.emitted_text, len(self.text) - self.holdback)
        out = RequestOutput(
            request_id=self.seq.request_id,
            text=self.text[self.emitted_text:end],
            token_ids=self.seq.output_token_ids[self.emitted_tokens:],
            finished=finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.seq.num_prompt_tokens,
            completion_tokens=self.num_output,
            cached_tokens=self.seq.num_cached_tokens,
        )
        if self.logprobs is not None:
            out.logprobs = self.logprobs[self.emitted_logprobs:]
            self.emitted_logprobs = len(self.logprobs)
        self.emitted_text = end
        self.emitted_tokens = self.num_output
        return out
