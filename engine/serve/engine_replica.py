"""The engine deployment: one engine per replica (stepping in a child process, or in a thread for tp > 1),
streaming deltas to the ingress as plain dicts."""
from __future__ import annotations

import logging
import os
from typing import AsyncIterator, Optional

from ..config import EngineConfig
from ..engine_process import start_engine
from ..generation import GenerationConfig
from ..outputs import RequestOutput, TokenLogprob
from .metrics_hub import Reporter


def _engine_logging() -> None:
    """Engine logs (KV-cache size, rates) go to the replica's stderr, which `serve run` shows."""
    root = logging.getLogger("engine")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(os.environ.get("RAYLM_LOG", "INFO"))


class EngineReplica:
    """Serve calls: ``generate(payload)`` (streaming), ``stats()``, ``check_health()``."""

    def __init__(self, engine_config: dict, hub_name: Optional[str] = None, report_s: float = 0.5,
                 stream: Optional[dict] = None, engine_process: bool = True):
        _engine_logging()
        self.stream = dict(stream or {})  # {"interval_s", "messages_per_s"}: see AppConfig
        # The engine keeps the niceness Ray gives its workers (15), the same as Serve's proxy and ingress.
        # Raised to 0 above them, on 2 cores at concurrency 16 it starved them whenever it was busy: new
        # requests reached it 0.3-1.2 s after the client sent them, while it decoded the few left of a wave
        # alone, and HTTP throughput was 13% lower (median 192.7 against 221.9 tok/s, 2 x 2 interleaved runs).
        cfg = EngineConfig(**engine_config)
        self.engine = start_engine(cfg, in_process=not engine_process or cfg.tp > 1)
        self.tokenizer = self.engine.tokenizer
        self.reporter = None
        if hub_name:
            from ray import serve
            try:
                rid = str(serve.get_replica_context().replica_id)
            except Exception:  # outside Serve (tests of the class itself)
                rid = f"local-{id(self)}"
            self.reporter = Reporter(hub_name, rid, self.engine.stats, report_s)
            self.reporter.start()

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        """payload: {"prompt", "params" (GenerationConfig fields), "request_id"}.

        The first item is either a delta or {"error": message} when the engine refused the request.
        """
        try:
            params = GenerationConfig(**payload["params"])
            agen = self.engine.generate(payload["prompt"], params, payload.get("request_id"), **self.stream)
            first = await agen.__anext__()
        except ValueError as e:
            yield {"error": str(e)}
            return
        try:
            yield self._wire(first)
            if not first.finished:
                async for o in agen:
                    yield self._wire(o)
        finally:  # a cancelled stream (client gone) aborts the request and frees its blocks
            await agen.aclose()

    def _wire(self, o: RequestOutput) -> dict:
        d = {"text": o.text, "token_ids": o.token_ids, "finished": o.finished, "finish_reason": o.finish_reason,
             "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
             "cached_tokens": o.cached_tokens}
        if o.logprobs is not None:
            d["logprobs"] = [self._lp(x) for x in o.logprobs]
        return d

    def _lp(self, x: TokenLogprob) -> dict:
        tok = lambda i: self.tokenizer.decode([i])  # noqa: E731
        return {"token": tok(x.token_id), "logprob": x.logprob,
                "top": [[tok(i), lp] for i, lp in x.top_logprobs]}

    def stats(self) -> dict:
        return self.engine.stats()

    def model_info(self) -> dict:
        import ray
        return {**self.engine.info(), "node_id": ray.get_runtime_context().get_node_id()}

    def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self):
        if getattr(self, "reporter", None) is not None:
            self.reporter.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
