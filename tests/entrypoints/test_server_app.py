"""The app in-process over a scripted fake engine: failure paths a real model cannot be made to hit on cue."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from minipaged.engine.core import EngineStats  # noqa: E402
from minipaged.entrypoints.openai.app import build_app  # noqa: E402
from minipaged.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs  # noqa: E402
from minipaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput  # noqa: E402


@dataclass
class _Config:
    max_model_len: int = 64


class FakeEngine:
    """Yields two growing outputs per request, then fails (``fail=True``) or finishes."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.is_running = True
        self.tokenizer = None
        self.config = _Config()
        self.model_name = "fake"
        self.closed: list[str] = []

    def validate(self, prompt, params):
        return None, [1, 2]

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 8, 0, 0, 8, 0, 0, 0)

    async def generate(self, prompt, params, request_id):
        try:
            for i, text in enumerate(("ab", "abcd")):
                await asyncio.sleep(0)
                finished = i == 1 and not self.fail
                comp = CompletionOutput(0, text, [5] * (i + 1), "length" if finished else None)
                yield RequestOutput(request_id, None, [1, 2], [comp], finished, RequestMetrics(0.0))
            if self.fail:
                raise RuntimeError("boom")
        finally:
            self.closed.append(request_id)

    async def shutdown(self):
        pass


def _client(engine) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(engine), raise_app_exceptions=False), base_url="http://test"
    )


def test_engine_failure_mid_stream_is_an_in_band_error_then_done():
    async def go():
        async with _client(FakeEngine(fail=True)) as http:
            r = await http.post("/v1/completions", json={"prompt": [1, 2], "stream": True})
            return r.status_code, r.text

    status, text = asyncio.run(go())
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == "abcd"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == 500 and "boom" in err["message"]


def test_engine_failure_without_stream_is_a_500_and_health_reports_a_dead_engine():
    engine = FakeEngine(fail=True)

    async def go():
        async with _client(engine) as http:
            r = await http.post("/v1/completions", json={"prompt": "x"})
            ok = (await http.get("/health")).status_code
            engine.is_running = False
            dead = await http.get("/health")
            return r, ok, dead

    r, ok, dead = asyncio.run(go())
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert ok == 200 and dead.status_code == 503 and dead.json()["error"]["code"] == 503
    assert engine.closed  # the engine iterator was closed


def test_two_apps_in_one_process_keep_their_own_metrics():
    async def go():
        a, b = FakeEngine(), FakeEngine()
        async with _client(a) as ha, _client(b) as hb:
            await ha.post("/v1/completions", json={"prompt": [3], "n": 1})
            return (await ha.get("/metrics")).text, (await hb.get("/metrics")).text

    ma, mb = asyncio.run(go())
    assert "minipaged_e2e_request_latency_seconds_count 1.0" in ma
    assert "minipaged_e2e_request_latency_seconds_count 0.0" in mb


class _Tok:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_logprob_shapes_by_hand():
    lps = [
        {0: Logprob(-0.1, 1), 1: Logprob(-2.5, 2), 2: Logprob(-3.0, 3)},
        {2: Logprob(-math.inf, 9), 0: Logprob(-0.2, 1), 1: Logprob(-1.0, 2)},
    ]
    out = completion_logprobs([0, 2], lps, _Tok(), first_offset=5)
    assert out == {
        "tokens": ["a", "c"],
        "token_logprobs": [-0.1, -9999.0],
        "top_logprobs": [{"a": -0.1, "b": -2.5, "c": -3.0}, {"c": -9999.0, "a": -0.2, "b": -1.0}],
        "text_offset": [5, 6],
    }
    chat = chat_logprobs([0, 2], lps, _Tok(), top_logprobs=2)["content"]
    assert [c["token"] for c in chat] == ["a", "c"] and chat[1]["logprob"] == -9999.0
    assert [t["token"] for t in chat[1]["top_logprobs"]] == ["a", "b"]  # by rank; the sampled rank-9 token is not top-2
    assert chat[0]["bytes"] == [97]


def test_dead_engine_gets_503_for_new_requests_and_no_traceback_in_bodies():
    class RemoteFailure(FakeEngine):
        async def generate(self, prompt, params, request_id):
            async for out in super().generate(prompt, params, request_id):
                yield out
            raise RuntimeError('rank 1 failed\nTraceback (most recent call last):\n  File "w.py", line 1')

    engine = RemoteFailure()
    called = []

    async def go():
        app = build_app(engine, on_engine_dead=lambda: called.append(True))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            failed = await http.post("/v1/completions", json={"prompt": "x"})
            streamed = await http.post("/v1/completions", json={"prompt": "x", "stream": True})
            engine.is_running = False
            new = await http.post("/v1/completions", json={"prompt": "x"})
            new_stream = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            return failed, streamed, new, new_stream

    failed, streamed, new, new_stream = asyncio.run(go())
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "RuntimeError: rank 1 failed"
    assert "Traceback" not in streamed.text and "rank 1 failed" in streamed.text
    for r in (new, new_stream):
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError", r.text


def test_logprob_bytes_are_the_tokens_own_bytes():
    class ByteLevel(_Tok):
        pieces = {0: "\u0120hi", 1: "\u00c3", 2: "<0xA9>"}  # " hi"; half of "é" (0xC3 0xA9); SentencePiece's byte

        def convert_ids_to_tokens(self, token_id):
            return self.pieces[token_id]

        def decode(self, ids):
            return "\ufffd" if ids[0] else " hi"

    lps = [{0: Logprob(-0.1, 1)}, {1: Logprob(-0.2, 1)}, {2: Logprob(-0.3, 1)}]
    chat = chat_logprobs([0, 1, 2], lps, ByteLevel(), top_logprobs=0)["content"]
    assert [c["bytes"] for c in chat] == [[32, 104, 105], [0xC3], [0xA9]]


def test_package_exports_async_llm():
    from minipaged import AsyncLLM
    from minipaged.engine.async_llm import AsyncLLM as Defined

    assert AsyncLLM is Defined


def test_unsupported_fields_named_together_and_content_type_hint():
    async def go():
        async with _client(FakeEngine()) as http:
            body = {"messages": [{"role": "user", "content": "x"}], "functions": [], "suffix": "x", "max_token": 3}
            unsupported = await http.post("/v1/chat/completions", json=body)
            form = await http.post("/v1/completions", content=b"prompt=x", headers={"content-type": "text/plain"})
            return unsupported, form

    unsupported, form = asyncio.run(go())
    assert unsupported.status_code == 400
    message = unsupported.json()["error"]["message"]
    assert "functions, suffix: not supported by this server" in message and "max_token" in message, message
    assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]


def test_streamed_chunks_carry_stop_reason_and_system_fingerprint():
    async def go():
        async with _client(FakeEngine()) as http:
            return (await http.post("/v1/completions", json={"prompt": [1], "stream": True})).text

    chunks = [json.loads(e[6:]) for e in asyncio.run(go()).split("\n\n") if e and e != "data: [DONE]"]
    assert all("stop_reason" in c["choices"][0] and c["system_fingerprint"] for c in chunks)
