"""Quieter Ray defaults for hosts where the engine shares its cores with Ray's own processes.

On a small CPU host every wake-up of a Ray or Serve process takes a core from one of the engine's
compute threads mid-step (under load at concurrency 16 on 2 cores the engine's two threads were preempted
about 1000 times a second). Measured on that host, an idle app's processes used 3.2 CPU-s per 20 s with
Ray's defaults and 2.1-2.2 with the first four (the Serve controller 0.74 -> 0.29); under load, 5.3 -> 4.9,
and the throughput difference was inside the host's noise. The Serve metrics flush and log-monitor settings
took an idle app from 2.73 to 2.17 CPU-s per 20 s (log monitor 0.23 -> 0.08, each replica about -0.08).
An idle app beside an offline run slowed its batch-16 decode steps from 41.3 to 44.5 ms on the 2-core
EPYC, so on a small host this background is paid out of the engine's steps. All but the last slow Ray's
bookkeeping loops down; the last moves Serve's traffic between its processes onto Serve's gRPC channel.
None of them changes what a request gets. They only take effect in processes started after they are set,
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
    # How often every Serve replica and router flushes its cached request metrics to Ray's metrics API
    # (Serve's own serve_* metrics; Prometheus scrapes them far less often): 100 ms default, a loop waking
    # 10 times a second in the proxy, the ingress and each engine replica.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Ray's log monitor globs the session's log folder on every 0.1 s poll while it holds fewer files than
    # this threshold (1000 by default); at 0 it globs every LOG_NAME_UPDATE_INTERVAL_S instead. New log
    # lines are still forwarded within 0.1 s; a new worker's log file is found within 2 s.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    # Serve's own gRPC channel between the proxy, the ingress and the engine replicas instead of Ray actor
    # calls with object-ref streaming generators (part of Serve's throughput-optimized mode). Streaming a
    # 128-request load at concurrency 16 on the 2-core EPYC, the proxy, ingress and engine replica took
    # 7.1-7.5% of the engine's CPU time in all, against 9.1-10.8% over actor calls.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
# Settings read by Ray's Python modules (module, attribute), not by its C++ binaries.
PYTHON_READ = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": ("ray.serve._private.constants", "CONTROL_LOOP_INTERVAL_S"),
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": ("ray.serve._private.constants", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"),
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": ("ray._private.log_monitor", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"),
    "LOG_NAME_UPDATE_INTERVAL_S": ("ray._private.log_monitor", "LOG_NAME_UPDATE_INTERVAL_S"),
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": ("ray.serve._private.constants", "RAY_SERVE_USE_GRPC_BY_DEFAULT"),
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
