"""ModelRunner: owns the weights, the paged KV cache and sampling state; runs one scheduled step."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from .core.messages import RunnerOutput, SchedulerOutput
from .layers.attention import AttentionMetadata, KVCache, PrefillChunk
from .layers.rotary import RotaryEmbedding
from .models.llama import LlamaModel
from .sampler import SamplingState, draw, filter_logits, gather_logprobs, sample

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, device: str, dtype: torch.dtype,
                 eos_token_ids: List[int], rope_scaling_factor: float = 0.0, default_seed: int = 0,
                 quant_policy: int = 0, cuda_graph_max_batch: int = 0, max_blocks_per_seq: int = 0,
                 matmul_precision: str = "highest", kv_static: Optional[torch.Tensor] = None):
        """``cuda_graph_max_batch`` > 0 (CUDA only): decode steps of up to that many sequences, each of up to
        ``max_blocks_per_seq`` blocks, replay CUDA graphs (engine/cuda_graphs.py); the cache then holds one
        scratch block beyond ``num_blocks`` for the graphs' padding rows. ``kv_static``: static per-head
        (scale, min) pairs for a quantized cache (kv_quant.load_kv_qparams)."""
        a = model.args
        self.model, self.device, self.dtype, self.block_size = model, device, dtype, block_size
        self._usable_blocks = num_blocks
        graphs = cuda_graph_max_batch > 0 and device == "cuda"
        if device == "cuda":  # before the KV cache takes its memory: the timing and the repacking need some
            from .kernels.awq_tune import tune_model
            from .layers.awq_linear import GPU_LAYOUT, use_gpu_layout
            layout = tune_model(model, device, dtype)  # one-row tiles per layer shape and the layout (cached)
            if use_gpu_layout(model, layout):
                logger.info("W4A16 layers repacked to the %s layout", layout or GPU_LAYOUT)
                torch.cuda.empty_cache()
        self.kv = KVCache(a.num_layers, num_blocks + int(graphs), block_size, a.num_kv_heads, a.head_dim, dtype,
                          device, quant_policy, kv_static)
        self.rope = RotaryEmbedding(a.head_dim, a.rope_theta, a.max_position_embeddings, a.rope_scaling,
                                    dynamic_factor=rope_scaling_factor, device=device)
        self.eos_token_ids = list(eos_token_ids)
        self.states: Dict[str, SamplingState] = {}
        self._seed_base = default_seed
        self.graphs = None
        self.greedy_head = None  # CPU float32: greedy steps screen the LM head (kernels/greedy_head.py)
        if device == "cuda":
            self._use_triton_decode(quant_policy)
            self._use_gpu_fused(quant_policy)
        elif quant_policy:  # quantized blocks on CPU: the native layers where built, else the torch path
            logger.info("paged attention over int%d KV blocks", quant_policy)
        if device == "cpu":
            from .host_memory import keep_freed_memory, params_to_huge_pages
            keep_freed_memory()  # a prefill step's large buffers come back from the heap, not fresh pages
            params_to_huge_pages(model)  # before anything keeps pointers to them (the fused decoder)
        if device == "cpu" and dtype == torch.float32:
            from .kernels import cpu_gemm
            from .layers.awq_linear import use_cpu_layout
            if use_cpu_layout(model):
                logger.info("W4A16 layers repacked to the native CPU kernel's 4-bit panels")
            packed = cpu_gemm.pack_model(model, matmul_precision, release=True)  # the fused decoder takes its layout
            if packed:
                logger.info("CPU float32 products: %s over %d packed weights", cpu_gemm.backend(), packed)
            self._use_native_decode(quant_policy)
            self.greedy_head = _greedy_head(model)
        if graphs and not self.rope.dynamic_factor:  # dynamic NTK needs each step's lengths on the host
            from .cuda_graphs import DecodeGraphs
            max_blocks = max_blocks_per_seq or -(-a.max_position_embeddings // block_size)
            self.graphs = DecodeGraphs(model, self.kv, self.rope, device, cuda_graph_max_batch,
                                       min(max_blocks, num_blocks), scratch_block=num_blocks)

    def _use_gpu_fused(self, quant_policy: int) -> None:
        from .kernels.gpu_fused import HAVE_TRITON, rope_ok
        if HAVE_TRITON and all(layer.reduce is None for layer in self.model.layers):
            self.model.use_gpu_fused(rope_in_kernel=rope_ok(self.model.args.head_dim))
            attn = self.model.layers[0].attn
            logger.info("GPU layers: fused Triton RMSNorm, SiLU-mul%s", " and RoPE + KV write + paged attention"
                        if attn.fused_attend else " and RoPE + KV write" if attn.fused_rope else "")

    def _use_triton_decode(self, quant_policy: int) -> None:
        from .kernels.paged_attention_quant_triton import triton_quant_decode
        from .kernels.paged_attention_triton import HAVE_TRITON, _pow2, triton_decode
        width = self.model.args.head_dim // (2 if quant_policy == 4 else 1)
        if not (HAVE_TRITON and _pow2(width) and _pow2(self.block_size)):
            logger.info("paged decode: torch path (Triton needs power-of-two head_dim and block_size)")
            return
        fn = triton_quant_decode if quant_policy else triton_decode
        logger.info("paged decode: Triton kernel over %s KV blocks", f"int{quant_policy}" if quant_policy else "dense")
        for layer in self.model.layers:
            layer.attn.decode_fn = fn

    def _use_native_decode(self, quant_policy: int) -> None:
        """Native CPU steps: the attention kernel for the torch layers (float32 blocks), and the native layers
        (kernels/fused_decode.py), which also write and read int8 / int4 blocks."""
        from .kernels import cpu_native
        if cpu_native.lib() is None or self.model.args.num_heads // self.model.args.num_kv_heads > cpu_native.MAX_GROUP:
            return
        if not quant_policy:  # the kernel reads float32 blocks; quantized ones keep torch_decode in these layers
            for layer in self.model.layers:
                layer.attn.decode_fn = cpu_native.native_decode
        from .kernels.fused_decode import fused_decoder_for
        self.model.fused_decoder = fused_decoder_for(self.model, self.dtype)

    # ---- per-request state ----------------------------------------------------------------
    def _register(self, msg) -> None:
        p = msg.params
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(p.seed)
        blocked = [] if p.ignore_eos else list(self.eos_token_ids)
        self.states[msg.request_id] = SamplingState(
            params=p, prompt_ids=list(msg.prompt_token_ids), output_ids=list(msg.output_token_ids or []),
            blocked_until_min=blocked + list(p.stop_token_ids), generator=gen)

    # ---- inputs ---------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput):
        """Flat step inputs: decode rows first (one per decode, one per token of a sequence with drafts, each
        attending to the cache up to itself), then prefill chunks. Sampling rows: one per sampling sequence,
        then every row of each sequence with drafts (``verify``: (request_id, first logits row, drafts))."""
        decodes = [s for s in sched.seqs if s.num_draft or len(s.token_ids) == 1]
        prefills = [s for s in sched.seqs if not (s.num_draft or len(s.token_ids) == 1)]
        rows = [(s, i) for s in decodes for i in range(len(s.token_ids))]  # (msg, token index) per decode row
        sample_idx, sample_ids, verify_idx, verify = _decode_roles(decodes)
        bs = self.block_size
        tokens, positions, blocks, offsets, seq_lens = [], [], [], [], []
        chunks, spans, tables = [], [], []
        for msg, i in rows:
            p = msg.start_pos + i
            spans.append((len(tokens), 1, p))
            tables.append(msg.block_ids)
            tokens.append(msg.token_ids[i])
            positions.append(p)
            blocks.append(msg.block_ids[p // bs])
            offsets.append(p % bs)
            seq_lens.append(msg.start_pos + len(msg.token_ids))
        for msg in prefills:
            start = len(tokens)
            n = len(msg.token_ids)
            spans.append((start, n, msg.start_pos))
            tables.append(msg.block_ids)
            tokens += msg.token_ids
            pos = range(msg.start_pos, msg.start_pos + n)
            positions += pos
            blocks += [msg.block_ids[p // bs] for p in pos]
            offsets += [p % bs for p in pos]
            seq_lens += [msg.start_pos + n] * n
            if msg.sample:
                sample_idx.append(start + n - 1)
                sample_ids.append(msg.request_id)
            chunks.append((msg, start, n))
        dev = self.device
        positions_t = torch.tensor(positions, device=dev)
        seq_lens_t = torch.tensor(seq_lens, device=dev)
        meta = AttentionMetadata(positions=positions_t, slot_blocks=torch.tensor(blocks, device=dev),
                                 slot_offsets=torch.tensor(offsets, device=dev), num_decode=len(rows))
        if rows:
            idx = torch.int32 if dev == "cpu" else torch.long  # int32 for the native CPU kernel
            meta.decode_block_tables = _block_tables(tables[:len(rows)], dev, idx)
            meta.decode_ctx_lens = torch.tensor([positions[r] + 1 for r in range(len(rows))], device=dev, dtype=idx)
            if self.model.gpu_fused:  # the fused RoPE + attention kernel: which rows of this step come before
                meta.decode_fresh = torch.tensor([i + 1 for _, i in rows], device=dev, dtype=torch.int32)
        for msg, start, n in chunks:
            ctx_blocks = None
            if msg.start_pos > 0:
                used = -(-(msg.start_pos + n) // bs)
                ctx_blocks = torch.tensor(msg.block_ids[:used], device=dev)
            meta.prefills.append(PrefillChunk(start, n, msg.start_pos, ctx_blocks))
        if self.model.fused_decoder is not None:  # the native CPU step reads every sequence's blocks
            meta.span_block_tables = _block_tables(tables, dev, torch.int32)
            meta.spans = torch.tensor(spans, dtype=torch.int32)
        meta.cos, meta.sin = self.rope.cos_sin(positions_t, seq_lens_t)
        sample_idx = torch.tensor(sample_idx + verify_idx, device=dev, dtype=torch.long)
        return torch.tensor(tokens, device=dev), meta, sample_idx, sample_ids, verify

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, sample_tokens: bool = True) -> RunnerOutput:
        """One step. ``sample_tokens=False`` (tensor-parallel ranks > 0) runs the layers for their KV writes
        and all-reduces, skips the LM head and sampling, and returns an empty output."""
        for rid in sched.finished_ids:
            self.states.pop(rid, None)
        for msg in sched.seqs:
            if msg.params is not None:
                self._register(msg)
        out = RunnerOutput()
        if not sched.seqs:
            return out
        if sample_tokens and self._graph_step(sched):
            logits = self.graphs.run(sched.seqs)
            sample_rows, sample_ids, verify_rows, verify = _decode_roles(sched.seqs)
            if verify:
                self._verify(out, logits[verify_rows], verify)
            if not sample_ids:
                return out
            return self._sample(out, logits[sample_rows], sample_ids)
        input_ids, meta, sample_idx, sample_ids, verify = self.prepare(sched)
        if not sample_tokens:
            self.model(input_ids, meta, self.kv, sample_idx[:0])
            return out
        if self._screens(sample_ids, verify):
            h = self.model(input_ids, meta, self.kv, sample_idx, head=False)
            tokens = self.greedy_head.tokens(h)
            if tokens is not None:
                best = tokens.tolist()
                if verify:
                    self._verify(out, None, verify, best[len(sample_ids):])
                return self._take(out, best[:len(sample_ids)], sample_ids)
            logits = self.model.lm_head.forward_wide(h).float()  # too close to call: every logit
        else:
            logits = self.model(input_ids, meta, self.kv, sample_idx)
        if verify:
            self._verify(out, logits[len(sample_ids):], verify)
        if not sample_ids:
            return out
        return self._sample(out, logits[:len(sample_ids)], sample_ids)

    def _screens(self, sample_ids: List[str], verify) -> bool:
        """Whether this step's tokens come from the greedy screen: every row's token is the argmax of its raw
        logits (plain greedy sampling rows; greedy requests' draft verification, see _verify)."""
        return (self.greedy_head is not None and bool(sample_ids or verify)
                and all(_plain_greedy(self.states[r]) for r in sample_ids)
                and all(self.states[rid].params.greedy for rid, _, _ in verify))

    def _verify(self, out: RunnerOutput, logits: Optional[torch.Tensor], verify,
                best: Optional[List[int]] = None) -> None:
        """Verification of drafts. Greedy requests keep the longest run of drafts equal to the argmax before
        each, then the argmax after the last kept one (the token the step would have sampled without drafts);
        sampled ones keep each draft with its probability (accept_sampled). ``best``: the rows' argmax tokens
        when the greedy screen gave them (every request greedy; no logits then)."""
        if best is None:
            best = logits.argmax(-1).tolist()
        for rid, row, drafts in verify:
            st = self.states[rid]
            if st.params.greedy:
                kept, choice = accept_greedy(drafts, best[row:row + len(drafts) + 1])
            else:
                rows = logits[row:row + len(drafts) + 1]
                kept, choice = accept_sampled(drafts, filter_logits(rows, [st] * len(rows)).softmax(-1), st)
            out.accepted[rid] = kept
            out.sampled[rid] = choice
            st.output_ids += kept + [choice]

    def _graph_step(self, sched: SchedulerOutput) -> bool:
        return (self.graphs is not None and all(len(m.token_ids) == 1 or m.num_draft for m in sched.seqs)
                and self.graphs.fits(sched.seqs))

    def _sample(self, out: RunnerOutput, logits: torch.Tensor, sample_ids: List[str]) -> RunnerOutput:
        states = [self.states[r] for r in sample_ids]
        tokens, raw = sample(logits, states)
        self._take(out, tokens.tolist(), sample_ids)
        if raw is not None:
            for i, lp in gather_logprobs(raw, tokens, states).items():
                out.logprobs[sample_ids[i]] = lp
        return out

    def _take(self, out: RunnerOutput, tokens: List[int], sample_ids: List[str]) -> RunnerOutput:
        for rid, tok in zip(sample_ids, tokens):
            self.states[rid].output_ids.append(tok)
            out.sampled[rid] = tok
        return out

    @torch.inference_mode()
    def logits_for(self, sched: SchedulerOutput, all_rows: bool = False) -> torch.Tensor:
        """Run a step and return the logits of the sampling rows (or of every token) without sampling
        (tests, perplexity, benchmarks). A decode-only step that fits the CUDA graphs replays them and returns
        every row's logits (drafts' rows included)."""
        if not all_rows and self._graph_step(sched):
            return self.graphs.run(sched.seqs).clone()  # the graph's output buffer is the next step's too
        input_ids, meta, sample_idx, _, _ = self.prepare(sched)
        if all_rows:
            sample_idx = torch.arange(len(input_ids), device=input_ids.device)
        return self.model(input_ids, meta, self.kv, sample_idx)

    @property
    def num_blocks(self) -> int:
        return self._usable_blocks

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv.data, self.kv.params) if t is not None)


