"""Cluster-wide engine gauges: every engine replica publishes its stats under its own key in Ray's GCS
key-value store, and the ingress reads the sum for /metrics and /health (a DeploymentHandle call reaches
only one replica, so the replicas cannot be asked directly).

The store lives in the GCS, which every Ray cluster runs anyway: no actor of ours. (A hub actor is a
process of its own, and a Ray worker process wakes 100 times a second even when idle, which a 2-core host
pays out of the engine's steps.) Keys are ``<hub name>/<replica id>`` in the ``raylm`` namespace; values
are JSON ``{"t": publish time, "stats": {...}}``. A replica re-publishes when its stats change and at least
every ``STALE_S / 4`` seconds; one silent for ``STALE_S`` (scaled down, or killed before it could delete
its key) no longer counts, and its key is removed by the next reader.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Dict

log = logging.getLogger(__name__)
NAMESPACE = "raylm"
STALE_S = 10.0  # a replica silent this long is gone (scaled down or dead)


def _kv():
    from ray.experimental import internal_kv
    return internal_kv


def _key(hub_name: str, replica_id: str) -> bytes:
    return f"{hub_name}/{replica_id}".encode()


def publish(hub_name: str, replica_id: str, stats: dict) -> None:
    value = json.dumps({"t": time.time(), "stats": stats}, default=float)
    _kv()._internal_kv_put(_key(hub_name, replica_id), value, overwrite=True, namespace=NAMESPACE)


def forget(hub_name: str, replica_id: str) -> None:
    _kv()._internal_kv_del(_key(hub_name, replica_id), namespace=NAMESPACE)


def read_live(hub_name: str) -> Dict[str, dict]:
    """replica id -> stats, for the replicas heard from within STALE_S (blocking: a few GCS calls)."""
    kv, now, live = _kv(), time.time(), {}
    for key in kv._internal_kv_list(f"{hub_name}/".encode(), namespace=NAMESPACE):
        raw = kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:  # deleted meanwhile
            continue
        try:
            entry = json.loads(raw)
            fresh = now - float(entry["t"]) < STALE_S
        except (ValueError, KeyError, TypeError):
            fresh = False
        if fresh:
            live[key.decode().split("/", 1)[1]] = entry["stats"]
        else:
            kv._internal_kv_del(key, namespace=NAMESPACE)
    return live


def snapshot(hub_name: str) -> dict:
    """The engine gauges summed over the live replicas."""
    live = read_live(hub_name)
    total = lambda key: sum(s.get(key, 0) for s in live.values())  # noqa: E731
    blocks = total("num_blocks")
    queries = total("prefix_queries")
    drafts = total("draft_tokens")  # speculative decoding (engines without it report none)
    return {
        "replicas": len(live), "running": total("running"), "waiting": total("waiting"),
        "kv_usage": (blocks - total("free_blocks")) / blocks if blocks else 0.0,
        "num_blocks": blocks, "used_blocks": blocks - total("free_blocks"),
        "prefix_hit_rate": total("prefix_hits") / queries if queries else 0.0,
        "draft_tokens": drafts, "accepted_draft_tokens": total("accepted_draft_tokens"),
        "draft_acceptance_rate": total("accepted_draft_tokens") / drafts if drafts else 0.0,
    }


class Reporter(threading.Thread):
    """Publishes ``stats()`` at once, then every ``period`` seconds when they changed (and at least every
    STALE_S / 4 seconds), until stopped; ``stop`` removes the replica's key."""

    def __init__(self, hub_name: str, replica_id: str, stats: Callable[[], dict], period: float):
        super().__init__(name="metrics-reporter", daemon=True)
        self.hub_name, self.replica_id, self.stats, self.period = hub_name, replica_id, stats, period
        self.stop_event = threading.Event()

    def run(self) -> None:
        last, last_t = None, 0.0
        while True:
            try:
                stats, now = self.stats(), time.monotonic()
                if stats != last or now - last_t >= STALE_S / 4:
                    publish(self.hub_name, self.replica_id, stats)
                    last, last_t = stats, now
            except Exception as e:  # the GCS may be restarting; never take the replica down
                log.debug("metrics report failed: %s", e)
            if self.stop_event.wait(self.period):
                return

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2)  # a publish in flight must not re-create the key after it is removed
        try:
            forget(self.hub_name, self.replica_id)
        except Exception:
            pass
