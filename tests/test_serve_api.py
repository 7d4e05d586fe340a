"""The OpenAI endpoint on a real local Ray cluster, through real HTTP and the official openai client.

Oracle: Hugging Face transformers greedy generation and log-softmax on the same model.
"""
import os
import time

import httpx
import openai
import pytest
import torch
from ray import serve

from conftest import metric, wait_healthy
from engine.serve.builder import build_app

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def api(serve_url):
    serve.run(build_app({"api_keys": [KEY], "max_batch_size": 16, "block_size": 16, "cache_max_entry_count": 1,
                         "session_len": 512, "min_replicas": 1, "max_replicas": 1}),
              name="api", route_prefix="/api", blocking=False)
    url = serve_url + "/api"
    wait_healthy(url)
    yield url
    serve.delete("api")


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, timeout=120)


def hf_chat_greedy(hf, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=2)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] in (tok.eos_token_id, 2):
        new = new[:-1]
    return ids.shape[1], new


def hf_text_greedy(hf, tok, prompt, n):
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name three colours of the rainbow."}]


def test_models_and_health(api, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(api + "/health").status_code == 200  # open without a key


def _processes() -> dict:
    """pid -> (command line, parent pid) of every process this user can read."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(pid)] = (cmd, ppid)
    return out


def test_engine_runs_at_the_ingress_niceness(api):
    """Raised above Serve's proxy and ingress, the engine starved them on a small host: requests reached it
    late while it stepped a few sequences. Oracle: the niceness Ray gave the ingress replica's process."""
    procs = _processes()
    ingress = [p for p, (c, _) in procs.items() if c.startswith("ray::ServeReplica:api:OpenAIIngress")]
    replica = [p for p, (c, _) in procs.items() if c.startswith("ray::ServeReplica:api:LLMEngine")]
    assert len(ingress) == 1 and len(replica) == 1, (ingress, replica)
    engine = [p for p, (c, parent) in procs.items() if "engine.engine_process" in c and parent == replica[0]]
    assert len(engine) == 1, "the replica steps its engine in one child process"
    assert os.getpriority(os.PRIO_PROCESS, engine[0]) == os.getpriority(os.PRIO_PROCESS, ingress[0])


def test_chat_greedy_matches_hf(client, smol_hf, smol_tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    n_prompt, ref = hf_chat_greedy(smol_hf, smol_tok, MESSAGES, 24)
    assert r.choices[0].message.content == smol_tok.decode(ref, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == (24 if len(ref) == 24 else len(ref) + 1)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_whole_and_reports_usage(client, smol_hf, smol_tok):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _, ref = hf_chat_greedy(smol_hf, smol_tok, MESSAGES, 24)
    assert text == smol_tok.decode(ref, skip_special_tokens=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_raw_stream_ends_with_done(api):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", api + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_completion_stop_string_cuts_text(client, smol_hf, smol_tok):
    prompt = "The history of the Roman Empire"
    ref = smol_tok.decode(hf_text_greedy(smol_hf, smol_tok, prompt, 20))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert whole.choices[0].text == ref and whole.choices[0].finish_reason == "length"
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]  # a stop string inside the continuation
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == ref[:ref.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_reproducible_and_n_choices(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (8, 9, 10)}
    assert a == b and len(others | {a}) > 1
    r = client.chat.completions.create(n=3, seed=11, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    singles = [client.chat.completions.create(seed=11 + i, **kw) for i in range(3)]
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == \
        [s.choices[0].message.content for s in singles]
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)  # over all choices


def test_logprobs_match_hf(client, smol_hf, smol_tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    ids = smol_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)["input_ids"]
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        with torch.no_grad():
            lp = torch.log_softmax(smol_hf(ids).logits[0, -1].double(), -1)
        best = int(lp.argmax())
        assert item.token == smol_tok.decode([best])
        assert abs(item.logprob - float(lp[best])) < 1e-3
        assert [t.token for t in item.top_logprobs] == [smol_tok.decode([i]) for i in lp.topk(3).indices.tolist()]
        ids = torch.cat([ids, torch.tensor([[best]])], dim=1)


def _post(api, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(api + path, content=raw, headers={**headers, "content-type": "application/json"})
    return httpx.post(api + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
])
def test_invalid_fields_get_400_naming_the_field(api, body, param):
    r = _post(api, "/v1/chat/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split(".")[0] in err["message"]


def test_error_cases_in_openai_shape(api):
    r = _post(api, "/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(api, "/v1/completions", {"model": MODEL, "prompt": "word " * 600, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "session_len" in r.json()["error"]["message"]
    r = _post(api, "/v1/completions", {"model": "gpt-7", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(api, "/v1/completions", {"prompt": "hi"}, key=None)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = _post(api, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert r.status_code == 401
    assert httpx.get(api + "/v1/models").status_code == 401


def test_disconnect_mid_stream_frees_blocks(api):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", api + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 5:
                break  # leave mid-stream: the connection closes here
    assert got >= 5
    # the engine publishes its stats a few times a second: wait for a snapshot taken after the tokens
    # were counted, in which no request runs and no block is held
    deadline = time.time() + 30
    while time.time() < deadline:
        text = httpx.get(api + "/metrics").text
        try:  # a labelled metric has its HELP line before its first sample
            if (metric(text, "raylm_generation_tokens_total") > 0 and metric(text, "raylm_kv_cache_used_blocks") == 0
                    and metric(text, "raylm_requests_running") == 0):
                break
        except KeyError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("blocks were not freed after the client left: " + "\n".join(l for l in text.splitlines() if l.startswith(("raylm_kv", "raylm_requests_r", "raylm_generation"))))
    assert metric(text, "raylm_time_to_first_token_seconds_count") > 0
    assert 'finish_reason="abort"' in text  # the request the client left is counted as aborted


def test_speculative_decoding_over_http_matches_hf(serve_url, smol_hf, smol_tok):
    """An app with n-gram drafts on: greedy completions (whole and streamed, several tokens a step) are
    transformers' tokens, and /metrics counts the drafts."""
    serve.run(build_app({"max_batch_size": 8, "block_size": 16, "cache_max_entry_count": 1, "session_len": 512,
                         "min_replicas": 1, "max_replicas": 1, "num_speculative_tokens": 4}),
              name="spec", route_prefix="/spec", blocking=False)
    url = serve_url + "/spec"
    try:
        wait_healthy(url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        prompt = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog"
        ref = smol_tok.decode(hf_text_greedy(smol_hf, smol_tok, prompt, 32))
        whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True})
        assert whole.choices[0].text == ref and whole.usage.completion_tokens == 32
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stream=True, extra_body={"ignore_eos": True})
            if ch.choices)
        assert streamed == ref
        deadline = time.time() + 30
        while time.time() < deadline:
            text = httpx.get(url + "/metrics").text
            if "raylm_spec_decode_accepted_tokens{" in text and metric(text, "raylm_spec_decode_accepted_tokens") > 0:
                break
            time.sleep(0.5)
        assert 0 < metric(text, "raylm_spec_decode_acceptance_rate") <= 1
        assert metric(text, "raylm_spec_decode_draft_tokens") >= metric(text, "raylm_spec_decode_accepted_tokens") > 0
    finally:
        serve.delete("spec")
