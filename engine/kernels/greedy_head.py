"""Greedy tokens from a panel-packed LM head without every float32 logit (csrc/greedy_head.c).

An int8 copy of the head (a scale per 32 weights of a row, AVX-512 VNNI products) screens the vocabulary:
each logit gets an estimate and a rigorous bound on its distance from the float32 logit, and only the
entries that can still be the largest are computed in float32, by the same arithmetic as the full head's.
The token is the one ``argmax`` over the full head's logits gives, bit for bit; what it saves is most of the
head's products (about a sixth of a batch-32 decode step on SmolLM2) and two thirds of its bytes at batch 1.

The runner takes it for steps whose every row samples greedily with nothing that reads the logits
(logprobs, penalties, a min_new_tokens ban), and for greedy requests' draft verification; any other step,
or one whose candidates would cover more than MAX_PANEL_SHARE of the head, takes the full head.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import cpu_gemm, cpu_native

logger = logging.getLogger(__name__)

MAX_PANEL_SHARE = 1 / 4  # candidates in more of the head's 16-row panels than this: compute all of it
# after this many screens in a row that had to compute every logit anyway, the next BACKOFF_STEPS steps skip
# the screen (a model or a batch whose logits stay close together pays for the screen and the full head)
GIVE_UP_AFTER, BACKOFF_STEPS = 8, 64


def available() -> bool:
    so = cpu_native.lib()
    return so is not None and bool(so.gh_available())


class GreedyHead:
    """The int8 screen of one panel-packed head ([V, K] as ``cpu_gemm.Panels``)."""

    def __init__(self, panels: cpu_gemm.Panels):
        so = cpu_native.lib()
        V, K = panels.out_features, panels.in_features
        rows = -(-V // 16) * 16
        self.panels, self.V, self.K = panels, V, K
        self.q = torch.empty(int(so.gh_packed_bytes(V, K)), dtype=torch.uint8)
        self.meta = torch.empty(int(so.gh_meta_floats(V, K)))
        self.bad = int(so.gh_pack(panels.data.data_ptr(), V, K, self.q.data_ptr(), self.meta.data_ptr(),
                                  torch.get_num_threads()))
        self.max_panels = max(1, int(rows // 16 * MAX_PANEL_SHARE))
        self.screened = self.fallbacks = 0  # steps each way (tests and logs)
        self._misses = self._skip = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.meta))

    def tokens(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x [M, K] float32 (the normed last hidden states) -> the argmax token of each row's logits [M]
        (int64), or None when the screen cannot narrow it down (the caller computes every logit)."""
        if self._skip:
            self._skip -= 1
            return None
        x = x.contiguous()
        M = x.shape[0]
        out = torch.empty(M, dtype=torch.long)
        rc = cpu_native.lib().gh_greedy(x.data_ptr(), M, self.K, self.V, self.panels.data.data_ptr(),
                                        self.q.data_ptr(), self.meta.data_ptr(), self.max_panels, out.data_ptr(),
                                        torch.get_num_threads())
        if rc:
            self.fallbacks += 1
            self._misses += 1
            if self._misses >= GIVE_UP_AFTER:
                self._misses, self._skip = 0, BACKOFF_STEPS
            return None
        self.screened += 1
        self._misses = 0
        return out


def greedy_head_for(lm_head) -> Optional[GreedyHead]:
    """A GreedyHead for this LM head when its products are panel_linear's alone (the packed copy takes every
    product: the row-major weight released, no bf16x3 copy, no bias) and the processor has AVX-512 VNNI."""
    packed = getattr(lm_head, "packed", None)
    if (not isinstance(packed, cpu_gemm.Panels) or packed.x3 is not None or not lm_head.released
            or lm_head.bias is not None or not available()):
        return None
    head = GreedyHead(packed)
    if head.bad:
        logger.warning("LM head holds %d non-finite weights: greedy steps compute every logit", head.bad)
        return None
    return head
