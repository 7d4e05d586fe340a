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


def test_conversion_cache_tells_files_of_one_name_and_size_apart(tmp_path):
    """Two fine-tunes quantized alike have the same name and size: each gets its own converted copy, and so
    does a file rewritten in place."""
    import os
    a, b = tmp_path / "a" / "model.Q4_1.gguf", tmp_path / "b" / "model.Q4_1.gguf"
    for p, byte in ((a, b"\1"), (b, b"\2")):
        p.parent.mkdir()
        p.write_bytes(byte * 64)
    assert converted_dir(a) != converted_dir(b)
    before = converted_dir(a)
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert converted_dir(a) != before and converted_dir(a).name.startswith("model.Q4_1-64-")


def test_engine_config_rejects_bad_fields():
    from engine.config import EngineConfig
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="cache_max_entry_count"):
        EngineConfig(cache_max_entry_count=1.5)
    with pytest.raises(ValueError, match="unknown_field|extra"):
        EngineConfig(unknown_field=1)


def test_safetensors_read_without_a_map_matches_the_library(tmp_path):
    """read_tensors (plain reads into each tensor's own memory) gives what safetensors' own loader gives: every
    dtype a checkpoint holds, a scalar, an empty tensor, metadata; a truncated file or a bad length is an error
    naming the tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.models.safetensors_read import read_tensors
    torch.manual_seed(0)
    tensors = {"w.f32": torch.randn(7, 5), "w.bf16": torch.randn(3, 4).bfloat16(), "w.f16": torch.randn(9).half(),
               "q.i32": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32),
               "z.u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got, expect = dict(read_tensors(path)), load_file(str(path))
    assert got.keys() == expect.keys() == tensors.keys()
    for name, t in expect.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated: tensor"):
        list(read_tensors(tmp_path / "cut.safetensors"))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["w.f32"]["shape"] = [7, 6]
    bad = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(bad).to_bytes(8, "little") + bad + data[8 + n:])
    with pytest.raises(ValueError, match=r"'w.f32' F32\[7, 6\] needs 168 bytes"):
        list(read_tensors(tmp_path / "bad.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        list(read_tensors(tmp_path / "text.safetensors"))
