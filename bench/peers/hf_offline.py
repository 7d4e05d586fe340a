"""Hugging Face ``generate`` throughput on a prompt set of token ids, in an interpreter of its own (so that
nothing our engine set up in the benchmark's process, such as its malloc settings, touches the baseline).

Usage: python hf_offline.py MODEL_DIR PROMPTS_JSON NEW_TOKENS
then one request per line on stdin, ``NUM_PROMPTS BATCH [LOOKUP]``: each runs the first NUM_PROMPTS prompts in
batches of BATCH (with ``prompt_lookup_num_tokens=LOOKUP`` when given: transformers' prompt-lookup speculative
decoding, batch 1 only) and answers with one line, {"tokens_per_s": rate}. The model stays loaded between requests,
so the benchmark can alternate these runs with its own; the process ends at end of input. The prompts are of
equal length, so batches need no padding.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def rate(model, prompts, new_tokens: int, batch: int, lookup: int = 0) -> float:
    t = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        x = torch.tensor(prompts[i:i + batch])
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=2, **extra)
        n += (out.shape[1] - x.shape[1]) * x.shape[0]
    return n / (time.perf_counter() - t)


def main():
    model_dir, prompts_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.load(open(prompts_file))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rate(model, prompts[:1], 2, 1)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        num_prompts, batch, *lookup = (int(v) for v in line.split())
        print(json.dumps({"tokens_per_s": rate(model, prompts[:num_prompts], new_tokens, batch, *lookup)}), flush=True)


if __name__ == "__main__":
    main()
