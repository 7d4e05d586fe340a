import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Calibration and evaluation texts: $RAYLM_DATA, or ../shared/data beside the project (as CI lays it out).
DATA = Path(os.environ.get("RAYLM_DATA") or ROOT.parent / "shared" / "data")
WIKI_TEST = DATA / "wikitext2" / "wiki.test.raw"


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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATE_API = {}  # {"address": dashboard URL} once the session's cluster is up


@pytest.fixture(scope="session")
def serve_url():
    """A real local Ray cluster with Serve's HTTP proxy on a free port; yields the base URL."""
    import ray
    from ray import serve

    from engine.serve.ray_env import apply_quiet_ray_env
    apply_quiet_ray_env()  # the Ray settings `serve run serve_app:...` starts with, before Ray starts
    port = free_port()
    # the dashboard serves Ray's state API (list_actors, list_placement_groups) that lifecycle tests query
    ctx = ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_port=free_port(),
                   log_to_driver=False,
                   runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    STATE_API["address"] = "http://" + ctx.dashboard_url
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    import time

    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not turn healthy in {timeout} s")


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples in exposition text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total
