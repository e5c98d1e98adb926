"""Structured outputs on the real SmolLM2-135M-Instruct through the server and the official ``openai`` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from minipaged.entrypoints.openai.launch import ServerProcess, free_port, minipaged_command  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[2])
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
def test_smollm2_response_format_json_schema(tmp_path):
    from minipaged.models.loader import default_model_is_prepared

    if not default_model_is_prepared():
        pytest.skip("SmolLM2 not prepared (make setup)")
    port = free_port()
    cmd = minipaged_command(port, "--kv-cache-memory", str(64 << 20), "--log-level", "warning")
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=tmp_path / "server.log", cwd=ROOT) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
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
