"""Inference engine: paged KV cache, persistent batching, Llama-family models.

    from engine import pipeline, GenerationConfig
    pipe = pipeline()                       # the embedded SmolLM2-135M-Instruct
    print(pipe("Hello", GenerationConfig(max_new_tokens=16)).text)
"""
from .config import EngineConfig
from .generation import GenerationConfig
from .outputs import RequestOutput, Response

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "EngineConfig", "LLMEngine", "AsyncEngine",
           "Response", "RequestOutput"]


def __getattr__(name):  # heavy modules (torch, transformers) load on first use
    if name in ("pipeline", "Pipeline"):
        from . import offline as _p
        return getattr(_p, name)
    if name == "LLMEngine":
        from .llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
