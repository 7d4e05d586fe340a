"""What the asyncio fronts of the engine share: one asyncio queue per request, fed from another thread,
and ``generate`` that yields its deltas (coalesced when the caller is slow or asks for an interval)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, Optional

from .generation import GenerationConfig
from .outputs import RequestOutput


def engine_stats(e) -> dict:
    """Scheduler, cache and counter figures of an LLMEngine (what /metrics and autoscaling read)."""
    blocks = e.scheduler.blocks
    return {
        "running": len(e.scheduler.running),
        "waiting": len(e.scheduler.waiting),
        "kv_usage": e.kv_usage(),
        "free_blocks": blocks.num_free_blocks,
        "num_blocks": blocks.num_blocks,
        "prefix_hit_rate": blocks.prefix_hit_rate(),
        "prefix_queries": blocks.prefix_queries,
        "prefix_hits": blocks.prefix_hits,
        **e.stats,
    }


def _enqueue(items) -> None:
    """On the callers' loop: queue each delta; mark a stream's end so a held delta goes out at once."""
    for (_, q, last), item in items:
        q.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            last.set()


class RequestStreams:
    """Subclasses implement ``_submit(prompt, params, request_id, entry) -> request_id`` (registering
    ``entry`` in ``self._queues`` or raising ValueError) and ``abort(request_id)``; whatever steps the engine
    calls ``_deliver_step(outputs)`` or ``_deliver_error(request_id, exc)`` from its own thread."""

    def __init__(self):
        self._queues: Dict[str, tuple] = {}  # request_id -> (loop, asyncio.Queue, end-of-stream Event)

    def _submit(self, prompt, params, request_id, entry) -> str:
        raise NotImplementedError

    def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    def _post(self, pairs) -> None:
        """[(request_id, delta or exception)] to their waiting streams: one wake-up per event loop."""
        by_loop: Dict[object, list] = {}
        for rid, item in pairs:
            entry = self._queues.get(rid)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_enqueue, items)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _deliver_step(self, outputs) -> None:
        self._post((o.request_id, o) for o in outputs)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        self._post([(request_id, exc)])

    async def generate(self, prompt, params: Optional[GenerationConfig] = None, request_id: Optional[str] = None,
                       interval_s: float = 0.0, messages_per_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        """Add a request (ValueError on bad input) and yield its deltas until it finishes.

        After the first delta, yield at most once per ``interval_s``, and with ``messages_per_s`` > 0 at most
        once per (open streams / messages_per_s) seconds; each yield carries every token since the last
        (fewer, larger messages for a server's streams when many are open).
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        last = asyncio.Event()  # set when the final delta (or an error) is queued
        rid = self._submit(prompt, params, request_id, (loop, q, last))
        finished, last_yield = False, None
        try:
            while True:
                o = await q.get()
                if isinstance(o, BaseException):
                    finished = True  # refused by the engine: nothing to abort
                    raise o
                if not o.finished and last_yield is not None:
                    gap = max(interval_s, len(self._queues) / messages_per_s if messages_per_s > 0 else 0.0)
                    wait = last_yield + gap - loop.time()
                    # hold the delta until then, but not past the request's end: a client waiting for the
                    # end of a stream to send its next request must not wait (nor the engine idle meanwhile)
                    if wait > 0 and not last.is_set():
                        try:
                            await asyncio.wait_for(last.wait(), wait)
                        except asyncio.TimeoutError:
                            pass
                while not o.finished and not q.empty():  # the caller fell behind: hand over one delta
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        finished = True
                        raise nxt
                    o.absorb(nxt)
                finished = o.finished
                yield o
                last_yield = loop.time()
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)
