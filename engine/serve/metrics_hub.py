"""Cluster-wide engine gauges: every engine replica publishes its stats to one named actor, and the
ingress reads the sum for /metrics (a DeploymentHandle call reaches only one replica)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict

import ray

log = logging.getLogger(__name__)
STALE_S = 10.0  # a replica silent this long is gone (scaled down or dead)


@ray.remote(num_cpus=0)
class MetricsHub:
    def __init__(self):
        self.latest: Dict[str, tuple] = {}  # replica id -> (time, stats)

    def report(self, replica_id: str, stats: dict) -> None:
        self.latest[replica_id] = (time.time(), stats)

    def forget(self, replica_id: str) -> None:
        self.latest.pop(replica_id, None)

    def snapshot(self) -> dict:
        now = time.time()
        live = {r: s for r, (t, s) in self.latest.items() if now - t < STALE_S}
        total = lambda key: sum(s.get(key, 0) for s in live.values())  # noqa: E731
        blocks = total("num_blocks")
        queries = total("prefix_queries")
        return {
            "replicas": len(live), "running": total("running"), "waiting": total("waiting"),
            "kv_usage": (blocks - total("free_blocks")) / blocks if blocks else 0.0,
            "num_blocks": blocks, "used_blocks": blocks - total("free_blocks"),
            "prefix_hit_rate": total("prefix_hits") / queries if queries else 0.0,
        }


def hub_handle(name: str):
    return MetricsHub.options(name=name, namespace="raylm", lifetime="detached", get_if_exists=True).remote()


class Reporter(threading.Thread):
    """Publishes ``stats()`` every ``period`` seconds until stopped."""

    def __init__(self, hub_name: str, replica_id: str, stats: Callable[[], dict], period: float):
        super().__init__(name="metrics-reporter", daemon=True)
        self.hub_name, self.replica_id, self.stats, self.period = hub_name, replica_id, stats, period
        self.stop_event = threading.Event()

    def run(self) -> None:
        hub = None
        while not self.stop_event.wait(self.period):
            try:
                hub = hub or hub_handle(self.hub_name)
                hub.report.remote(self.replica_id, self.stats())
            except Exception as e:  # the hub may restart; never take the replica down
                log.debug("metrics report failed: %s", e)
                hub = None

    def stop(self) -> None:
        self.stop_event.set()
        try:
            hub_handle(self.hub_name).forget.remote(self.replica_id)
        except Exception:
            pass
