"""Engine gauges through Ray's GCS key-value store on a real local Ray: sums by hand, staleness, removal."""
import json
import time

import pytest
import ray

from engine.serve import metrics_hub as hub


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, namespace="metrics-hub-test")
    yield
    ray.shutdown()


def stats(running, waiting, free, blocks, queries=0, hits=0, **extra):
    return {"running": running, "waiting": waiting, "free_blocks": free, "num_blocks": blocks,
            "prefix_queries": queries, "prefix_hits": hits, **extra}


def test_snapshot_sums_live_replicas_and_drops_stale_ones(local_ray):
    hub.publish("h1", "r1", stats(3, 1, 60, 100, queries=10, hits=4))
    hub.publish("h1", "r2", stats(2, 0, 20, 50, queries=30, hits=6, draft_tokens=40, accepted_draft_tokens=30))
    hub.publish("h2", "other-app", stats(9, 9, 0, 10))  # another app's hub: not counted
    old = json.dumps({"t": time.time() - hub.STALE_S - 1, "stats": stats(7, 7, 0, 40)})
    ray.experimental.internal_kv._internal_kv_put(b"h1/dead", old, namespace=hub.NAMESPACE)
    snap = hub.snapshot("h1")
    assert snap["replicas"] == 2 and snap["running"] == 5 and snap["waiting"] == 1
    assert snap["num_blocks"] == 150 and snap["used_blocks"] == 150 - 80
    assert snap["kv_usage"] == pytest.approx(70 / 150)
    assert snap["prefix_hit_rate"] == pytest.approx(10 / 40)
    assert (snap["draft_tokens"], snap["accepted_draft_tokens"]) == (40, 30)  # r1 runs without drafts
    assert snap["draft_acceptance_rate"] == pytest.approx(0.75)
    # the stale key was removed by the reader
    assert ray.experimental.internal_kv._internal_kv_get(b"h1/dead", namespace=hub.NAMESPACE) is None
    hub.forget("h1", "r2")
    assert hub.snapshot("h1")["replicas"] == 1 and hub.snapshot("h1")["running"] == 3
    assert hub.snapshot("nobody") == {"replicas": 0, "running": 0, "waiting": 0, "kv_usage": 0.0,
                                      "num_blocks": 0, "used_blocks": 0, "prefix_hit_rate": 0.0,
                                      "draft_tokens": 0, "accepted_draft_tokens": 0, "draft_acceptance_rate": 0.0}


def test_reporter_publishes_at_once_follows_changes_and_removes_its_key_on_stop(local_ray):
    current = {"s": stats(1, 0, 10, 10)}
    rep = hub.Reporter("h3", "r1", lambda: dict(current["s"]), period=0.05)
    rep.start()
    deadline = time.time() + 5
    while hub.snapshot("h3")["replicas"] != 1 and time.time() < deadline:
        time.sleep(0.02)
    assert hub.snapshot("h3")["running"] == 1
    current["s"] = stats(4, 2, 5, 10)
    while hub.snapshot("h3")["running"] != 4 and time.time() < deadline:
        time.sleep(0.02)
    assert hub.snapshot("h3")["waiting"] == 2
    rep.stop()
    rep.join(timeout=5)
    assert not rep.is_alive() and hub.snapshot("h3")["replicas"] == 0
