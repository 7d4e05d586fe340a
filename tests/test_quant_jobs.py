"""`python -m quant_jobs` end to end on a tiny random model: real processes, a real local Ray cluster,
real files; outputs checked against transformers and an independent unpacking of the checkpoint."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, WIKI_TEST as EVAL
from tiny_models import make_hf_model, write_internlm2

ROOT = Path(__file__).resolve().parent.parent
CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


def qj(*args, check=True, timeout=600, env=None):
    cmd = [sys.executable, "-m", "quant_jobs", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAYLM_DATA": str(DATA), **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def result(p):
    line = next(ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    out = tmp_path_factory.mktemp("tiny-llama-q")
    hf = make_hf_model("llama", smol_dir, out, seed=7, num_key_value_heads=4, num_hidden_layers=4)
    return out, hf


@pytest.fixture(scope="module")
def sequential_run(tiny, tmp_path_factory):
    path, _ = tiny
    work = tmp_path_factory.mktemp("work-seq")
    qj("calibrate", "--model", path, "--work-dir", work, *CALIB, "--no-parallel")
    qj("auto_awq", "--model", path, "--work-dir", work, *CALIB, "--w-group-size", "32", "--no-parallel")
    return work


def test_checkpoint_layout_and_values(tiny, sequential_run):
    path, hf = tiny
    ckpt = sequential_run / "quantized"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                          "version": "gemm"}
    assert (ckpt / "tokenizer.json").is_file()
    t = load_file(str(ckpt / "model.safetensors"))
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        base = f"model.layers.2.{name}"
        w = hf.get_submodule(base).weight
        out_f, in_f = w.shape
        assert t[base + ".qweight"].shape == (in_f, out_f // 8) and t[base + ".qweight"].dtype == torch.int32
        assert t[base + ".qzeros"].shape == (in_f // 32, out_f // 8)
        assert t[base + ".scales"].shape == (in_f // 32, out_f) and t[base + ".scales"].dtype == torch.float16
        assert base + ".weight" not in t
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    # independent unpacking of q_proj (nibble k of word [i, c] is column c*8 + [0,2,4,6,1,3,5,7][k]):
    # the dequantized weight stays close to the original (AWQ scales are folded into it and the norm)
    base = "model.layers.0.self_attn.q_proj"
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qw = t[base + ".qweight"].to(torch.int64) & 0xFFFFFFFF
    qz = t[base + ".qzeros"].to(torch.int64) & 0xFFFFFFFF
    nib = lambda x: torch.stack([(x >> (4 * k)) & 0xF for k in range(8)], -1)  # noqa: E731
    q = torch.empty(qw.shape[0], qw.shape[1] * 8)
    z = torch.empty(qz.shape[0], qz.shape[1] * 8)
    for k in range(8):
        q[:, order[k]::8] = nib(qw)[..., k].float()
        z[:, order[k]::8] = nib(qz)[..., k].float()
    s = t[base + ".scales"].float()
    w_dq = ((q - z.repeat_interleave(32, 0)) * s.repeat_interleave(32, 0)).t()  # [out, in]
    norm = t["model.layers.0.input_layernorm.weight"].float()
    # the layer computes (x * norm') @ W'^T; with W' = W * s and norm' = norm / s this equals the original
    effective = w_dq * norm[None, :]
    original = hf.model.layers[0].self_attn.q_proj.weight * hf.model.layers[0].input_layernorm.weight[None, :]
    rel = (effective - original).norm() / original.norm()
    assert rel < 0.2


def test_eval_ppl_rows_and_fp_matches_transformers(tiny, sequential_run):
    path, hf = tiny
    p = qj("eval_ppl", "--model", path, "--work-dir", sequential_run, "--seqlen", "128", "--limit", "3")
    res = result(p)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp", "rtn", "awq", "packed"}
    assert json.loads((sequential_run / "ppl.json").read_text())["rows"][0]["ppl"] == rows["fp"]["ppl"]
    assert "perplexity" in p.stdout and "AWQ w4g32 (fake)" in p.stdout
    # oracle: transformers on the same windows, tokenized by the standard protocol
    from transformers import AutoTokenizer
    from quant_jobs.ppl import test_windows
    windows = test_windows(AutoTokenizer.from_pretrained(str(path)), EVAL, 128, 3)
    with torch.no_grad():
        lg = hf(windows).logits
    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(rows["fp"]["ppl"], math.exp(nll.item()), rel_tol=1e-4)
    # the packed checkpoint is the fake-quantized model up to float16 storage of the other tensors
    assert math.isclose(rows["packed"]["ppl"], rows["awq"]["ppl"], rel_tol=5e-3)


def test_parallel_on_ray_equals_sequential(tiny, sequential_run, tmp_path):
    path, _ = tiny
    p = qj("auto_awq", "--model", path, "--work-dir", tmp_path, *CALIB, "--w-group-size", "32", "--parallel",
           "--workers", "2")
    assert "2 parallel cpu tasks" in p.stderr
    for i in range(4):
        a = load_file(str(sequential_run / "awq_search" / f"layer_{i:03d}.safetensors"))
        b = load_file(str(tmp_path / "awq_search" / f"layer_{i:03d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(sequential_run / "quantized" / "model.safetensors"))
    b = load_file(str(tmp_path / "quantized" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_job_resumes_skipping_finished_layers(smol_dir, tmp_path, sequential_run):
    model = tmp_path / "model"
    make_hf_model("llama", smol_dir, model, seed=8, num_hidden_layers=6, hidden_size=256, intermediate_size=512)
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "quant_jobs", "auto_awq", "--model", str(model), "--work-dir", str(work),
           "--calib-samples", "16", "--calib-seqlen", "128", "--w-group-size", "64", "--no-parallel"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = work / "awq_search" / "layer_000.safetensors"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(work.glob("awq_search/layer_*.safetensors"))
    assert 1 <= len(done) < 6, "the kill should land between layers"
    assert not (work / "quantized").exists()  # nothing that looks complete
    stamps = {f.name: f.stat().st_mtime_ns for f in done}
    p = qj("auto_awq", "--model", model, "--work-dir", work, "--calib-samples", "16", "--calib-seqlen", "128",
           "--w-group-size", "64", "--no-parallel")
    assert result(p)["layers_resumed"] == len(done)
    assert all((work / "awq_search" / n).stat().st_mtime_ns == s for n, s in stamps.items())
    ref = tmp_path / "ref"
    qj("auto_awq", "--model", model, "--work-dir", ref, "--calib-samples", "16", "--calib-seqlen", "128",
       "--w-group-size", "64", "--no-parallel")
    a = load_file(str(work / "quantized" / "model.safetensors"))
    b = load_file(str(ref / "quantized" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_internlm2_checkpoint_keeps_its_packed_layout(tiny, smol_dir, tmp_path):
    from quant_jobs.dense import logits
    from quant_jobs.model_io import load_full
    _, hf = tiny
    write_internlm2(hf, tmp_path / "internlm2", smol_dir)
    for name, src in (("llama", tiny[0]), ("internlm2", tmp_path / "internlm2")):
        qj("auto_awq", "--model", src, "--work-dir", tmp_path / f"w-{name}", "--rtn", "--w-group-size", "32")
    t = load_file(str(tmp_path / "w-internlm2" / "quantized" / "model.safetensors"))
    assert "model.layers.0.attention.wqkv.qweight" in t and "model.layers.0.feed_forward.w2.scales" in t
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(9))
    a = logits(load_full(str(tmp_path / "w-llama" / "quantized")), ids)
    b = logits(load_full(str(tmp_path / "w-internlm2" / "quantized")), ids)
    assert torch.allclose(a, b, atol=1e-5)  # same weights, same RTN quantization, different packing order


def test_kv_qparams_step_writes_per_rank_files(sequential_run):
    p = qj("kv_qparams", "--work-dir", sequential_run, "--num-tp", "2")
    files = result(p)["output"]
    full = load_file(files[0])
    r1 = load_file(files[2])
    assert full["int8.k_scale"].shape == (4, 4) and torch.equal(r1["int8.k_scale"], full["int8.k_scale"][:, 2:])
    st = load_file(str(sequential_run / "calib_stats.safetensors"))
    mx, mn = st["layers.3.attn.v.max"].amax(-1), st["layers.3.attn.v.min"].amin(-1)
    assert torch.allclose(full["int4.v_scale"][3], (mx - mn) / 15) and torch.allclose(full["int4.v_zp"][3], (mx + mn) / 2)


@pytest.mark.parametrize("args, message", [
    (["auto_awq", "--model", "/nonexistent/model"], "model: no such folder"),
    (["auto_awq", "--model", "someorg/not-downloaded"], "is not on disk"),
    (["auto_awq", "--w-bits", "3"], "w_bits: 3 is not supported"),
    (["auto_awq", "--w-group-size", "48"], "w_group_size: 48 is not supported"),
    (["calibrate", "--calib-dataset", "/nonexistent.jsonl"], "calib_dataset"),
    (["calibrate", "--calib-seqlen", "100000"], "calib_seqlen: 100000 exceeds"),
    (["calibrate", "--work-dir", "/proc/forbidden"], "work_dir: /proc/forbidden cannot be written"),
    (["kv_qparams", "--work-dir", "/tmp"], "has no calib_stats.safetensors"),
])
def test_bad_input_fails_fast_with_a_clear_error(args, message, tiny):
    p = qj(*args, check=False, timeout=120)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_group_size_that_does_not_divide_names_the_layer(tiny, tmp_path):
    p = qj("auto_awq", "--model", tiny[0], "--work-dir", tmp_path, "--w-group-size", "128", check=False)
    assert p.returncode == 2 and "does not divide" in p.stderr and "sizes that work" in p.stderr


def test_dataset_without_samples_and_unsupported_architecture(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    p = qj("calibrate", "--model", tiny[0], "--work-dir", tmp_path / "w", "--calib-dataset", empty, *CALIB,
           "--no-parallel", check=False)
    assert p.returncode == 2 and "yields no sample" in p.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    p = qj("calibrate", "--model", bad, "--work-dir", tmp_path / "w", check=False)
    assert p.returncode == 2 and "GPT2LMHeadModel" in p.stderr and "LlamaForCausalLM" in p.stderr


def test_job_runs_through_ray_job_submit(tiny, tmp_path):
    """A real head node (`ray start --head`) and `ray job submit --working-dir .`, as the README says."""
    from conftest import free_port
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray >= 2.5x turns token auth on for `ray start --head` once ~/.ray/auth_token exists (any earlier
    # ray.init() writes one), but the job CLI only sends the token when the mode is named: name it for both.
    env["RAY_AUTH_MODE"] = "token"
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--block",
                             "--disable-usage-stats"], stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    work = tmp_path / "work"
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            p = subprocess.run([str(ray_bin), "job", "list", "--address", url], capture_output=True, env=env)
            if p.returncode == 0:
                break
            time.sleep(1)
        p = subprocess.run([str(ray_bin), "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
                            sys.executable, "-m", "quant_jobs", "auto_awq", "--model", str(tiny[0]),
                            "--work-dir", str(work), *CALIB, "--w-group-size", "32", "--workers", "2"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "succeeded" in p.stdout + p.stderr
        assert "2 parallel cpu tasks" in p.stdout + p.stderr  # the job joined the cluster, not a new one
        assert sorted(f.name for f in (work / "awq_search").glob("layer_*")) == [f"layer_00{i}.safetensors"
                                                                                for i in range(4)]
        assert (work / "quantized" / "model.safetensors").is_file()
    finally:
        head.terminate()
        head.wait(timeout=60)
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.exists() and str(port) in marker.read_text():
            marker.unlink()
