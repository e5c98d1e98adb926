"""The OpenAI-compatible server, end to end over loopback HTTP with the official ``openai`` client.

One server subprocess for the module (a tiny random-weight Llama with SmolLM2's real
tokenizer, saved as a Hugging Face directory); the offline ``LLM`` loads the same directory
and is the reference for every greedy result. No timed assertions: waits have generous
limits and only guard against a hang.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path

import pytest
from tool_cases import WEATHER_TOOL

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tiny_models import SMOL_DIR, make_tiny_model_dir  # noqa: E402

from minipaged.entrypoints.openai.launch import ServerProcess, free_port, minipaged_command  # noqa: E402

API_KEY = "test-key-123"
MAX_MODEL_LEN = 2048
NUM_KV_BLOCKS = 64  # 1024 tokens, less than max_model_len: a request can be too large for the cache
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "In a galaxy far away",
    "Paged attention stores",
    "Hello",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared (make setup)")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), MAX_MODEL_LEN)


ENGINE_ARGS = ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--block-size", "16", "--max-num-seqs", "32"]
MAX_N, MAX_PROMPTS, MAX_REQUEST_BYTES = 8, 40, 200_000


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    cmd = minipaged_command(
        port,
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--api-key",
        API_KEY,
        "--log-level",
        "warning",
        "--max-n",
        str(MAX_N),
        "--max-prompts-per-request",
        str(MAX_PROMPTS),
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        *ENGINE_ARGS,
    )
    root = str(Path(__file__).resolve().parents[2])
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=log, cwd=root) as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(model_dir):
    from minipaged import LLM

    return LLM(str(model_dir), num_kv_blocks=NUM_KV_BLOCKS, block_size=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def greedy(offline, prompts, max_tokens, **kw):
    from minipaged import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
    return offline.generate(prompts, params, use_tqdm=False)


def scrape(server) -> dict[str, float]:
    from minipaged.benchmarks.serve import parse_prometheus

    return parse_prometheus(httpx.get(server.base_url + "/metrics").text)


def wait_idle(server, limit_s: float = 120.0) -> dict[str, float]:
    """Metrics once the engine has no running or waiting request (a hang guard, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while True:
        m = scrape(server)
        if m["minipaged_num_requests_running"] == 0 and m["minipaged_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"engine still busy: {m}"
        time.sleep(0.1)


# ---- basic endpoints ----------------------------------------------------------------------
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.base_url + "/health").status_code == 200
    m = scrape(server)
    assert m["minipaged_kv_blocks_total"] == NUM_KV_BLOCKS
    assert m["minipaged_kv_blocks_used"] == 0


def test_completion_greedy_matches_offline_with_exact_usage(client, offline):
    ref = greedy(offline, PROMPTS, 12)
    resp = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in ref]
    assert [c.finish_reason for c in resp.choices] == [r.outputs[0].finish_reason for r in ref]
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert resp.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_token_id_prompts(client, offline):
    ids = [[1, 504, 3458, 282], [17, 29, 8]]
    ref = greedy(offline, [{"prompt_token_ids": i} for i in ids], 8)
    one = client.completions.create(model="tiny", prompt=ids[0], max_tokens=8, temperature=0)
    both = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert one.choices[0].text == ref[0].outputs[0].text
    assert [c.text for c in both.choices] == [r.outputs[0].text for r in ref]
    assert both.usage.prompt_tokens == 7


def _stream_completion(client, **kw):
    chunks = list(client.completions.create(stream=True, **kw))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finish, "finish_reason sent twice"
                finish[c.index] = c.finish_reason
    return texts, finish, usage, chunks


def test_streamed_text_equals_non_streamed(client):
    kw = dict(model="tiny", prompt=PROMPTS[:3], max_tokens=16, temperature=0)
    full = client.completions.create(**kw)
    texts, finish, usage, chunks = _stream_completion(client, stream_options={"include_usage": True}, **kw)
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    assert all(ch.usage is None for ch in chunks[:-1])


