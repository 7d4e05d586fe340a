"""Model resolution and loading errors: clear messages before any heavy work."""
import json

import pytest

from engine.default_model import converted_dir, embedded_gguf_path
from engine.models.loader import read_model_args, resolve_model_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope" / "model"))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM"):
        read_model_args(tmp_path)


def test_hub_id_not_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not on disk"):
        resolve_model_path("someorg/not-a-real-model")


def test_gguf_path_resolves_to_cached_conversion():
    gguf = embedded_gguf_path()
    d = resolve_model_path(str(gguf))
    assert d == converted_dir(gguf) and (d / "model.safetensors").is_file()
    args, _ = read_model_args(d)
    assert (args.num_layers, args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim) == (30, 576, 9, 3, 64)


def test_engine_config_rejects_bad_fields():
    from engine.config import EngineConfig
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="cache_max_entry_count"):
        EngineConfig(cache_max_entry_count=1.5)
    with pytest.raises(ValueError, match="unknown_field|extra"):
        EngineConfig(unknown_field=1)
