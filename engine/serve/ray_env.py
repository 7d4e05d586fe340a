"""Quieter Ray defaults for hosts where the engine shares its cores with Ray's own processes.

On a small CPU host every wake-up of a Ray or Serve process takes a core from one of the engine's
compute threads mid-step (under load at concurrency 16 on 2 cores the engine's two threads were preempted
about 1000 times a second). Measured on that host, an idle app's processes used 3.2 CPU-s per 20 s with
Ray's defaults and 2.1-2.2 with these (the Serve controller 0.74 -> 0.29); under load, 5.3 -> 4.9, and
the throughput difference was inside the host's noise. These settings slow the bookkeeping loops down;
none of them changes what a request gets. They only take effect in processes started after they are set,
so they go into the environment before Ray starts: ``serve_app`` sets them on import (``serve run serve_app:...``
imports the app before it starts Ray) and ``scripts/run.sh`` exports them, for config files too. On a
cluster started with ``ray start`` they need to be in that command's environment (many-core GPU hosts
gain little). A value already in the environment wins; ``RAYLM_QUIET_RAY=0`` keeps Ray's own defaults.

    python -m engine.serve.ray_env      # prints them as shell `export` lines
"""
from __future__ import annotations

import os
import shlex
from typing import Dict, MutableMapping, Optional

QUIET_RAY_ENV: Dict[str, str] = {
    # Serve controller's reconcile loop (Ray's default 0.1 s): autoscaling and health decisions come at
    # most this much later; the autoscaling delays themselves are seconds.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Timing statistics for every event-loop handler in every Ray process (debugging data, on by default).
    "RAY_event_stats": "0",
    # How often each worker sends task state events to the GCS (dashboard, `ray list tasks`): 1 s default.
    "RAY_task_events_report_interval_ms": "10000",
    # How often Ray's metrics agent exports its own metrics (ours at /metrics are unaffected): 10 s default.
    "RAY_metrics_report_interval_ms": "60000",
}


def apply_quiet_ray_env(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set each default not already in ``environ`` (the process environment by default); returns those set."""
    env = os.environ if environ is None else environ
    if env.get("RAYLM_QUIET_RAY", "1") == "0":
        return {}
    added = {k: v for k, v in QUIET_RAY_ENV.items() if k not in env}
    env.update(added)
    return added


def shell_exports(environ: Optional[MutableMapping[str, str]] = None) -> str:
    env = dict(os.environ if environ is None else environ)
    added = apply_quiet_ray_env(env)
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in added.items())


if __name__ == "__main__":
    print(shell_exports())