def test_sse_wire_format(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(server.base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"


def test_chat_matches_offline_chat_streamed_and_not(client, offline):
    from minipaged import SamplingParams

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.outputs[0].text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == ref.outputs[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_n_samples_with_seed_are_reproducible(client, offline):
    kw = dict(model="tiny", prompt=["Once upon", "A"], max_tokens=6, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices[:3]}) > 1  # three different samples of one prompt
    assert a.usage.prompt_tokens == sum(len(offline.tokenizer.encode(p)) for p in kw["prompt"])
    texts, _, _, _ = _stream_completion(client, **kw)
    assert texts == {c.index: c.text for c in a.choices}


def test_stop_string_cuts_text_streamed_and_not(client, offline):
    base = greedy(offline, [PROMPTS[0]], 20, ignore_eos=True)[0].outputs[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    assert stop.strip(), base
    expected = base[: base.index(stop)]
    kw = dict(
        model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    texts, finish, _, _ = _stream_completion(client, **kw)
    assert texts[0] == expected and finish[0] == "stop"


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    echoed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[1] + plain.choices[0].text
    texts, _, _, _ = _stream_completion(client, model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, echo=True)
    assert texts[0] == echoed.choices[0].text


@pytest.fixture(scope="module")
def hf_reference(model_dir):
    """transformers' own model from the served directory: the independent reference for logprobs."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _prompt_ids(offline, prompt: str) -> list[int]:
    """The ids the server's engine makes of ``prompt`` (the offline engine tokenizes the same way)."""
    from minipaged import SamplingParams

    return offline.validate(prompt, SamplingParams())[1]


def _reference_prompt_logprobs(hf_reference, prompt_ids: list[int]):
    import torch

    with torch.no_grad():
        logits = hf_reference(torch.tensor([prompt_ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)  # row i scores prompt token i + 1


def test_echo_with_logprobs_scores_the_prompt_tokens_like_transformers(server, client, offline, hf_reference):
    import torch

    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    plain = client.completions.create(**kw)
    echoed = client.completions.create(echo=True, **kw)
    prompt_ids = _prompt_ids(offline, PROMPTS[0])
    ref = _reference_prompt_logprobs(hf_reference, prompt_ids)
    lp, plain_lp = echoed.choices[0].logprobs, plain.choices[0].logprobs
    num_prompt = len(prompt_ids)
    assert len(lp.tokens) == num_prompt + len(plain_lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0
    for i in range(1, num_prompt):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, prompt_ids[i]])) < 1e-4, i
        best = torch.topk(ref[i - 1], 2).indices.tolist()
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2, plus the prompt token when it is not among them
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1, best[0]]), abs=1e-4)
    # The completion's part is what the same request without echo returns, offsets shifted past the prompt.
    assert lp.tokens[num_prompt:] == plain_lp.tokens
    assert lp.token_logprobs[num_prompt:] == pytest.approx(plain_lp.token_logprobs, abs=1e-5)
    assert [o - len(PROMPTS[0]) for o in lp.text_offset[num_prompt:]] == plain_lp.text_offset
    # Streamed: the first chunk carries the prompt's tokens and logprobs, the rest follow.
    _, _, _, chunks = _stream_completion(client, echo=True, **kw)
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed == lp.tokens
    streamed_lps = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed_lps[0] is None and streamed_lps[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert wait_idle(server)["minipaged_kv_blocks_used"] == 0


def test_prompt_logprobs_extra_field_matches_transformers(server, offline, hf_reference):
    prompt_ids = _prompt_ids(offline, PROMPTS[2])
    ref = _reference_prompt_logprobs(hf_reference, prompt_ids)
    body = {"model": "tiny", "prompt": prompt_ids, "max_tokens": 2, "prompt_logprobs": 1}
    for url in ("/v1/completions", "/v1/chat/completions"):
        if url.endswith("chat/completions"):
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = httpx.post(server.base_url + url, json={**chat, "prompt_logprobs": 1}, headers=_auth(), timeout=60)
            assert r.status_code == 200, r.text
            entries = r.json()["prompt_logprobs"]
            assert entries[0] is None and all(len(e) in (1, 2) for e in entries[1:])
            r = httpx.post(
                server.base_url + url, json={**chat, "prompt_logprobs": 1, "stream": True}, headers=_auth(), timeout=60
            )
            assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
            continue
        r = httpx.post(server.base_url + url, json=body, headers=_auth(), timeout=60)
        assert r.status_code == 200, r.text
        entries = r.json()["choices"][0]["prompt_logprobs"]
        assert len(entries) == len(prompt_ids) and entries[0] is None
        for i in range(1, len(prompt_ids)):
            entry = entries[i]
            token = str(prompt_ids[i])
            assert abs(entry[token]["logprob"] - float(ref[i - 1, prompt_ids[i]])) < 1e-4
            assert entry[token]["rank"] == int((ref[i - 1] > ref[i - 1, prompt_ids[i]]).sum()) + 1
            assert any(e["rank"] == 1 for e in entry.values())
    bad = httpx.post(server.base_url + "/v1/completions", json={**body, "prompt_logprobs": 99}, headers=_auth())
    assert bad.status_code == 400 and "prompt_logprobs" in bad.json()["error"]["message"]
    assert wait_idle(server)["minipaged_kv_blocks_used"] == 0


def _engine_has(field: str) -> bool:
    import dataclasses

    from minipaged.sampling_params import SamplingParams

    return field in {f.name for f in dataclasses.fields(SamplingParams)}


needs_logprobs = pytest.mark.skipif(not _engine_has("logprobs"), reason="SamplingParams has no logprobs field yet")


def _reference_logprobs(model_dir, prompt_ids, output_ids):
    """log-softmax of transformers' own model at each generated position: [len(output_ids), vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


@needs_logprobs
def test_completion_logprobs_match_transformers(client, offline, model_dir):
    k = 3
    resp = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=k)
    lp = resp.choices[0].logprobs
    ref_out = greedy(offline, [PROMPTS[2]], 6)[0]
    out_ids = ref_out.outputs[0].token_ids
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(out_ids)
    ref = _reference_logprobs(model_dir, ref_out.prompt_token_ids, out_ids)
    tok = offline.tokenizer
    for pos, tid in enumerate(out_ids):
        assert lp.tokens[pos] == tok.decode([tid])
        assert math.isclose(lp.token_logprobs[pos], ref[pos, tid].item(), abs_tol=1e-3)
        best = ref[pos].topk(k)
        want = {tok.decode([int(i)]): v.item() for v, i in zip(best.values, best.indices)}
        assert set(want) <= set(lp.top_logprobs[pos]) and len(lp.top_logprobs[pos]) <= k + 1
        for text, value in want.items():
            assert math.isclose(lp.top_logprobs[pos][text], value, abs_tol=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Streamed: the same arrays, chunk by chunk, text_offset continuing across chunks.
    chunks = list(
        client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=k, stream=True)
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


@needs_logprobs
def test_chat_logprobs_shape(client):
    resp = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].token == c.token  # greedy: the sampled token is the best one
        assert math.isclose(c.logprob, c.top_logprobs[0].logprob)


@pytest.mark.skipif(not _engine_has("logit_bias"), reason="SamplingParams has no penalties / logit_bias yet")
def test_penalties_logit_bias_and_min_tokens_reach_the_engine(client, offline):
    forced = 1234  # +100 on one token makes greedy pick it every time
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0, logit_bias={str(forced): 100}, logprobs=0
    )
    assert r.choices[0].logprobs.tokens == [offline.tokenizer.decode([forced])] * 5
    kw = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5, min_tokens=4)
    ref = greedy(offline, ["Hello"], 10, **kw)[0].outputs[0]
    resp = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=10,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.5, "min_tokens": 4},
    )
    assert resp.choices[0].text == ref.text
    plain = greedy(offline, ["Hello"], 10)[0].outputs[0]
    assert ref.token_ids != plain.token_ids  # the penalties changed something, so the equality above means something


# ---- errors --------------------------------------------------------------------------------
BAD_COMPLETIONS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"seed": -3}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"echo": 1}, "echo"),
    ({"logprobs": "many"}, "logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"user": 5}, "user"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"),
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"repetition_penalty": [1]}, "repetition_penalty"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt_token_ids"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1] * (MAX_MODEL_LEN + 1)}, "prompt"),  # PromptTooLongError: over max_model_len
    ({"prompt": [1] * 1100}, "prompt"),  # RequestTooLargeError: the prompt alone needs more blocks than exist
    ({"prompt": [1] * 100, "max_tokens": 1000}, "max_tokens"),  # RequestTooLargeError: with its output
]


def _post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(server.base_url + path, content=raw, headers=headers)
    return httpx.post(server.base_url + path, json=body, headers=headers)


def _assert_openai_error(r, status, param="any"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param != "any":
        assert err["param"] == param, err


@pytest.mark.parametrize("fields,param", BAD_COMPLETIONS, ids=lambda v: str(v)[:40])
def test_invalid_completion_field_is_400_naming_it(server, fields, param):
    body = {"model": "tiny", "prompt": "Hello", **fields}
    _assert_openai_error(_post(server, "/v1/completions", body), 400, param)


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "n": MAX_N + 1}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT, ids=lambda v: str(v)[:40])
def test_invalid_chat_field_is_400(server, fields, param):
    _assert_openai_error(_post(server, "/v1/chat/completions", {"model": "tiny", **fields}), 400, param)


def test_malformed_json_unknown_model_and_api_key(server, client):
    _assert_openai_error(_post(server, "/v1/completions", None, raw=b'{"prompt": "x",'), 400)
    _assert_openai_error(_post(server, "/v1/completions", None, raw=b"[1, 2]"), 400)
    _assert_openai_error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    _assert_openai_error(
        _post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        404,
        "model",
    )
    _assert_openai_error(_post(server, "/v1/completions", {"prompt": "x"}, key=None), 401)
    _assert_openai_error(_post(server, "/v1/completions", {"prompt": "x"}, key="wrong"), 401)
    r = httpx.get(server.base_url + "/v1/models")
    _assert_openai_error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    # ... and the server keeps serving.
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert wait_idle(server)["minipaged_kv_blocks_used"] == 0


# ---- concurrency and disconnects -------------------------------------------------------------
async def _stream_one(http: httpx.AsyncClient, body: dict, *, hang_up: bool) -> tuple[str, str | None]:
    """Stream one completion; with ``hang_up`` close the connection after the first content chunk."""
    text, finish = "", None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            if hang_up and text:
                return text, None  # leaving the block closes the response and its connection
    return text, finish


async def _concurrent(server, keep_prompts, drop_prompts, bad_bodies):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, limits=limits, timeout=300) as http:
        keep = [
            _stream_one(
                http, {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0, "stream": True}, hang_up=False
            )
            for p in keep_prompts
        ]
        drop = [
            _stream_one(
                http,
                {"model": "tiny", "prompt": p, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True},
                hang_up=True,
            )
            for p in drop_prompts
        ]
        bad = [http.post("/v1/completions", json=b) for b in bad_bodies]
        return await asyncio.gather(*keep, *drop, *bad)


def test_32_concurrent_streams_half_hang_up(server, offline):
    keep_prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]
    drop_prompts = [f"Story number {i}:" for i in range(16)]
    bad_bodies = [{"model": "tiny", "prompt": "x", "max_tokens": 0}, {"model": "tiny", "prompt": [10**9]}]
    ref = greedy(offline, keep_prompts, 16)
    before = wait_idle(server)
    results = asyncio.run(_concurrent(server, keep_prompts, drop_prompts, bad_bodies))
    kept, dropped, bad = results[:16], results[16:32], results[32:]
    assert [t for t, _ in kept] == [r.outputs[0].text for r in ref]
    assert [f for _, f in kept] == [r.outputs[0].finish_reason for r in ref]
    assert all(f is None and t for t, f in dropped)
    assert [r.status_code for r in bad] == [400, 400]
    after = wait_idle(server)
    assert after["minipaged_kv_blocks_used"] == 0
    assert after["minipaged_kv_blocks_free"] == NUM_KV_BLOCKS
    # Aborted at once, not run to their 400 tokens: far fewer tokens than 16 * 400 were generated for them.
    generated = after["minipaged_generation_tokens_total"] - before["minipaged_generation_tokens_total"]
    kept_tokens = sum(len(r.outputs[0].token_ids) for r in ref)
    assert generated - kept_tokens < 16 * 400 / 4, generated


def test_non_streaming_request_aborted_when_client_leaves(server):
    before = wait_idle(server)

    async def leave_early():
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            body = {"model": "tiny", "prompt": "Long story:", "max_tokens": 450, "ignore_eos": True}
            task = asyncio.ensure_future(http.post("/v1/completions", json=body))
            while scrape(server)["minipaged_generation_tokens_total"] == before["minipaged_generation_tokens_total"]:
                await asyncio.sleep(0.05)
            task.cancel()  # closes the connection mid-request
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(leave_early())
    after = wait_idle(server)
    assert after["minipaged_kv_blocks_used"] == 0
    # Counted as a disconnect, not as a server error.
    assert after["minipaged_client_disconnected_total"] == before.get("minipaged_client_disconnected_total", 0) + 1
    assert after.get('minipaged_request_errors_total{status="500"}', 0) == 0
    assert after["minipaged_generation_tokens_total"] - before["minipaged_generation_tokens_total"] < 450


def test_metrics_exposition(server):
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "minipaged_num_requests_running",
        "minipaged_num_requests_waiting",
        "minipaged_kv_blocks_used",
        "minipaged_kv_blocks_cached",
        "minipaged_kv_blocks_free",
        "minipaged_num_preemptions_total",
        "minipaged_prompt_tokens_total",
        "minipaged_generation_tokens_total",
        "minipaged_time_to_first_token_seconds_bucket",
        "minipaged_inter_token_latency_seconds_bucket",
        "minipaged_e2e_request_latency_seconds_count",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert scrape(server)["minipaged_e2e_request_latency_seconds_count"] > 0


# ---- hardening: what a careful user broke -----------------------------------------------------
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_survives(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server.base_url, headers=headers) as http:  # one keep-alive connection
        r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud800"}')
        _assert_openai_error(r, 400, "prompt")
        chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc80 hi"}]}'
        _assert_openai_error(http.post("/v1/chat/completions", content=chat), 400, "messages")
        r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}')
        _assert_openai_error(r, 400, "stop")
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_small_kv_cache_caps_the_advertised_max_model_len_and_chat_defaults_fit(server, client):
    capacity = NUM_KV_BLOCKS * 16
    card = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert card["data"][0]["max_model_len"] == capacity  # the model allows MAX_MODEL_LEN; the cache holds less
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.total_tokens <= capacity


def test_max_tokens_beyond_the_context_is_a_400_like_openai(server):
    capacity = NUM_KV_BLOCKS * 16
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": [1] * 100, "max_tokens": 10**9})
    _assert_openai_error(r, 400, "max_tokens")
    message = r.json()["error"]["message"]
    assert f"maximum context length is {capacity} tokens" in message and "100 in the prompt" in message, message
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": capacity}
    _assert_openai_error(_post(server, "/v1/chat/completions", chat), 400, "max_completion_tokens")


def test_request_caps_prompts_and_body_size(server):
    _assert_openai_error(_post(server, "/v1/completions", {"prompt": ["x"] * (MAX_PROMPTS + 1)}), 400, "prompt")
    _assert_openai_error(_post(server, "/v1/completions", {"prompt": "x", "n": MAX_N + 1}), 400, "n")
    big = {"model": "tiny", "prompt": "word " * (MAX_REQUEST_BYTES // 5 + 10), "max_tokens": 1}
    _assert_openai_error(_post(server, "/v1/completions", big), 413)
    chunked = httpx.post(
        server.base_url + "/v1/completions",
        content=iter([json.dumps(big).encode()]),  # no Content-Length: counted as it arrives
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    _assert_openai_error(chunked, 413)
    ok = _post(server, "/v1/completions", {"model": "tiny", "prompt": ["x"] * MAX_PROMPTS, "max_tokens": 1})
    assert ok.status_code == 200, ok.text


# ---- fuzzing the API from its own OpenAPI schema ------------------------------------------------
def _from_schema(schema: dict, defs: dict, depth: int = 0):
    """A hypothesis strategy for JSON values of one OpenAPI (JSON Schema) node, small values favoured."""
    from hypothesis import strategies as st

    if "$ref" in schema:
        return _from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs, depth)
    if "anyOf" in schema:
        return st.one_of([_from_schema(s, defs, depth) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    odd_ints = st.sampled_from([0, -1, 2**31, 2**63, -(2**63)])
    odd_texts = st.sampled_from(["", "\ud800", "\x00", "é" * 50, "<|im_end|>"])
    if kind == "integer":
        return st.one_of(st.integers(1, 6), st.integers(0, 2000), odd_ints)
    if kind == "number":
        return st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e300, -1e-300]))
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.one_of(st.text(max_size=12), odd_texts)
    if kind == "null":
        return st.none()
    if kind == "array":
        items = _from_schema(schema.get("items", {}), defs, depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3 if depth else 4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        optional = {k: _from_schema(v, defs, depth + 1) for k, v in props.items() if k not in required}
        fixed = {k: _from_schema(props[k], defs, depth + 1) for k in required}
        extra = st.dictionaries(st.sampled_from(["functions", "max_token", "suffix"]), st.integers(0, 3), max_size=1)
        if not props:  # a free-form object (logit_bias): string keys
            return st.dictionaries(st.text(max_size=6), st.floats(-5, 5), max_size=3)
        return st.tuples(st.fixed_dictionaries(fixed, optional=optional), extra).map(lambda t: {**t[0], **t[1]})
    return st.one_of(st.none(), st.integers(-2, 5), st.text(max_size=5))


def test_fuzz_the_api_from_its_openapi_schema(server):
    """No body the schema describes (or nearly) is a 5xx; every 4xx is OpenAI-shaped; nothing leaks."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = httpx.get(server.base_url + "/openapi.json").json()
    defs = schema["components"]["schemas"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    routes = {"/v1/completions": defs["CompletionRequest"], "/v1/chat/completions": defs["ChatCompletionRequest"]}

    def small(body: dict) -> dict:
        # Bounded work per example: the fuzzer looks for crashes, not for long generations.
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and 0 < body[name] < 2**31:
                body[name] = min(body[name], 4)
        body.setdefault("max_tokens", 3)
        return body

    bodies = st.sampled_from(sorted(routes)).flatmap(
        lambda path: st.tuples(st.just(path), _from_schema(routes[path], defs))
    )

    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as http:

        @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(bodies)
        def check(case):
            path, body = case
            try:
                raw = json.dumps(small(body)).encode("utf-8", "surrogatepass")
            except (TypeError, ValueError):
                return
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            if r.status_code >= 400:
                _assert_openai_error(r, r.status_code)

        check()
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    assert wait_idle(server)["minipaged_kv_blocks_used"] == 0


# ---- streamed forced tool calls ------------------------------------------------------------
CLOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def _streamed_tool_calls(chunks) -> dict[int, dict]:
    """Per choice: the call rebuilt from OpenAI ``tool_calls`` deltas, checking their shape on the way."""
    calls: dict[int, dict] = {}
    for ch in chunks:
        for c in ch.choices:
            call = calls.setdefault(c.index, {"deltas": 0, "arguments": "", "finish": None, "content": ""})
            call["content"] += c.delta.content or ""
            if c.finish_reason is not None:
                call["finish"] = c.finish_reason
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if call["deltas"] == 0:  # the first delta names the call
                    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    call["id"], call["name"] = tc.id, tc.function.name
                else:
                    assert tc.id is None and tc.function.name is None
                call["arguments"] += tc.function.arguments or ""
                call["deltas"] += 1
    return calls


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls_stream_as_tool_call_deltas(server, client, tool_choice):
    jsonschema = pytest.importorskip("jsonschema")
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice=tool_choice,
        max_tokens=80,
        temperature=1.0,
        seed=11,
        n=2,
    )
    full = client.chat.completions.create(**kw)
    calls = _streamed_tool_calls(list(client.chat.completions.create(stream=True, **kw)))
    assert sorted(calls) == [0, 1]
    tools = {"get_weather": WEATHER_TOOL, "get_time": CLOCK_TOOL}
    for choice in full.choices:
        streamed = calls[choice.index]
        assert choice.finish_reason == streamed["finish"] == "tool_calls"
        # How many fragments depends on how outputs batch up on their way (a slow reader gets them merged);
        # the unit test below feeds one character at a time.
        assert streamed["content"] == "" and streamed["deltas"] >= 1
        (want,) = choice.message.tool_calls
        assert streamed["name"] == want.function.name
        if tool_choice != "required":
            assert streamed["name"] == "get_weather"
        # Same seed, same tokens: the streamed arguments are the non-streamed ones.
        assert json.loads(streamed["arguments"]) == json.loads(want.function.arguments)
        jsonschema.validate(json.loads(streamed["arguments"]), tools[streamed["name"]]["function"]["parameters"])
    assert wait_idle(server)["minipaged_kv_blocks_used"] == 0


def test_scan_tool_call_finds_the_top_level_name_and_arguments():
    from minipaged.entrypoints.openai.structured import ToolCallStream, scan_tool_call

    text = '{"arguments": {"name": "not me", "s": "}]"}, "name": "f"}'
    name, start, end = scan_tool_call(text)
    assert name == "f" and json.loads(text[start:end]) == {"name": "not me", "s": "}]"}
    assert scan_tool_call('{"name": "f", "arguments": 12 }') == ("f", 27, 29)
    assert scan_tool_call('{"name": "f", "argu') == ("f", None, None)
    # Fed one character at a time, the deltas rebuild exactly the arguments, after the name is known.
    stream, text, pieces = ToolCallStream(None), '{"name": "g", "arguments": {"a": [1, "x"]}}', []
    for k in range(len(text) + 1):
        entry = stream.update(text[:k])
        if entry is not None:
            pieces.append(entry)
    assert pieces[0]["function"]["name"] == "g" and "name" not in pieces[1]["function"]
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"a": [1, "x"]}'
