"""llama.cpp (through llama-cpp-python) generating from token-id prompts one at a time, in an interpreter of
its own (the venv where llama-cpp-python is built, see ../shared/PEERS.md).

Usage: python llama_offline.py GGUF PROMPTS_JSON NEW_TOKENS THREADS
then one request per line on stdin, ``NUM_PROMPTS``: runs the first NUM_PROMPTS prompts one after the other
(llama.cpp's Python API decodes one sequence at a time) and answers with one line, {"tokens_per_s": rate}.
Greedy; the end-of-text tokens are blocked with a logit bias so that every prompt gets NEW_TOKENS tokens.
"""
import json
import sys
import time

from llama_cpp import Llama


def rate(llm, prompts, new_tokens: int, blocked) -> float:
    t = time.perf_counter()
    n = 0
    for ids in prompts:
        llm.reset()  # no prefix reuse between prompts: each is prefilled in full, as ours are
        out = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, top_k=1,
                                    logit_bias={i: -1e9 for i in blocked})
        n += out["usage"]["completion_tokens"]
    return n / (time.perf_counter() - t)


def main():
    gguf, prompts_file, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = json.load(open(prompts_file))
    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    blocked = {llm.token_eos()} | {i for i in range(3)}  # SmolLM2: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>
    rate(llm, prompts[:1], 2, blocked)  # warm-up
    print(json.dumps({"ready": True, "n_vocab": llm.n_vocab()}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"tokens_per_s": rate(llm, prompts[:int(line)], new_tokens, blocked)}), flush=True)


if __name__ == "__main__":
    main()
