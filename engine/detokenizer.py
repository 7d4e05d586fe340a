"""Incremental detokenization that never emits a broken character.

Each step decodes a short window of tokens twice (with and without the new ones) and emits the
difference, holding text back while it ends in U+FFFD (an incomplete UTF-8 sequence).
"""
from __future__ import annotations

from typing import List

REPLACEMENT = "\ufffd"
PREFIX_WINDOW = 5  # prompt tokens kept as context so the first word's leading space decodes right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: List[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: List[int] = list(prompt_ids[-PREFIX_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """At the end: whatever is held back, replacement characters included."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
