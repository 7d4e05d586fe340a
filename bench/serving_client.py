"""A load generator for OpenAI-compatible servers (like vLLM's benchmark_serving): N requests at
concurrency C over streaming /v1/completions; per-request TTFT, TPOT and end-to-end latency."""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import List

import httpx


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: List[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, status = None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    e2e = time.perf_counter() - t0
    out = usage["completion_tokens"] if usage else 0
    return {"status": status, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "output_tokens": out,
            "tpot": (e2e - (ttft or e2e)) / (out - 1) if out > 1 else 0.0}


async def run_load(url: str, model: str, prompts: List[List[int]], max_tokens: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def guarded(p):
            async with sem:
                try:
                    return await _one(client, url, model, p, max_tokens)
                except httpx.HTTPError:  # a dropped connection is a failed request, not the end of the load
                    return {"status": 0, "ttft": 0.0, "e2e": 0.0, "output_tokens": 0, "tpot": 0.0}
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency)


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(results: List[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["status"] == 200]
    s = {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
         "request_throughput": len(ok) / wall, "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / wall}
    for key in ("ttft", "tpot", "e2e"):
        xs = [r[key] for r in ok] or [0.0]
        s[key] = {"mean": statistics.fmean(xs), "median": statistics.median(xs), "p99": _pct(xs, 0.99)}
    return s
