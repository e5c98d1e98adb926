"""Structured outputs over HTTP: ``response_format``, vLLM's ``structured_outputs`` and forced tool calls.

Each becomes one ``StructuredOutputsParams``; a malformed schema, regex or grammar is a 400
naming the request field it came from (the grammar is parsed here, before anything is queued).
Tool calls follow vLLM's approach for ``tool_choice`` naming a function or ``"required"``: the
arguments are generated under the function's parameter schema, so they always parse; ``"auto"``
would need a model-specific parser to tell a call from prose, and is refused.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from minipaged.entrypoints.openai.errors import APIError
from minipaged.entrypoints.openai.protocol import ChatCompletionRequest, SamplingFields
from minipaged.errors import InvalidSamplingParamsError
from minipaged.sampling_params import StructuredOutputsParams
from minipaged.structured_output import build_grammar

ANY_OBJECT = {"type": "object"}


def _checked(field: str, **kwargs: Any) -> StructuredOutputsParams:
    """``StructuredOutputsParams(**kwargs)`` whose grammar parses, else a 400 naming ``field``."""
    try:
        params = StructuredOutputsParams(**kwargs)
        build_grammar(params)
    except InvalidSamplingParamsError as err:
        raise APIError(400, f"{field}: {str(err).split(': ', 1)[-1]}", field) from None
    return params


def structured_outputs_for(body: SamplingFields) -> StructuredOutputsParams | None:
    """The constraint the body asks for with ``response_format`` or ``structured_outputs`` (not both)."""
    fmt, extra = body.response_format, body.structured_outputs
    wants_format = fmt is not None and fmt.type != "text"
    if wants_format and extra is not None:
        raise APIError(400, "response_format and structured_outputs: give one of them", "structured_outputs")
    if extra is not None:
        given = {k: v for k, v in extra.model_dump(by_alias=True).items() if v is not None}
        if len(given) != 1:
            raise APIError(
                400,
                f"structured_outputs: give exactly one of json, json_object, regex, choice, grammar; "
                f"got {sorted(given) or 'none'}",
                "structured_outputs",
            )
        ((kind, value),) = given.items()
        return _checked(f"structured_outputs.{kind}", **given)
    if not wants_format:
        return None
    if fmt.type == "json_object":
        return _checked("response_format", json_object=True)
    if fmt.json_schema is None:
        raise APIError(400, "response_format.json_schema: required when type is json_schema", "response_format")
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else ANY_OBJECT
    return _checked("response_format.json_schema.schema", json=schema)


def tool_constraint(body: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The arguments' schema when ``tool_choice`` forces a call; None when no tool call is asked for."""
    choice, tools = body.tool_choice, body.tools
    if not tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        raise APIError(
            400,
            'tool_choice: "auto" (the default with tools) is not supported by this server; '
            'name a function or use "required"',
            "tool_choice",
        )
    if body.response_format is not None or body.structured_outputs is not None:
        raise APIError(400, "tool_choice: cannot be combined with response_format or structured_outputs", "tool_choice")
    if body.stream:
        raise APIError(400, "stream: forced tool calls are not streamed by this server", "stream")
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters or ANY_OBJECT},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        return _checked("tools", json={"anyOf": calls})
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools", "tool_choice")
    return _checked(f"tools.{choice.function.name}.parameters", json=named[0].function.parameters or ANY_OBJECT)


def tool_call_message(body: ChatCompletionRequest, text: str) -> dict[str, Any]:
    """The assistant message carrying one ``tool_calls`` entry built from the constrained ``text``."""
    if body.tool_choice == "required":
        call = json.loads(text)
        name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
    else:
        name, arguments = body.tool_choice.function.name, text
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ],
    }