def _decode_roles(msgs):
    """The logits rows of a decode step whose rows are ``msgs``' tokens in order (each message its last token,
    then any drafts): (rows that sample, their request ids, rows to verify, and per message with drafts
    (request_id, its first row among the rows to verify, its drafts))."""
    row, sample_rows, sample_ids, verify_rows, verify = 0, [], [], [], []
    for m in msgs:
        if m.num_draft:
            verify.append((m.request_id, len(verify_rows), m.token_ids[1:]))
            verify_rows += range(row, row + len(m.token_ids))
        elif m.sample:
            sample_rows.append(row)
            sample_ids.append(m.request_id)
        row += len(m.token_ids)
    return sample_rows, sample_ids, verify_rows, verify


def _plain_greedy(st: SamplingState) -> bool:
    """Whether the request's next token is the argmax of the raw logits, read for nothing else: greedy, no
    logprobs, no penalties, no ban of end tokens before min_new_tokens (sampler.sample's order)."""
    p = st.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and not (len(st.output_ids) < p.min_new_tokens and st.blocked_until_min))


def _greedy_head(model):
    """The LM head's greedy screen, unless RAYLM_GREEDY_SCREEN=0 or the head or processor cannot take it."""
    if os.environ.get("RAYLM_GREEDY_SCREEN", "1") == "0":
        return None
    from .kernels.greedy_head import greedy_head_for
    gh = greedy_head_for(model.lm_head)
    if gh is not None:
        logger.info("greedy steps screen the LM head on an int8 copy (%.1f MiB)", gh.nbytes / 2**20)
    return gh


