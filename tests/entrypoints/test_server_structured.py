"""Structured outputs over HTTP, in-process: the app over an ``AsyncLLM`` of conftest's tiny random Llama
(SmolLM2's tokenizer), so every constrained answer comes from a model that emits garbage unconstrained.

Outputs are judged independently (``jsonschema``, ``re``); bad specs must be 400s naming the field.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from tool_cases import WEATHER_TOOL

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from minipaged.engine.async_llm import AsyncLLM  # noqa: E402
from minipaged.entrypoints.openai.app import build_app  # noqa: E402
from minipaged.models import build_model_from_hf  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CHAT = [{"role": "user", "content": "Plan a trip."}]


def run(hf, tokenizer, *requests):
    """POST each ``(path, body)`` to a fresh app over a fresh engine; the responses, then the engine's stats."""

    async def go():
        engine = AsyncLLM(
            build_model_from_hf(hf, attention_backend="torch"), tokenizer=tokenizer, num_kv_blocks=64, block_size=8
        )
        transport = httpx.ASGITransport(app=build_app(engine), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
                responses = [await client.post(path, json=body) for path, body in requests]
            return responses, engine.engine_core.stats(), engine.engine_core.structured_output.num_matchers
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def chat(**kw):
    return ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 60, "temperature": 1.0, **kw})


def completion(**kw):
    return ("/v1/completions", {"prompt": "x", "max_tokens": 60, "temperature": 1.0, **kw})


def test_constrained_answers_over_both_endpoints(hf, tokenizer):
    schema_format = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    responses, stats, matchers = run(
        hf,
        tokenizer,
        chat(response_format=schema_format, n=2, seed=1),
        completion(response_format=schema_format, seed=2),
        chat(response_format={"type": "json_object"}, seed=3, max_tokens=150),
        completion(structured_outputs={"regex": "[0-9]{2}:[0-9]{2}"}, seed=4),
        completion(structured_outputs={"choice": ["yes", "no"]}, seed=5, n=3),
        chat(structured_outputs={"grammar": 'root ::= "a" | "b" "c"'}, seed=6),
        chat(structured_outputs={"json": SCHEMA}, seed=7, stream=True),
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    trips = [c["message"]["content"] for c in responses[0].json()["choices"]]
    trips.append(responses[1].json()["choices"][0]["text"])
    for text in trips:
        jsonschema.validate(json.loads(text), SCHEMA)
    obj = responses[2].json()["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", responses[3].json()["choices"][0]["text"])
    assert {c["text"] for c in responses[4].json()["choices"]} <= {"yes", "no"}
    assert responses[5].json()["choices"][0]["message"]["content"] in ("a", "bc")
    events = [json.loads(line[6:]) for line in responses[6].text.splitlines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    jsonschema.validate(json.loads(streamed), SCHEMA)
    assert stats.used_blocks == 0 and stats.num_running == 0 and matchers == 0


def test_forced_tool_calls(hf, tokenizer):
    named = {"type": "function", "function": {"name": "get_weather"}}
    responses, stats, matchers = run(
        hf,
        tokenizer,
        chat(tools=[WEATHER_TOOL, CLOCK], tool_choice=named, seed=1),
        chat(tools=[WEATHER_TOOL, CLOCK], tool_choice="required", seed=2, max_tokens=100),
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    choice = responses[0].json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    choice = responses[1].json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    tool = {"get_weather": WEATHER_TOOL, "get_time": CLOCK}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    assert stats.used_blocks == 0 and matchers == 0


@pytest.mark.parametrize(
    "request_, param",
    [
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nope"}}}),
            "response_format.json_schema.schema",
        ),
        (completion(structured_outputs={"regex": "(unclosed"}), "structured_outputs.regex"),
        (completion(structured_outputs={"grammar": "root ::= missing"}), "structured_outputs.grammar"),
        (completion(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
        (
            completion(structured_outputs={"choice": ["a"]}, response_format={"type": "json_object"}),
            "structured_outputs",
        ),
        (chat(tools=[WEATHER_TOOL]), "tool_choice"),
        (chat(tools=[WEATHER_TOOL], tool_choice="auto"), "tool_choice"),
        (chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    ],
)
def test_bad_specs_are_400s_naming_the_field(hf, tokenizer, request_, param):
    (response,), stats, _ = run(hf, tokenizer, request_)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert stats.num_waiting == 0 and stats.used_blocks == 0
