"""Asyncio front of the engine for servers: a background thread steps the engine while requests stream."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Dict, Optional

from .config import EngineConfig
from .generation import GenerationConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput

logger = logging.getLogger(__name__)


class AsyncEngine:
    """``generate(prompt, params)`` yields deltas; ``abort(request_id)`` stops a request at once."""

    def __init__(self, config: Optional[EngineConfig] = None, **kwargs):
        self.engine = LLMEngine(config, **kwargs)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: Dict[str, tuple] = {}  # request_id -> (loop, asyncio.Queue)
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
                    outputs = self._fail_all(exc)
            for o in outputs:
                self._deliver(o)

    def _fail_all(self, exc: BaseException):
        outs = []
        for rid in list(self.engine.requests):
            o = self.engine.abort(rid)
            if o is not None:
                o.finish_reason = "error"
                outs.append(o)
        return outs

    def _deliver(self, o: RequestOutput) -> None:
        entry = self._queues.get(o.request_id)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, o)
        except RuntimeError:  # the caller's loop is closed
            pass

    # ---- API ------------------------------------------------------------------------------
    async def generate(self, prompt, params: Optional[GenerationConfig] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Add a request (ValueError on bad input) and yield its deltas until it finishes."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._wake:
            rid = self.engine.add_request(prompt, params, request_id)
            self._queues[rid] = (loop, q)
            self._wake.notify()
        finished = False
        try:
            while True:
                o = await q.get()
                while not o.finished and not q.empty():  # the caller fell behind: hand over one delta
                    o.absorb(q.get_nowait())
                finished = o.finished
                yield o
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> bool:
        with self._wake:
            return self.engine.abort(request_id) is not None

    def stats(self) -> dict:
        e = self.engine
        with self._lock:
            return {
                "running": len(e.scheduler.running),
                "waiting": len(e.scheduler.waiting),
                "kv_usage": e.kv_usage(),
                "free_blocks": e.scheduler.blocks.num_free_blocks,
                "num_blocks": e.scheduler.blocks.num_blocks,
                "prefix_hit_rate": e.scheduler.blocks.prefix_hit_rate(),
                "prefix_queries": e.scheduler.blocks.prefix_queries,
                "prefix_hits": e.scheduler.blocks.prefix_hits,
                **e.stats,
            }

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self.engine.shutdown()
