"""The HTTP ingress: OpenAI routes on FastAPI, auth, validation, backpressure and streaming over SSE.

It calls the engine deployment through a DeploymentHandle (streaming). A stream the client drops is
cancelled downstream, which aborts the request in the engine and frees its KV blocks.
"""

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError

from . import responses as R
from .config import AppConfig
from .errors import OpenAIError, from_validation, from_value_error
from .metrics import ServeMetrics
from .metrics_hub import snapshot
from .protocol import ChatCompletionRequest, CompletionRequest

app = FastAPI(title="raylm: OpenAI-compatible API")


@app.exception_handler(OpenAIError)
async def _openai_error(_request: Request, exc: OpenAIError):
    return exc.response()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Choice:
    """One engine stream (a choice): its handle generator and the first item it produced."""

    def __init__(self, index: int, gen, first: dict):
        self.index, self.gen, self.first = index, gen, first

    async def items(self) -> AsyncIterator[dict]:
        yield self.first
        if not self.first["finished"]:
            async for item in self.gen:
                yield item


class OpenAIIngress:
    def __init__(self, engine, app_config: dict, hub_name: str):
        self.cfg = AppConfig(**app_config)
        self.engine = engine
        self.model = self.cfg.model_name
        self.keys = set(self.cfg.effective_api_keys())
        self.metrics = ServeMetrics(self.model)
        self.hub_name = hub_name

    # ---- plumbing -------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token not in self.keys:
            raise OpenAIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              code="invalid_api_key")

    async def _parse(self, request: Request, model_cls):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "body: not valid JSON", param="body", code="invalid_json")
        if not isinstance(body, dict):
            raise OpenAIError(400, "body: must be a JSON object", param="body", code="invalid_json")
        try:
            req = model_cls(**body)
        except ValidationError as e:
            raise from_validation(e)
        if req.model is not None and req.model != self.model:
            raise OpenAIError(404, f"model: {req.model!r} is not served here; available: [{self.model!r}]",
                              param="model", code="model_not_found")
        return req

    async def _start(self, rid: str, items: List[Tuple[int, object, object]]) -> List[_Choice]:
        """Submit (index, prompt, GenerationConfig) items; wait for each one's first item."""
        gens = []
        try:
            for idx, prompt, g in items:
                payload = {"prompt": prompt, "params": g.model_dump(), "request_id": f"{rid}-{idx}"}
                gens.append((idx, self.engine.options(stream=True).generate.remote(payload)))
            firsts = await asyncio.gather(*(g.__anext__() for _, g in gens))
        except BackPressureError:
            self._cancel(g for _, g in gens)
            raise OpenAIError(self.cfg.overload_status, "the server is overloaded; retry later",
                              code="server_overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)})
        except BaseException:
            self._cancel(g for _, g in gens)
            raise
        errors = [f for f in firsts if "error" in f]
        if errors:
            self._cancel(g for _, g in gens)
            raise from_value_error(ValueError(errors[0]["error"]), default_param="prompt")
        return [_Choice(idx, g, f) for (idx, g), f in zip(gens, firsts)]

    @staticmethod
    def _cancel(gens) -> None:
        for g in gens:
            try:
                g.cancel()
            except Exception:
                pass

    def _with_seed(self, g, i: int):
        return g if g.seed is None or i == 0 else g.model_copy(update={"seed": g.seed + i})

    async def _collect(self, choices: List[_Choice], t0: float):
        """Whole responses: per choice (text, finish_reason, logprobs) and the usage totals."""
        first_at = [None]

        async def one(c: _Choice):
            text, lps, last = [], None, None
            async for item in c.items():
                first_at[0] = first_at[0] or time.perf_counter()
                text.append(item["text"])
                if "logprobs" in item:
                    lps = (lps or []) + item["logprobs"]
                last = item
            return "".join(text), last, lps
        try:
            results = await asyncio.gather(*(one(c) for c in choices))
        finally:
            self._cancel(c.gen for c in choices)
        self._observe(t0, first_at[0], [r[1] for r in results])
        return results

    def _observe(self, t0: float, t_first: Optional[float], lasts: List[dict]) -> None:
        now = time.perf_counter()
        prompt = sum(x["prompt_tokens"] for x in lasts)
        completion = sum(x["completion_tokens"] for x in lasts)
        self.metrics.observe_request((t_first or now) - t0, now - t0, prompt, completion,
                                     [x["finish_reason"] if x.get("finished", True) else "abort" for x in lasts])

    # ---- routes ---------------------------------------------------------------------------
    async def health(self):
        snap = await self._snapshot()
        if not snap.get("replicas"):
            raise OpenAIError(503, "no engine replica is ready", code="unavailable")
        return {"status": "ok", "replicas": snap["replicas"]}

    async def metrics_route(self):
        return Response(self.metrics.render(await self._snapshot()), media_type="text/plain; version=0.0.4")

    async def _snapshot(self) -> dict:
        try:
            return await asyncio.wait_for(asyncio.to_thread(snapshot, self.hub_name), timeout=5)
        except Exception:
            return {}

    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "raylm"}]}

    async def _serve(self, request: Request, model_cls, rid_prefix: str, items_of, stream_of, body_of):
        """Shared flow of the generation routes: auth, parse, submit, then stream or collect."""
        t0 = time.perf_counter()
        try:
            self._auth(request)
            req = await self._parse(request, model_cls)
            try:
                items = items_of(req)
            except (ValueError, ValidationError) as e:
                raise _as_400(e)
            rid = f"{rid_prefix}-{uuid.uuid4().hex}"
            choices = await self._start(rid, items)
        except OpenAIError as e:
            self.metrics.error(e.status)
            raise
        if req.stream:
            return StreamingResponse(stream_of(rid, req, choices, t0), media_type="text/event-stream")
        results = await self._collect(choices, t0)
        body = body_of(rid, choices, results)
        body["usage"] = _usage([r[1] for r in results], per_prompt=req.n)
        return JSONResponse(body)

    async def chat_completions(self, request: Request):
        def items(req: ChatCompletionRequest):
            messages, g = req.to_engine()
            return [(i, messages, self._with_seed(g, i)) for i in range(req.n)]

        def body(rid, choices, results):
            return {**R.base("chat.completion", rid, self.model),
                    "choices": [R.chat_choice(c.index, text, last["finish_reason"], lps)
                                for c, (text, last, lps) in zip(choices, results)]}
        return await self._serve(request, ChatCompletionRequest, "chatcmpl", items, self._chat_stream, body)

    async def completions(self, request: Request):
        def items(req: CompletionRequest):
            prompts, g = req.to_engine()
            return [(p * req.n + i, prompt, self._with_seed(g, i)) for p, prompt in enumerate(prompts)
                    for i in range(req.n)]

        def body(rid, choices, results):
            return {**R.base("text_completion", rid, self.model),
                    "choices": [R.completion_choice(c.index, text, last["finish_reason"], lps)
                                for c, (text, last, lps) in zip(choices, results)]}
        return await self._serve(request, CompletionRequest, "cmpl", items, self._completion_stream, body)

    # ---- streaming ------------------------------------------------------------------------
    async def _merged(self, choices: List[_Choice]) -> AsyncIterator[Tuple[_Choice, dict]]:
        """Items of all choices as they come; cancels every stream when the consumer stops early."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice):
            try:
                async for item in c.items():
                    await queue.put((c, item))
            except Exception as e:  # engine replica died mid-stream
                await queue.put((c, {"error": str(e)}))
            finally:
                await queue.put((c, None))
        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            live = len(choices)
            while live:
                c, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                yield c, item
        finally:
            for t in tasks:
                t.cancel()
            self._cancel(c.gen for c in choices)

    async def _stream(self, kind: str, rid: str, req, choices: List[_Choice], t0: float, make_choice):
        base = R.base(kind, rid, self.model)
        lasts, t_first = {}, None
        try:
            async for c, item in self._merged(choices):
                if "error" in item:
                    yield sse({"error": {"message": item["error"], "type": "internal_server_error",
                                         "param": None, "code": "engine_failed"}})
                    continue
                t_first = t_first or time.perf_counter()
                lasts[c.index] = item
                if item["text"] or item.get("logprobs") or item["finished"]:
                    yield sse({**base, "choices": [make_choice(c.index, item)]})
        finally:  # a client that left mid-stream still counts: its tokens were generated ("abort")
            done = list(lasts.values())
            if done:
                self._observe(t0, t_first, done)
        if req.include_usage:
            yield sse({**base, "choices": [], "usage": _usage(done, per_prompt=req.n)})
        yield "data: [DONE]\n\n"

    def _chat_stream(self, rid, req, choices, t0):
        async def gen():
            base = R.base("chat.completion.chunk", rid, self.model)
            for c in choices:  # the role comes first, as OpenAI sends it
                yield sse({**base, "choices": [R.chat_chunk_choice(c.index, {"role": "assistant", "content": ""},
                                                                   None, None)]})
            make = lambda i, it: R.chat_chunk_choice(  # noqa: E731
                i, {"content": it["text"]} if it["text"] else {}, it["finish_reason"] if it["finished"] else None,
                it.get("logprobs"))
            async for s in self._stream("chat.completion.chunk", rid, req, choices, t0, make):
                yield s
        return gen()

    def _completion_stream(self, rid, req, choices, t0):
        make = lambda i, it: R.completion_choice(  # noqa: E731
            i, it["text"], it["finish_reason"] if it["finished"] else None, it.get("logprobs") or None)
        return self._stream("text_completion", rid, req, choices, t0, make)


# Routes are module functions that reach the replica's OpenAIIngress instance (Serve's class-based views
# depend on FastAPI re-analysing routes in include_router, which newer FastAPI no longer does).
def _ingress() -> "OpenAIIngress":
    from ray import serve
    return serve.get_replica_context().servable_object


@app.get("/health")
async def health_route():
    return await _ingress().health()


@app.get("/metrics")
async def metrics_http_route():
    return await _ingress().metrics_route()


@app.get("/v1/models")
async def models_route(request: Request):
    return await _ingress().models(request)


@app.post("/v1/chat/completions")
async def chat_route(request: Request):
    return await _ingress().chat_completions(request)


@app.post("/v1/completions")
async def completions_route(request: Request):
    return await _ingress().completions(request)


def _as_400(e: Exception) -> OpenAIError:
    if isinstance(e, ValidationError):
        return from_validation(e)
    return from_value_error(e)


def _usage(lasts: List[dict], per_prompt: int) -> dict:
    # every choice of one prompt reports the same prompt tokens: count each prompt once
    prompt = sum(x["prompt_tokens"] for x in lasts) // max(per_prompt, 1)
    completion = sum(x["completion_tokens"] for x in lasts)
    cached = sum(x.get("cached_tokens", 0) for x in lasts) // max(per_prompt, 1)
    return R.usage(prompt, completion, cached)
