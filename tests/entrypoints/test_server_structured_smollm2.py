"""Structured outputs on the real SmolLM2-135M-Instruct through the server and the official ``openai`` client."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "capital": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["capital", "population_millions"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_smollm2_response_format_json_schema(smollm2_client):
    client = smollm2_client
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, SCHEMA)
    assert "Paris" in answer["capital"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 3}}},
        )
    assert err.value.body["param"] == "response_format.json_schema.schema"
