"""Where the work runs: Ray tasks over the cluster's GPUs (or CPUs), or in process.

Calibration is data-parallel over sample shards (statistics merged, each layer's inputs kept per shard in
the object store); the AWQ search runs one task per layer, since a layer needs only its own inputs.
Tasks retry when a worker dies; a finished layer's result reaches the driver, which saves it at once.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .awq_search import SearchSettings, search_layer
from .calibrate import Acc, calibrate_shard, merge_into
from .dense import rotary_for
from .model_io import load_layer, resolve_dtype

log = logging.getLogger(__name__)
TASK_RETRIES = 3


def search_one(model_dir: str, index: int, x: torch.Tensor, settings: SearchSettings, device: str,
               dtype_name: str):
    """-> (result tensors, info: chosen ratios and the seconds the search itself took)."""
    t0 = time.perf_counter()
    dtype = resolve_dtype(dtype_name, device)
    layer, args = load_layer(model_dir, index, device, dtype)
    cos, sin = rotary_for(args, x.shape[1], device)
    result, ratios = search_layer(layer, x.to(device=device, dtype=dtype), cos, sin, settings)
    return result, {"ratios": ratios, "seconds": time.perf_counter() - t0}


def _calib_task(model_dir, ids, capture, device, dtype_name):
    acc, inputs = calibrate_shard(model_dir, ids, capture, device, resolve_dtype(dtype_name, device))
    return (acc, *inputs) if capture else acc


def _search_task(model_dir, index, settings, device, dtype_name, *shards):
    return search_one(model_dir, index, torch.cat(shards), settings, device, dtype_name)


class Executor:
    def __init__(self, parallel: bool, device: str, dtype_name: str, workers: Optional[int] = None):
        self.parallel, self.dtype_name = parallel, dtype_name
        if parallel:
            import ray
            if not ray.is_initialized():
                # under `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local one starts
                ray.init(address=os.environ.get("RAY_ADDRESS"))
            res = ray.cluster_resources()
            gpus = int(res.get("GPU", 0))
            self.device = device if device != "auto" else ("cuda" if gpus else "cpu")
            self.task_resources = {"num_gpus": 1} if self.device == "cuda" else {"num_cpus": 1}
            self.workers = workers or max(1, gpus if self.device == "cuda" else int(res.get("CPU", 1)))
            log.info("Ray cluster: %d CPUs, %d GPUs; %d parallel %s tasks", int(res.get("CPU", 0)), gpus,
                     self.workers, self.device)
        else:
            self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            self.workers = 1

    # ---- calibration ------------------------------------------------------------------------
    def calibrate(self, model_dir: str, ids: torch.Tensor, capture: bool, n_layers: int,
                  progress: Callable[[int], None]) -> Tuple[Acc, List[list]]:
        """-> (merged statistics, per layer: the list of its input shards (tensors or object refs))."""
        shards = [s for s in torch.tensor_split(ids, min(self.workers, ids.shape[0])) if len(s)]
        acc: Acc = {}
        if not self.parallel:
            inputs: List[list] = [[] for _ in range(n_layers)]
            for s in shards:
                a, xs = calibrate_shard(model_dir, s, capture, self.device,
                                        resolve_dtype(self.dtype_name, self.device))
                merge_into(acc, a)
                for i, x in enumerate(xs):
                    inputs[i].append(x)
                progress(len(s))
            return acc, inputs
        import ray
        task = ray.remote(_calib_task).options(num_returns=1 + n_layers if capture else 1,
                                               max_retries=TASK_RETRIES, **self.task_resources)
        refs = [task.remote(model_dir, s, capture, self.device, self.dtype_name) for s in shards]
        heads = [r[0] if capture else r for r in refs]
        for s, head in zip(shards, heads):
            merge_into(acc, ray.get(head))
            progress(len(s))
        inputs = [[r[1 + i] for r in refs] for i in range(n_layers)] if capture else [[] for _ in range(n_layers)]
        return acc, inputs

    # ---- AWQ search ---------------------------------------------------------------------------
    def search(self, model_dir: str, layers: Sequence[int], inputs: List[list], settings: SearchSettings,
               on_done: Callable[[int, Dict[str, torch.Tensor], Dict], None]) -> None:
        """Search each layer in ``layers``; ``on_done(index, result, info)`` as each one finishes."""
        if not self.parallel:
            for i in layers:
                result, info = search_one(model_dir, i, torch.cat(inputs[i]), settings, self.device,
                                          self.dtype_name)
                on_done(i, result, info)
            return
        import ray
        task = ray.remote(_search_task).options(max_retries=TASK_RETRIES, **self.task_resources)
        queue, pending = list(layers), {}
        while queue or pending:
            while queue and len(pending) < self.workers:  # at most `workers` layers in flight
                i = queue.pop(0)
                pending[task.remote(model_dir, i, settings, self.device, self.dtype_name, *inputs[i])] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            result, info = ray.get(done[0])
            on_done(i, result, info)
