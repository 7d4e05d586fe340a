"""Hugging Face ``generate`` throughput on a prompt set of token ids, in an interpreter of its own (so that
nothing our engine set up in the benchmark's process, such as its malloc settings, touches the baseline).

Usage: python hf_offline.py MODEL_DIR PROMPTS_JSON NUM_PROMPTS NEW_TOKENS BATCH REPEATS
-> prints {"tokens_per_s": [...]}. Runs the first NUM_PROMPTS prompts; they are of equal length, so batches
need no padding.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, prompts_file = sys.argv[1], sys.argv[2]
    num_prompts, new_tokens, batch, repeats = (int(v) for v in sys.argv[3:7])
    prompts = json.load(open(prompts_file))[:num_prompts]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = 0
        for i in range(0, len(prompts), batch):
            x = torch.tensor(prompts[i:i + batch])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
            n += (out.shape[1] - x.shape[1]) * x.shape[0]
        rates.append(n / (time.perf_counter() - t))
    print(json.dumps({"tokens_per_s": rates}))


if __name__ == "__main__":
    main()
