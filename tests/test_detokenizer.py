"""Incremental detokenization never emits a broken character and adds up to the full decode."""
import pytest

from engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello, world! 你好，世界。", "emoji 🎉🚀 and 👩‍👩‍👧 family", "naïve café — 日本語のテキスト", "  leading spaces\nand\ttabs"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(smol_tok, text):
    prompt = smol_tok.encode("Say:")
    ids = smol_tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(smol_tok, prompt)
    pieces = [d.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == smol_tok.decode(ids)
    # multi-byte characters are split over tokens here, so some steps must hold text back
    if any(ord(c) > 0x2000 for c in text):
        assert "" in pieces


def test_skips_special_tokens(smol_tok):
    ids = smol_tok.encode("hi", add_special_tokens=False) + [smol_tok.eos_token_id]
    d = IncrementalDetokenizer(smol_tok, [], skip_special_tokens=True)
    assert "".join(d.add(t) for t in ids) == "hi"
