"""The terminal chat (driven through stdin) and the file generator, with HF greedy decoding as the oracle."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def hf_chat_reply(hf, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    x = torch.tensor([tok.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def run_cli(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_chat_streams_keeps_history_and_resets(smol_hf, smol_tok):
    q1, q2 = "My favourite fruit is mango.", "What is my favourite fruit?"
    stdin = f"{q1}\n{q2}\n/reset\n{q2}\n/exit\n"
    p = run_cli(["chat", "--temperature", "0", "--max-new-tokens", "16", "--session-len", "1024"], stdin)
    assert p.returncode == 0, p.stderr
    replies = [part.split("\nuser> ")[0].strip() for part in p.stdout.split("assistant> ")[1:]]
    assert len(replies) == 3
    r1 = hf_chat_reply(smol_hf, smol_tok, [{"role": "user", "content": q1}], 16).strip()
    hist = [{"role": "user", "content": q1}, {"role": "assistant", "content": r1}, {"role": "user", "content": q2}]
    r2 = hf_chat_reply(smol_hf, smol_tok, hist, 16).strip()
    r3 = hf_chat_reply(smol_hf, smol_tok, [{"role": "user", "content": q2}], 16).strip()
    assert replies == [r1, r2, r3]
    assert "(history cleared)" in p.stdout


def test_generate_file_of_prompts(tmp_path, smol_hf, smol_tok):
    src = tmp_path / "prompts.txt"
    src.write_text("The capital of Italy is\nWater boils at\n\nThe largest planet is\n")
    dst = tmp_path / "out.jsonl"
    p = run_cli(["generate", "--input", str(src), "--output", str(dst), "--temperature", "0",
                 "--max-new-tokens", "6", "--num-speculative-tokens", "3"])  # greedy: drafts leave tokens alone
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The capital of Italy is", "Water boils at", "The largest planet is"]
    for r in rows:
        x = torch.tensor([smol_tok.encode(r["prompt"])])
        with torch.no_grad():
            out = smol_hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                   pad_token_id=2)
        assert r["text"] == smol_tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    assert "tokens/s" in p.stderr


def test_generate_reports_bad_input(tmp_path):
    p = run_cli(["generate", "--input", str(tmp_path / "missing.txt")])
    assert p.returncode != 0 and "missing.txt" in p.stderr
