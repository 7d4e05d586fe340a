"""OpenAI response bodies (chat and completions, whole and streamed) from the engine's wire dicts."""
from __future__ import annotations

import time
from typing import List, Optional


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def _bytes(s: str) -> List[int]:
    return list(s.encode("utf-8"))


def chat_logprobs(items: List[dict]) -> dict:
    return {"content": [{"token": x["token"], "logprob": x["logprob"], "bytes": _bytes(x["token"]),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)} for t, lp in x["top"]]}
                        for x in items]}


def completion_logprobs(items: List[dict], text_offset: int = 0) -> dict:
    offsets, pos = [], text_offset
    for x in items:
        offsets.append(pos)
        pos += len(x["token"])
    return {"tokens": [x["token"] for x in items], "token_logprobs": [x["logprob"] for x in items],
            "top_logprobs": [{t: lp for t, lp in x["top"]} for x in items], "text_offset": offsets}


def base(kind: str, rid: str, model: str) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


def chat_choice(index: int, text: str, finish: Optional[str], logprobs: Optional[List[dict]]) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(logprobs) if logprobs is not None else None, "finish_reason": finish}


def completion_choice(index: int, text: str, finish: Optional[str], logprobs: Optional[List[dict]]) -> dict:
    return {"index": index, "text": text, "logprobs": completion_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": finish}


def chat_chunk_choice(index: int, delta: dict, finish: Optional[str], logprobs: Optional[List[dict]]) -> dict:
    return {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs) if logprobs else None,
            "finish_reason": finish}
