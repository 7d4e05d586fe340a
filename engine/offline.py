"""Offline inference: ``pipe = pipeline(model=None, **engine_config)``; ``pipe(prompts, gen_config)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

from .config import EngineConfig
from .generation import GenerationConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput, Response
from .prompts import is_messages

GenArg = Union[None, GenerationConfig, dict, Sequence[Union[GenerationConfig, dict]]]


def _normalize(prompts) -> (list, bool):
    """-> (list of prompts, whether the input was a single prompt)."""
    if isinstance(prompts, str) or is_messages(prompts):
        return [prompts], True
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts], True
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: the list is empty")
        return list(prompts), False
    raise ValueError("prompts: a string, a list of strings, chat messages, or a list of message lists")


def _configs(gen_config: GenArg, n: int) -> List[GenerationConfig]:
    def one(g):
        if g is None:
            return GenerationConfig()
        return g if isinstance(g, GenerationConfig) else GenerationConfig(**g)
    if isinstance(gen_config, (list, tuple)):
        if len(gen_config) != n:
            raise ValueError(f"gen_config: {len(gen_config)} configs for {n} prompts")
        return [one(g) for g in gen_config]
    return [one(gen_config)] * n


@dataclass
class ChatSession:
    """Multi-turn history kept by ``Pipeline.chat``."""

    history: List[Dict[str, str]] = field(default_factory=list)
    response: Optional[Response] = None


class Pipeline:
    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def __call__(self, prompts, gen_config: GenArg = None, use_tqdm: bool = False):
        items, single = _normalize(prompts)
        configs = _configs(gen_config, len(items))
        ids = [self.engine.add_request(p, g) for p, g in zip(items, configs)]
        results = self._collect(ids, use_tqdm)
        out = [results[i] for i in ids]
        return out[0] if single else out

    def _collect(self, ids: List[str], use_tqdm: bool) -> Dict[str, Response]:
        acc = {i: Response("", [], None, 0, 0, request_id=i) for i in ids}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while any(r.finish_reason is None for r in acc.values()):
                for o in self.engine.step():
                    if o.request_id in acc:
                        _merge(acc[o.request_id], o)
                        if o.finished and bar is not None:
                            bar.update(1)
        except BaseException:
            for i, r in acc.items():
                if r.finish_reason is None:
                    self.engine.abort(i)
            raise
        finally:
            if bar is not None:
                bar.close()
        return acc

    def stream(self, prompts, gen_config: GenArg = None) -> Iterator[RequestOutput]:
        """Yield deltas as they are produced; ``request_id`` tells which prompt (``req_index`` attribute too)."""
        items, _ = _normalize(prompts)
        configs = _configs(gen_config, len(items))
        ids = [self.engine.add_request(p, g) for p, g in zip(items, configs)]
        index = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        try:
            while pending:
                for o in self.engine.step():
                    if o.request_id in index:
                        o.index = index[o.request_id]
                        if o.finished:
                            pending.discard(o.request_id)
                        yield o
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def close(self) -> None:
        """Release the engine's tensor-parallel workers (nothing to do in process)."""
        self.engine.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chat(self, prompt: str, session: Optional[ChatSession] = None, gen_config: GenArg = None) -> ChatSession:
        session = session or ChatSession()
        session.history.append({"role": "user", "content": prompt})
        resp = self(list(session.history), gen_config)
        session.history.append({"role": "assistant", "content": resp.text})
        session.response = resp
        return session


def _merge(acc: Response, o: RequestOutput) -> None:
    acc.text += o.text
    acc.token_ids += o.token_ids
    acc.prompt_tokens, acc.completion_tokens = o.prompt_tokens, o.completion_tokens
    if o.logprobs is not None:
        acc.logprobs = (acc.logprobs or []) + o.logprobs
    if o.finished:
        acc.finish_reason = o.finish_reason


def pipeline(model: Optional[str] = None, config: Optional[EngineConfig] = None, **engine_config) -> Pipeline:
    """Build an engine for ``model`` (None = the embedded SmolLM2) and wrap it for offline use."""
    cfg = config or EngineConfig(model=model, **engine_config)
    return Pipeline(LLMEngine(cfg))
