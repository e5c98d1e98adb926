"""Request bodies of the OpenAI-compatible API, as pydantic models.

Pydantic checks only the JSON *types* (strict: ``"16"`` is not an integer, ``1.5`` is not
an ``n``); the value ranges are checked once, by ``SamplingParams`` and the engine, whose
typed errors name the field. Unknown fields are rejected rather than silently ignored, so a
misspelt ``max_token`` is a 400 naming it instead of a request that quietly used the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Request fields of the OpenAI API (and vLLM's extras) that this server does not implement: a body
# naming any of them is refused with all of them named, as "not supported by this server".
UNSUPPORTED_FIELDS = frozenset(
    {
        "parallel_tool_calls",
        "functions",
        "function_call",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "suffix",
        "best_of",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
    }
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Body):
    """vLLM's ``structured_outputs`` extra: exactly one of these (checked by ``StructuredOutputsParams``)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(_Body):
    """The sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    prompt_logprobs: int | None = None  # vLLM's extra: top-k alternatives at each prompt position
    user: str | None = None  # an end-user id for the caller's own bookkeeping; the engine does not use it


# One text, a batch of texts, one list of token ids, or a batch of them (OpenAI's four prompt shapes).
PromptField = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptField
    echo: bool = False
    logprobs: int | None = None  # top-k alternatives at each sampled position (the sampled token is always included)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Messages may carry extra keys (``name``, tool fields) that the chat template reads or ignores.
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[TextPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as the chat template expects it: content parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
