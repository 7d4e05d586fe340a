"""Optional per-step trace (``RAYLM_STEP_TRACE=path``): one JSON line per engine step, for finding where a
serving run loses time against an offline one (step durations by batch composition).

Each line: ``{"t": wall-clock start (s), "ms": step duration, "seqs": sequences, "decodes": one-token
sequences, "tokens": tokens computed, "pid": process}``. Lines are appended (several engines may share a
file) and flushed per line.
"""
from __future__ import annotations

import json
import os
from typing import Optional


class StepTrace:
    def __init__(self, path: str):
        self._fh = open(path, "a", buffering=1)  # line-buffered: a killed engine leaves whole lines
        self._pid = os.getpid()

    @classmethod
    def from_env(cls) -> Optional["StepTrace"]:
        path = os.environ.get("RAYLM_STEP_TRACE")
        return cls(path) if path else None

    def record(self, t_start: float, seconds: float, sched) -> None:
        decodes = sum(1 for s in sched.seqs if len(s.token_ids) == 1)
        self._fh.write(json.dumps({"t": round(t_start, 6), "ms": round(seconds * 1e3, 3), "seqs": len(sched.seqs),
                                   "decodes": decodes, "tokens": sched.num_tokens, "pid": self._pid}) + "\n")

    def close(self) -> None:
        self._fh.close()
