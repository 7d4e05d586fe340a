import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from engine.default_model import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def smol_engine():
    from engine.llm_engine import LLMEngine
    return LLMEngine(max_batch_size=16, block_size=16, max_prefill_tokens=256, cache_max_entry_count=1)


@pytest.fixture(scope="session")
def smol_pipe(smol_engine):
    from engine.offline import Pipeline
    return Pipeline(smol_engine)


@pytest.fixture(scope="session")
def smol_hf(smol_dir):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_tok(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smol_dir))


def pytest_configure(config):
    # Triton kernels run on CPU through the interpreter when no GPU is present; the variable is read
    # when a kernel is defined, so it is set before any test module imports one.
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