def accept_greedy(drafts: List[int], best: List[int]):
    """drafts [k], best [k+1] (argmax at the last token and after each draft) -> (kept drafts, next token)."""
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return list(drafts[:a]), best[a]


def accept_sampled(drafts: List[int], probs: torch.Tensor, state: SamplingState):
    """drafts [k], probs [k+1, vocab] (the request's sampling distribution at the last token and after each
    draft) -> (kept drafts, next token), distributed as the model's own samples would be. The drafts come
    from a deterministic proposer, so the speculative-sampling rule (accept with min(1, p/q)) keeps draft i
    with probability p_i(draft); a rejection draws from p_i without the draft (the normalised excess of p over
    the proposal), and after k kept drafts the next token is drawn from p_k."""
    u = torch.rand(len(drafts), dtype=torch.float64, device=probs.device, generator=state.generator)
    for i, d in enumerate(drafts):
        if u[i] >= probs[i, d]:
            rest = probs[i:i + 1].clone()
            rest[0, d] = 0.0
            return list(drafts[:i]), int(draw(rest, [state])[0])
    return list(drafts), int(draw(probs[-1:], [state])[0])


def _block_tables(tables: List[List[int]], device: str, dtype: torch.dtype) -> torch.Tensor:
    """[len(tables), most blocks] block ids per row, short rows padded with their first block."""
    nb = max(len(t) for t in tables)
    return torch.tensor([t + [t[0]] * (nb - len(t)) for t in tables], device=device, dtype=dtype)
