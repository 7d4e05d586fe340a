"""RayTPExecutor: tp worker actors in a placement group, driven like the in-process ModelRunner.

Inside a Serve replica the replica's own placement group is used (bundle 0 holds the replica, bundles
1..tp its workers); offline, a group of tp bundles is created (STRICT_PACK, or PACK across nodes) and
removed on shutdown. The workers are owned by the creating process, so they die with it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Dict

logger = logging.getLogger(__name__)


class RayTPExecutor:
    def __init__(self, spec: Dict[str, Any], placement: str = "STRICT_PACK", worker_cpus: float = 1.0,
                 ready_timeout_s: float = 60.0):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker import TPWorker
        if not ray.is_initialized():
            ray.init(log_to_driver=False)  # starts a local instance, or joins RAY_ADDRESS
        self.tp, self.spec = spec["tp"], spec
        self._dag, self._lock = None, threading.Lock()
        gpu = spec["device"] == "cuda"
        self._own_pg = None
        pg = get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) >= self.tp + 1:
            first = 1
        else:
            bundle = {"CPU": worker_cpus, **({"GPU": 1.0} if gpu else {})}
            total = ray.cluster_resources()
            if any(self.tp * v > total.get(k, 0) for k, v in bundle.items()):
                raise ValueError(f"tp: {self.tp} workers need {self.tp} x {bundle} but the cluster has "
                                 f"{{CPU: {total.get('CPU', 0)}, GPU: {total.get('GPU', 0)}}} in total")
            pg = placement_group([dict(bundle) for _ in range(self.tp)], strategy=placement)
            self._own_pg, first = pg, 0
            if not _wait(pg, ready_timeout_s):
                ray.util.remove_placement_group(pg)
                raise ValueError(f"tp: {self.tp} workers need {self.tp} x {bundle} ({placement}) but the cluster "
                                 f"could not place them within {ready_timeout_s:.0f} s (resources busy, or the "
                                 "bundles do not fit one node under STRICT_PACK)")
        self.pg = pg
        opts = {"num_cpus": pg.bundle_specs[first].get("CPU", 0), "num_gpus": 1 if gpu else 0}
        actor = ray.remote(TPWorker)
        self.workers = [actor.options(**opts, max_concurrency=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=first + r)).remote(r, spec) for r in range(self.tp)]
        t0 = time.perf_counter()
        try:
            addr, port = ray.get(self.workers[0].address.remote())
            infos = ray.get([w.setup.remote(addr, port) for w in self.workers])
        except Exception:
            self.shutdown()
            raise
        self.load_s = time.perf_counter() - t0
        self._one_host = len({i["node_id"] for i in infos}) == 1
        frees = [i["free_bytes"] for i in infos if i["free_bytes"] is not None]
        self.free_bytes = min(frees) if frees else None  # the tightest device decides the KV budget
        self.block_size, self.num_blocks, self.kv_bytes_total = spec["block_size"], 0, 0
        logger.info("tp=%d workers loaded in %.1f s (ranks: %s)", self.tp, self.load_s,
                    ", ".join(f"{i['load_s']:.1f} s" for i in infos))

    def allocate(self, num_blocks: int) -> None:
        """Every rank allocates ``num_blocks`` blocks of its own KV heads; then the step graph is compiled."""
        import ray
        from . import shm_allreduce
        shm = None
        if self.spec["device"] == "cpu" and self._one_host and shm_allreduce.supported() and shm_enabled():
            shm = f"raylm-tp-{uuid.uuid4().hex}"
        self.kv_bytes_total = sum(ray.get([w.allocate.remote(num_blocks, shm) for w in self.workers]))
        if shm is not None:
            ray.get(self.workers[0].unlink_shared.remote())
        self.num_blocks = num_blocks
        logger.info("tp=%d all-reduce: %s", self.tp, "shared memory" if shm else
                    ("NCCL" if self.spec["device"] == "cuda" else "gloo"))
        self._compile()

    def _compile(self) -> None:
        """Steps go through a Ray compiled graph (shared-memory channels, one message read by every worker):
        0.5 ms per round trip here against 1.5 ms for plain actor calls. Plain calls remain the fallback."""
        self._dag = None
        if os.environ.get("RAYLM_TP_COMPILED", "1") == "0":
            return
        try:
            from ray.dag import InputNode, MultiOutputNode
            with InputNode() as inp:
                dag = MultiOutputNode([w.step.bind(inp) for w in self.workers])
            self._dag = dag.experimental_compile(_submit_timeout=-1)
        except Exception as e:  # an older Ray, or channels unsupported here
            logger.warning("tp: compiled graph unavailable (%s); using plain actor calls", e)

    # ---- the ModelRunner surface the engine uses ------------------------------------------
    def _run(self, msg):
        import ray
        with self._lock:
            if self._dag is not None:
                return ray.get(self._dag.execute(msg), timeout=-1)[0]
            return ray.get([w.step.remote(msg) for w in self.workers])[0]

    def execute(self, sched):
        return self._run(("execute", sched))

    def logits_for(self, sched, all_rows: bool = False):
        return self._run(("logits", sched, all_rows))

    def kv_bytes(self) -> int:
        return self.kv_bytes_total

    def check_health(self, timeout_s: float = 30.0) -> None:
        """Raises when a worker is gone (the replica's health check fails, and Serve replaces it)."""
        import ray
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)

    def shutdown(self) -> None:
        import ray
        dag, self._dag = getattr(self, "_dag", None), None
        if dag is not None:
            try:
                dag.teardown()
            except Exception:  # a worker is already gone
                pass
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # already gone
                pass
        self.workers = []
        if self._own_pg is not None:
            try:
                ray.util.remove_placement_group(self._own_pg)
            except Exception:
                pass
            self._own_pg = None


def _wait(pg, timeout_s: float) -> bool:
    import ray
    try:
        ray.get(pg.ready(), timeout=timeout_s)
        return True
    except ray.exceptions.GetTimeoutError:
        return False


def shm_enabled() -> bool:
    """RAYLM_TP_SHM=1 all-reduces CPU workers on one host through shared memory instead of gloo. Off by
    default: on the 2-core machine its spinning ranks made decode steps slower than gloo's sleeping waits
    (docs/benchmarks.md, tensor parallelism), though one all-reduce alone is 9x faster."""
    return os.environ.get("RAYLM_TP_SHM", "0") == "1"
