"""The synchronous engine: requests in, one scheduled model step at a time, deltas out."""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from .config import EngineConfig, resolve_device, resolve_dtype
from .core.scheduler import Scheduler, SchedulerConfig
from .core.sequence import Sequence
from .generation import GenerationConfig
from .layers.attention import KVCache
from .layers.kv_quant import check_policy
from .model_runner import ModelRunner
from .models.loader import load_model
from .outputs import RequestOutput
from .prompts import Prompt, encode_prompt
from .request_state import RequestState
from .spec_decode import NgramProposer, eligible
from .step_trace import StepTrace

logger = logging.getLogger(__name__)
_ids = itertools.count()


def _eos_ids(model_dir, args, tokenizer) -> List[int]:
    ids = set(args.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set([e] if isinstance(e, int) else (e or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def plan_num_blocks(cfg: EngineConfig, args, device: str, dtype: torch.dtype, session_len: int,
                    free_bytes: Optional[int] = None) -> int:
    """KV blocks from the budget: explicit count, GPU fraction or block count, CPU fraction or GiB.
    ``free_bytes``: device memory left after the weights (tensor-parallel workers report it)."""
    per_block = KVCache.bytes_per_block(args.num_layers, cfg.block_size, args.num_kv_heads, args.head_dim, dtype,
                                        cfg.quant_policy)
    if cfg.num_cpu_blocks is not None:
        return cfg.num_cpu_blocks
    budget = cfg.cache_max_entry_count
    if budget is None:
        budget = 0.8 if device == "cuda" else 2
    if device == "cuda":
        free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info()[0]
        n = int(free * budget) // per_block if budget < 1 else int(budget)
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        nbytes = avail * budget if budget < 1 else budget * 2**30
        n = int(nbytes) // per_block
        # on CPU memory is touched as it is zeroed: never hold more than the batch can use
        n = min(n, cfg.max_batch_size * -(-session_len // cfg.block_size))
    return max(n, 1)


class LLMEngine:
    def bind_threads(self) -> None:
        """Set torch's (and the native kernels') CPU threads for the calling thread: OpenMP's thread count is
        per thread, and Ray workers start with OMP_NUM_THREADS=1, so a stepping thread must call this itself."""
        if self.device == "cpu":
            torch.set_num_threads(self.config.num_threads or len(os.sched_getaffinity(0)))

    def __init__(self, config: Optional[EngineConfig] = None, **kwargs):
        cfg = config or EngineConfig(**kwargs)
        self.config = cfg
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        self.bind_threads()
        from transformers import AutoTokenizer

        free_bytes = None
        if cfg.tp > 1:  # checked against the model's heads before any worker starts
            self.model, self.model_dir, args, local_args = None, *self._tp_plan(cfg)
        else:
            if cfg.gguf_weights == "native":
                if self.device != "cpu":
                    raise ValueError(f"gguf_weights: native runs on CPU, not {self.device}; set device cpu")
                from .models.gguf_q4 import load_native
                self.model, self.model_dir = load_native(cfg.model)
            else:
                self.model, self.model_dir = load_model(cfg.model, self.device, self.dtype)
            args = local_args = self.model.args
        self.args = args
        check_policy(cfg.quant_policy, args.head_dim)
        kv_static = self._kv_static(cfg, args)  # tensor parallel: checked here, each rank loads its heads
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.eos_token_ids = _eos_ids(self.model_dir, args, self.tokenizer)
        if cfg.tp > 1:
            self.runner = self._tp_executor(cfg)
            free_bytes = self.runner.free_bytes
        session_len = cfg.session_len or args.max_position_embeddings
        num_blocks = plan_num_blocks(cfg, local_args, self.device, self.dtype, session_len, free_bytes)
        capacity = num_blocks * cfg.block_size
        if session_len > capacity:
            logger.warning("session_len %d exceeds the KV cache (%d tokens); lowered to %d", session_len, capacity, capacity)
            session_len = capacity
        self.session_len = session_len
        self.model_name = cfg.model or "SmolLM2-135M-Instruct"
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch_size=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens,
            num_blocks=num_blocks, block_size=cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching))
        if cfg.tp > 1:
            self.runner.allocate(num_blocks)
        else:
            self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, self.device, self.dtype,
                                      self.eos_token_ids, cfg.rope_scaling_factor, cfg.seed, cfg.quant_policy,
                                      cuda_graph_max_batch=0 if cfg.eager_mode else cfg.max_batch_size,
                                      max_blocks_per_seq=-(-session_len // cfg.block_size),
                                      matmul_precision=cfg.matmul_precision, kv_static=kv_static)
        self.kv_bytes = self.runner.kv_bytes()
        kind = {0: str(self.dtype).replace("torch.", ""), 8: "int8", 4: "int4"}[cfg.quant_policy]
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s %s, quant_policy %d%s); session_len %d",
                    num_blocks, cfg.block_size, capacity, self.kv_bytes / 2**30, self.device, kind,
                    cfg.quant_policy, f", over {cfg.tp} ranks" if cfg.tp > 1 else "", session_len)
        if cfg.kv_qparams:
            logger.info("KV cache: static per-head int%d parameters from %s", cfg.quant_policy, cfg.kv_qparams)
        self.requests: Dict[str, RequestState] = {}
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self.proposer = None
        if cfg.num_speculative_tokens:
            self.proposer = NgramProposer(cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            self.stats.update(draft_tokens=0, accepted_draft_tokens=0)
            logger.info("speculative decoding: n-gram prompt lookup, up to %d draft tokens (n-grams %d..%d)",
                        cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        self.trace = StepTrace.from_env()  # RAYLM_STEP_TRACE: one line per step

    @staticmethod
    def _kv_static(cfg: EngineConfig, args):
        """The kv_qparams file's pairs for this cache (None without one); checked before any worker starts."""
        if not cfg.kv_qparams:
            return None
        if not cfg.quant_policy:
            raise ValueError("kv_qparams: static K/V parameters need quant_policy 8 or 4 (it is 0)")
        from .layers.kv_quant import load_kv_qparams
        return load_kv_qparams(cfg.kv_qparams, cfg.quant_policy, args.num_layers, args.num_kv_heads)

    def _tp_plan(self, cfg: EngineConfig):
        """Model folder, full and per-rank (largest) ModelArgs; the partition errors out before any work."""
        from .models.loader import read_model_args, resolve_model_path
        from .models.quant_config import read_quant_config
        from .parallel.loading import layouts_for
        from .parallel.shard import rank_args
        model_dir = resolve_model_path(cfg.model)
        args, hf = read_model_args(model_dir)
        layouts = layouts_for(model_dir, args, read_quant_config(hf), cfg.tp)
        widest = max(layouts, key=lambda l: l.num_kv_heads)
        return model_dir, args, rank_args(args, widest)

    def _tp_executor(self, cfg: EngineConfig):
        from .parallel.executor import RayTPExecutor
        spec = {"tp": cfg.tp, "model_dir": str(self.model_dir), "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "block_size": cfg.block_size,
                "eos_token_ids": self.eos_token_ids, "rope_scaling_factor": cfg.rope_scaling_factor,
                "matmul_precision": cfg.matmul_precision,
                "seed": cfg.seed, "quant_policy": cfg.quant_policy, "num_threads": cfg.num_threads,
                # absolute: workers may start in another directory (the file must exist on their nodes too)
                "kv_qparams": str(Path(cfg.kv_qparams).expanduser().resolve()) if cfg.kv_qparams else None,
                "max_step_tokens": cfg.max_prefill_tokens + cfg.max_batch_size}
        return RayTPExecutor(spec, placement=cfg.tp_placement, worker_cpus=cfg.tp_worker_cpus)

    def shutdown(self) -> None:
        """Release the tensor-parallel workers (no-op in process)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: Union[Prompt, List[int]], params: Optional[GenerationConfig] = None,
                    request_id: Optional[str] = None) -> str:
        """Validate and queue a request; raises ValueError naming the bad field."""
        params = params or GenerationConfig()
        if not isinstance(params, GenerationConfig):
            params = GenerationConfig(**params)
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) >= self.session_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit session_len {self.session_len} "
                             "(prompt plus at least one output token)")
        rid = request_id if request_id is not None else f"req-{next(_ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id: {rid!r} is already in use")
        max_tokens = min(self.session_len, len(ids) + params.max_new_tokens)
        seq = Sequence(request_id=rid, token_ids=list(ids), num_prompt_tokens=len(ids), max_tokens=max_tokens,
                       params=params)
        self.scheduler.add(seq)
        self.requests[rid] = RequestState(seq, params, self.tokenizer, self.eos_token_ids)
        self.stats["prompt_tokens"] += len(ids)
        return rid

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request and free its blocks at once."""
        st = self.requests.pop(request_id, None)
        if st is None:
            return None
        self._finish(request_id, "abort")
        st.finish_reason = "abort"
        return st.take_delta(finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------
    def _finish(self, request_id: str, reason: str) -> None:
        self.scheduler.finish(request_id, reason)
        if self.proposer is not None:
            self.proposer.drop(request_id)

    def _propose(self) -> None:
        """Draft tokens for every running greedy sequence about to decode (speculative decoding)."""
        found, decoding = [], 0
        for seq in self.scheduler.running:
            seq.draft_ids = []
            if seq.num_uncomputed == 1:
                decoding += 1
                if eligible(seq.params, seq.num_output_tokens):
                    # room for the drafts and the token after them
                    draft, n = self.proposer.propose(seq, seq.max_tokens - seq.num_tokens - 1)
                    if draft:
                        found.append((n, seq, draft))
        # drafts cost rows: within the step's row budget, the ones found by the longest n-grams first
        rows = self.config.speculative_max_rows - decoding
        for _, seq, draft in sorted(found, key=lambda f: -f[0]):
            if rows <= 0:
                break
            seq.draft_ids = draft[:rows]
            rows -= len(seq.draft_ids)

    def step(self) -> List[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        if not sched:
            if sched.finished_ids:
                self.runner.execute(sched)  # lets the runner drop state
            return []
        t0, c0 = time.time(), time.perf_counter()
        result = self.runner.execute(sched)
        if self.trace is not None:
            self.trace.record(t0, time.perf_counter() - c0, sched)
        grew = self.scheduler.update(sched, result)
        self.stats["steps"] += 1
        if result.accepted:
            self.stats["draft_tokens"] += sum(m.num_draft for m in sched.seqs)
            self.stats["accepted_draft_tokens"] += sum(len(v) for v in result.accepted.values())
            for m in sched.seqs:
                if m.num_draft:
                    self.proposer.record(m.request_id, m.num_draft, len(result.accepted.get(m.request_id, ())))
        outputs = []
        for seq in grew:
            st = self.requests[seq.request_id]
            new = 1 + len(result.accepted.get(seq.request_id, ()))
            toks = seq.token_ids[-new:]
            del seq.token_ids[-new:]
            reason = None
            for tok in toks:  # one at a time, so that stop checks see the output as it was at that token
                seq.token_ids.append(tok)
                reason = st.on_token(tok, result.logprobs.get(seq.request_id))
                self.stats["generation_tokens"] += 1
                if reason is not None:
                    break
            if reason is not None:
                self._finish(seq.request_id, reason)
                del self.requests[seq.request_id]
            outputs.append(st.take_delta(finished=reason is not None))
        return outputs

    def kv_usage(self) -> float:
        return self.scheduler.blocks.usage()
