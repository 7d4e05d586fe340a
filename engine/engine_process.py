"""The engine core in its own process (like vLLM V1's EngineCore): the child loads the model and steps;
the parent (a Serve replica) keeps the asyncio streams, Ray's threads and the HTTP traffic.

Why: on a small CPU host the stepping thread shares the GIL with everything a Ray actor runs (its
event loop, gRPC callbacks, serialization); every torch op re-acquires the GIL and waits behind them.
A child process holds its own GIL, so only the CPU itself is shared.

Messages over one pipe (pickled tuples), parent -> child: ("add", rid, prompt, params), ("abort", rid),
("stop",); child -> parent: ("ready", info) or ("failed", message) once, then ("out", [RequestOutput]),
("error", rid, message) for a refused request, ("stats", dict).
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Optional

from .config import EngineConfig
from .streams import RequestStreams

logger = logging.getLogger(__name__)

STATS_EVERY_S = 0.25  # the child publishes its stats at most this often while busy, and on going idle


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM to the child when the parent (the replica) dies, even by SIGKILL."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the pipe's end of file still stops the loop


def _child_main(conn) -> None:
    _die_with_parent()
    config, log_level = conn.recv()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from .async_engine import fail_all
    from .llm_engine import LLMEngine
    from .streams import engine_stats
    try:
        engine = LLMEngine(EngineConfig(**config))
    except BaseException as e:  # noqa: BLE001 - the parent raises it with the message
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"session_len": engine.session_len, "device": engine.device,
                         "model_dir": str(engine.model_dir), "stats": engine_stats(engine)}))
    engine.bind_threads()
    last_stats, dirty = 0.0, False  # dirty: the stats changed since the last push
    while True:
        try:
            if not engine.has_unfinished():
                if dirty:  # publish the idle state (blocks all free) before sleeping
                    conn.send(("stats", engine_stats(engine)))
                    dirty = False
                conn.poll(None)  # sleep until a message (or the parent's end of file)
            while conn.poll(0):  # whatever arrived during the last step
                if not _handle(engine, conn, conn.recv()):
                    engine.shutdown()
                    return
                dirty = True
        except (EOFError, OSError):  # the parent is gone
            return
        if not engine.has_unfinished():
            continue
        try:
            outs = engine.step()
        except Exception:  # a failing step must not hang every waiter
            logger.exception("engine step failed")
            outs = fail_all(engine)
        if outs:
            conn.send(("out", outs))
        dirty = True
        now = time.monotonic()
        if now - last_stats > STATS_EVERY_S:
            conn.send(("stats", engine_stats(engine)))
            last_stats, dirty = now, False


def _handle(engine, conn, msg) -> bool:
    kind = msg[0]
    if kind == "add":
        _, rid, prompt, params = msg
        try:
            engine.add_request(prompt, params, rid)
        except ValueError as e:
            conn.send(("error", rid, str(e)))
    elif kind == "abort":
        engine.abort(msg[1])
    elif kind == "stop":
        return False
    return True


class ProcessEngine(RequestStreams):
    """Same interface as AsyncEngine (``generate``, ``abort``, ``stats``, ``check_health``, ``shutdown``) with
    the engine in a child process. Raises RuntimeError when the engine cannot start (the child's error)."""

    def __init__(self, config: Optional[EngineConfig] = None, start_timeout_s: float = 900.0, **kwargs):
        super().__init__()
        config = config or EngineConfig(**kwargs)
        # a plain interpreter running this module (not multiprocessing's spawn, which re-runs the parent's
        # __main__ script); the socket's fd is inherited by number
        parent_sock, child_sock = socket.socketpair()
        self._conn = Connection(parent_sock.detach())
        child_fd = child_sock.detach()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "engine.engine_process", str(child_fd)],
                                          pass_fds=(child_fd,), env=env)
        finally:
            os.close(child_fd)
        self._conn.send((config.model_dump(), logging.getLogger("engine").getEffectiveLevel()))
        kind, info = self._first_message(start_timeout_s)
        if kind == "failed":
            self._proc.wait(timeout=10)
            raise RuntimeError(f"engine process failed to start: {info}")
        self._info = info
        self._stats = info.pop("stats")
        self._stopped = False
        self._pipe_closed = False
        self._tokenizer = None
        self._outbox: "queue.Queue" = queue.Queue()  # sends happen off the event loop (a full pipe blocks)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    def _first_message(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise RuntimeError(f"engine process exited with code {self._proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"engine process not ready after {timeout:.0f} s")
        return self._conn.recv()

    # ---- the pipe -------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._pipe_closed = True  # before anyone hears of it: is_alive() is False from here on
                break
            kind = msg[0]
            if kind == "out":
                self._deliver_step(msg[1])
            elif kind == "error":
                self._deliver_error(msg[1], ValueError(msg[2]))
            elif kind == "stats":
                self._stats = msg[1]
        for rid in list(self._queues):  # nobody waits forever on a dead engine
            self._deliver_error(rid, RuntimeError("the engine process exited"))
        if not self._stopped:
            try:  # the pipe closes a moment before the kernel lets us reap the process
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            logger.error("engine process exited (code %s)", code)

    def _write(self) -> None:
        while True:
            msg = self._outbox.get()
            try:
                self._conn.send(msg)
            except (OSError, ValueError):
                return
            if msg[0] == "stop":
                return

    # ---- API ------------------------------------------------------------------------------
    def _submit(self, prompt, params, request_id, entry) -> str:
        if not self.is_alive():
            raise RuntimeError("the engine process is not running")
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        if rid in self._queues:
            raise ValueError(f"request_id: {rid!r} is already in use")
        self._queues[rid] = entry
        self._outbox.put(("add", rid, prompt, params))
        return rid

    def abort(self, request_id: str) -> bool:
        self._outbox.put(("abort", request_id))
        return True

    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self._info["model_dir"])
        return self._tokenizer

    def info(self) -> dict:
        return {"session_len": self._info["session_len"], "device": self._info["device"]}

    def is_alive(self) -> bool:
        return (not self._stopped and not self._pipe_closed and self._proc.poll() is None
                and self._reader.is_alive())

    def check_health(self) -> None:
        if not self.is_alive():
            raise RuntimeError(f"engine process is not running (exit code {self._proc.poll()})")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._outbox.put(("stop",))
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._conn.close()


def start_engine(config: EngineConfig, in_process: Optional[bool] = None):
    """ProcessEngine where it can run (tp = 1), else AsyncEngine: tensor-parallel engines drive Ray worker
    actors, which only a Ray worker process (the replica itself) can call."""
    if in_process is None:
        in_process = config.tp > 1
    if in_process:
        from .async_engine import AsyncEngine
        return AsyncEngine(config)
    return ProcessEngine(config)


if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])))
