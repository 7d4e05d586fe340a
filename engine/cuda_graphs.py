"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at start.

A decode step of a 7B model launches hundreds of kernels; launched one by one from Python it takes longer
than the GPU needs to read the weights. A graph replays the whole step in one call. Its inputs live in
static buffers (token ids, positions, KV slots, block tables, context lengths) that each step fills by one
copy from pinned host memory; a batch is padded to the next captured size, and the padding rows write
their K/V into a scratch block that no sequence owns, with a context of one token.

``DecodeGraphs(..., capture=False)`` runs the same padded static-buffer step without graphs (the CPU tests
check it against the ordinary step; a GPU test checks the replay against it).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch

from .layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_sizes(max_batch: int) -> List[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (as vLLM pads), max_batch itself last."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv, rope, device: str, max_batch: int, max_blocks: int, scratch_block: int,
                 capture: bool = True):
        self.model, self.kv, self.rope, self.device = model, kv, rope, device
        self.max_batch, self.max_blocks, self.scratch = max_batch, max_blocks, scratch_block
        self.sizes = graph_sizes(max_batch)
        pin = device == "cuda"
        # rows: token ids, positions, slot blocks, slot offsets; then block tables and context lengths
        self.host_ints = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin)
        # context lengths, each row's count of its sequence's rows so far (drafts), then block tables (row
        # prefixes of all three stay contiguous for the kernels)
        self.host_tables = torch.zeros(max_batch * (max_blocks + 2), dtype=torch.int32, pin_memory=pin)
        self.ints = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_batch * (max_blocks + 2), dtype=torch.int32, device=device)
        self.ctx_lens = self.tables[:max_batch]
        self.fresh = self.tables[max_batch:2 * max_batch]
        self.block_tables = self.tables[2 * max_batch:].view(max_batch, max_blocks)
        self.sample_idx = torch.arange(max_batch, device=device)
        self.copied = torch.cuda.Event() if device == "cuda" else None
        self.graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.capture = capture
        if capture:
            self._capture_all()

    def _step(self, B: int) -> torch.Tensor:
        """The model on the first B rows of the static buffers -> logits [B, vocab]."""
        ids, pos, blocks, offsets = self.ints[:, :B]
        meta = AttentionMetadata(positions=pos, slot_blocks=blocks, slot_offsets=offsets, num_decode=B,
                                 decode_block_tables=self.block_tables[:B], decode_ctx_lens=self.ctx_lens[:B],
                                 decode_fresh=self.fresh[:B])
        meta.cos, meta.sin = self.rope.cos_sin(pos)
        return self.model(ids, meta, self.kv, self.sample_idx[:B])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._fill([])  # every row padding: capture writes only to the scratch block
        self.ints.copy_(self.host_ints)
        self.tables.copy_(self.host_tables)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for B in reversed(self.sizes):  # largest first, so the smaller graphs reuse its pool
                self._step(B)  # compiles the Triton kernels for this size outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[B] = self._step(B)
                self.graphs[B] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("CUDA graphs: decode steps captured for batch sizes %s (max %d blocks per sequence)",
                    self.sizes, self.max_blocks)

    def fits(self, seqs: Sequence) -> bool:
        """Whether a step of these sequences (one row per token: the last token, then any drafts) fits."""
        return (sum(len(m.token_ids) for m in seqs) <= self.max_batch
                and all(len(m.block_ids) <= self.max_blocks for m in seqs))

    def _fill(self, seqs: Sequence) -> None:
        """The step's rows into the pinned buffers (through numpy views of them). Each sequence's block-table
        row gets its own blocks only: the kernels read a row no further than its context, so what lies
        beyond stays from earlier steps (a row is max_blocks long, up to session_len / block_size)."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffers
        rows = [(m, i) for m in seqs for i in range(len(m.token_ids))]  # a sequence's drafts: one row each
        n, bs = len(rows), self.kv.block_size
        ints = self.host_ints.numpy()
        ctx = self.host_tables[:self.max_batch].numpy()
        fresh = self.host_tables[self.max_batch:2 * self.max_batch].numpy()
        tables = self.host_tables[2 * self.max_batch:].view(self.max_batch, self.max_blocks).numpy()
        ints[:, n:] = 0
        ints[2, n:] = self.scratch  # padding rows write their K/V into the scratch block
        ctx[n:] = 1
        fresh[n:] = 1
        tables[n:, 0] = self.scratch
        for i, (m, j) in enumerate(rows):
            p = m.start_pos + j
            ints[0, i], ints[1, i] = m.token_ids[j], p
            ints[2, i], ints[3, i] = m.block_ids[p // bs], p % bs
            ctx[i] = p + 1  # each row attends to the cache up to itself: a draft sees the rows before it
            fresh[i] = j + 1
            tables[i, :len(m.block_ids)] = m.block_ids

    def run(self, seqs: Sequence) -> torch.Tensor:
        """Decode-only step for ``seqs`` (each its last token, then its drafts if any) -> logits [rows, vocab]
        (float32), one row per token in order: a view of the graph's output buffer, valid until the next step."""
        n = sum(len(m.token_ids) for m in seqs)
        B = next(b for b in self.sizes if b >= n)
        self._fill(seqs)
        self.ints.copy_(self.host_ints, non_blocking=True)
        self.tables.copy_(self.host_tables, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if not self.capture:
            return self._step(B)[:n]
        self.graphs[B].replay()
        return self.outputs[B][:n]
