"""One tensor-parallel rank: a Ray actor holding its shard of the model, its KV heads and a ModelRunner.

Ranks join a torch.distributed group (NCCL on GPU, gloo on CPU); every step each rank runs the same
scheduled batch, the row-parallel layers all-reduce, and rank 0 alone samples and answers.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TPWorker:
    def __init__(self, rank: int, spec: Dict[str, Any]):
        self.rank, self.spec = rank, spec
        self.tp = spec["tp"]
        self.device = spec["device"]
        self.runner = None
        self._shm = None
        self._threads = spec.get("num_threads") or max(1, len(os.sched_getaffinity(0)) // self.tp)

    def address(self):
        import ray
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> Dict[str, Any]:
        """Join the process group and load this rank's weights; report the memory left for the KV cache."""
        import torch.distributed as dist

        from .loading import load_rank_model
        t0 = time.perf_counter()
        self._bind()
        backend = "nccl" if self.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.tp)
        self.model = load_rank_model(self.spec, self.rank, self.device, getattr(torch, self.spec["dtype"]))
        for layer in self.model.layers:
            layer.reduce = self._reduce
        free = torch.cuda.mem_get_info()[0] if self.device == "cuda" else None
        import ray
        return {"rank": self.rank, "load_s": time.perf_counter() - t0, "free_bytes": free, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._shm is not None and t.numel() <= self._shm.max_numel:
            return self._shm(t)
        return _all_reduce(t)

    def allocate(self, num_blocks: int, shm_name: Optional[str] = None) -> int:
        """Build the runner with this rank's KV heads in ``num_blocks`` blocks; returns the cache bytes.
        ``shm_name``: every rank is on this host, so all-reduce through shared memory."""
        from ..model_runner import ModelRunner
        s = self.spec
        if shm_name is not None:
            from .shm_allreduce import ShmAllReduce
            self._shm = ShmAllReduce(shm_name, self.rank, self.tp, s["max_step_tokens"] * self.model.args.hidden_size)
        static = None
        if s.get("kv_qparams"):  # this rank's KV heads of the static parameters
            from ..layers.kv_quant import load_kv_qparams
            static = load_kv_qparams(s["kv_qparams"], s["quant_policy"], self.model.args.num_layers,
                                     self.model.total_kv_heads, self.model.kv_head_ids)
        self.runner = ModelRunner(self.model, num_blocks, s["block_size"], self.device, getattr(torch, s["dtype"]),
                                  s["eos_token_ids"], s["rope_scaling_factor"], s["seed"], s["quant_policy"],
                                  matmul_precision=s.get("matmul_precision", "highest"), kv_static=static)
        self.model.fused_decoder = None  # the fused CPU decoder has no all-reduce between its layers
        return self.runner.kv_bytes()

    def _bind(self) -> None:
        if self.device == "cpu" and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)

    def execute(self, sched):
        self._bind()
        out = self.runner.execute(sched, sample_tokens=self.rank == 0)
        return out if self.rank == 0 else None

    def logits_for(self, sched, all_rows: bool = False) -> Optional[torch.Tensor]:
        self._bind()
        logits = self.runner.logits_for(sched, all_rows)
        return logits.cpu() if self.rank == 0 else None

    def step(self, msg):
        """The step entry point: ("execute", sched), ("logits", sched, all_rows) or ("noop", sched)."""
        if msg[0] == "execute":
            return self.execute(msg[1])
        if msg[0] == "logits":
            return self.logits_for(msg[1], msg[2])
        if msg[0] == "noop":  # dispatch probe (bench/tp.py)
            return None
        raise ValueError(f"unknown step kind {msg[0]!r}")

    def allreduce_probe(self, numel: int, iters: int, gloo: bool = False) -> float:
        """Median seconds of one all-reduce of ``numel`` float32 values, the engine's path or torch.distributed's
        (bench/tp.py; all ranks at once)."""
        import statistics
        t = torch.ones(numel, device=self.device)
        fn = _all_reduce if gloo else self._reduce
        for _ in range(10):
            fn(t)
        ts = []
        for _ in range(iters):
            a = time.perf_counter()
            fn(t)
            ts.append(time.perf_counter() - a)
        return statistics.median(ts)

    def ping(self) -> int:
        return self.rank

    def unlink_shared(self) -> None:
        """Once every rank has mapped the shared buffer its file name can go (the mappings stay)."""
        if self._shm is not None:
            self._shm.close()

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    t = t.contiguous()
    dist.all_reduce(t)
    return t
