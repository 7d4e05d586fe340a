"""Asyncio front of the engine for servers: a background thread steps the engine while requests stream."""
from __future__ import annotations

import logging
import threading
from typing import List, Optional

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .streams import RequestStreams, engine_stats

logger = logging.getLogger(__name__)


def fail_all(engine: LLMEngine) -> List[RequestOutput]:
    """Abort every request after a failed step; their last outputs finish with reason "error"."""
    outs = []
    for rid in list(engine.requests):
        o = engine.abort(rid)
        if o is not None:
            o.finish_reason = "error"
            outs.append(o)
    return outs


class AsyncEngine(RequestStreams):
    """``generate(prompt, params)`` yields deltas; ``abort(request_id)`` stops a request at once. The engine
    steps in a background thread of this process."""

    def __init__(self, config: Optional[EngineConfig] = None, **kwargs):
        super().__init__()
        self.engine = LLMEngine(config, **kwargs)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self.last_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- the background loop --------------------------------------------------------------
    def _loop(self) -> None:
        self.engine.bind_threads()
        while True:
            with self._wake:
                while not self._stopped and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a failing step must not hang every waiter
                    logger.exception("engine step failed")
                    self.last_error = exc
                    outputs = fail_all(self.engine)
            self._deliver_step(outputs)

    # ---- API ------------------------------------------------------------------------------
    def _submit(self, prompt, params, request_id, entry) -> str:
        with self._wake:
            rid = self.engine.add_request(prompt, params, request_id)
            self._queues[rid] = entry
            self._wake.notify()
        return rid

    def abort(self, request_id: str) -> bool:
        with self._wake:
            return self.engine.abort(request_id) is not None

    def stats(self) -> dict:
        with self._lock:
            return engine_stats(self.engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def info(self) -> dict:
        return {"session_len": self.engine.session_len, "device": self.engine.device}

    def check_health(self) -> None:
        if not self.is_alive():
            raise RuntimeError("engine loop is not running")
        runner = self.engine.runner
        if hasattr(runner, "check_health"):  # tensor-parallel workers: a dead one fails the replica
            runner.check_health()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self.engine.shutdown()
