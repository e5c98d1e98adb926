"""Structured outputs over HTTP: ``response_format``, vLLM's ``structured_outputs`` and forced tool calls.

Each becomes one ``StructuredOutputsParams``; a malformed schema, regex or grammar is a 400
naming the request field it came from (the grammar is parsed here, before anything is queued).
Tool calls follow vLLM's approach for ``tool_choice`` naming a function or ``"required"``: the
arguments are generated under the function's parameter schema, so they always parse; ``"auto"``
would need a model-specific parser to tell a call from prose, and is refused. Streamed, a forced
call goes out in OpenAI's ``tool_calls`` deltas (``ToolCallStream``): the first carries the call's
id, type and function name, the following ones fragments of its ``arguments`` string.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
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


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
                "id": _new_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ],
    }


def _string_end(text: str, start: int) -> int | None:
    """Index just past the JSON string opening at ``text[start]`` (a quote); None if it is not closed yet."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def scan_tool_call(text: str) -> tuple[str | None, int | None, int | None]:
    """``(name, start, end)`` in the (possibly unfinished) JSON text ``{"name": ..., "arguments": ...}``.

    name: the top-level ``"name"`` string once complete; ``text[start:end]`` is the top-level
    ``"arguments"`` value (start None before it begins, end None while it is still open). Keys
    nested inside the arguments never count, whatever their names.
    """
    name = start = end = None
    depth, i = 0, 0
    key: str | None = None
    expect_key = awaiting_value = False
    value_start: int | None = None
    while i < len(text):
        c = text[i]
        if awaiting_value and not c.isspace():
            awaiting_value, value_start = False, i
            if key == "arguments":
                start = i
        if c == '"':
            j = _string_end(text, i)
            if j is None:
                break
            if depth == 1 and expect_key:
                key, expect_key = json.loads(text[i:j]), False
            elif depth == 1 and key == "name" and value_start == i:
                name = json.loads(text[i:j])
            i = j
            continue
        if c in "{[":
            depth += 1
            expect_key = depth == 1
        elif c in "}]":
            depth -= 1
            if depth == 1 and key == "arguments" and end is None and start is not None:
                end = i + 1  # the arguments' object or array just closed
            elif depth == 0 and key == "arguments" and end is None and start is not None:
                end = len(text[:i].rstrip())  # a scalar value, ended by the closing brace
        elif depth == 1 and c == ":":
            awaiting_value = True
        elif depth == 1 and c == ",":
            if key == "arguments" and end is None and start is not None:
                end = len(text[:i].rstrip())
            key, expect_key = None, True
        i += 1
    return name, start, end


@dataclass
class ToolCallStream:
    """One choice's forced tool call, turned from cumulative text into OpenAI's ``tool_calls`` deltas.

    For a named function the text is the arguments themselves; under ``"required"`` it is
    ``{"name": ..., "arguments": ...}`` and nothing is sent before the name is complete.
    """

    function: str | None  # the named function; None under "required" (read from the text)
    call_id: str = field(default_factory=_new_call_id)
    announced: bool = False  # the first delta (id, type, name) was sent
    sent: int = 0  # characters of the arguments sent so far

    @classmethod
    def for_request(cls, body: ChatCompletionRequest) -> ToolCallStream:
        return cls(None if body.tool_choice == "required" else body.tool_choice.function.name)

    def update(self, text: str) -> dict[str, Any] | None:
        """The ``tool_calls[0]`` delta for the cumulative ``text``: what was not sent yet, or None."""
        if self.function is not None:
            name, start, end = self.function, 0, None
        else:
            name, start, end = scan_tool_call(text)
        if name is None or start is None:
            return None
        arguments = text[start:end]
        fragment = arguments[self.sent :]
        self.sent = len(arguments)
        if not self.announced:
            self.announced = True
            return {
                "index": 0,
                "id": self.call_id,
                "type": "function",
                "function": {"name": name, "arguments": fragment},
            }
        return {"index": 0, "function": {"arguments": fragment}} if fragment else None
