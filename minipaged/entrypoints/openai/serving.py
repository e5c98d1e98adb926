"""The two generation endpoints: request body -> engine requests -> OpenAI response or SSE stream.

Every prompt of a request is validated (``engine.validate``) before any is submitted, so a bad
prompt in a batch leaves nothing half-queued. Each prompt becomes one engine request
(``{completion id}-{prompt index}``); the engine yields cumulative outputs, and the stream
sends each choice the part of its text (and tokens) it has not sent yet, so the
concatenated deltas equal the non-streamed text. Choice ``k`` of prompt ``i`` has index
``i * n + k`` (OpenAI's convention for batched prompts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minipaged import __version__
from minipaged.engine.inputs import check_text
from minipaged.entrypoints.openai.errors import APIError, from_input_error
from minipaged.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from minipaged.entrypoints.openai.metrics import RequestTimer
from minipaged.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from minipaged.entrypoints.openai.structured import (
    ToolCallStream,
    structured_outputs_for,
    tool_call_message,
    tool_constraint,
)
from minipaged.errors import EngineDeadError, InputError
from minipaged.outputs import CompletionOutput, RequestOutput
from minipaged.sampling_params import SamplingParams, StructuredOutputsParams

_log = logging.getLogger("minipaged.entrypoints.openai")

DONE = "data: [DONE]\n\n"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Names the server build (OpenAI: the backend configuration), so clients can tell a change of server.
SYSTEM_FINGERPRINT = f"minipaged-{__version__}"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Request fields passed to SamplingParams under the same name when given.
_PASSTHROUGH = (
    "top_k",
    "seed",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "prompt_logprobs",
)


def as_api_error(err: Exception) -> APIError:
    """The OpenAI-shaped error for any exception: typed input errors are 400s naming their field.

    A dead engine is a 503 (the server is going away; a supervisor restarts it). Anything else is
    a 500 whose message is the error's type and first line only: a traceback, a worker's included,
    goes to the log, never to the client.
    """
    if isinstance(err, APIError):
        return err
    if isinstance(err, InputError):
        return from_input_error(err)
    if isinstance(err, EngineDeadError):
        return APIError(503, f"{err}; the server is shutting down")
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return APIError(500, f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__)


def stream_error(err: Exception) -> APIError:
    """The in-band error of a stream that failed after its 200; a 5xx is logged with its traceback."""
    api = as_api_error(err)
    if api.status >= 500:
        _log.error("stream failed: %s", api.message, exc_info=err)
    return api


def check_strings(body: SamplingFields) -> None:
    """A 400 naming the top-level field of the first string (key or value) that is not valid Unicode.

    JSON may escape a lone surrogate (``"\\ud800"``); it cannot be tokenized or written back as UTF-8.
    """

    def walk(field: str, value: Any) -> None:
        if isinstance(value, str):
            check_text(field, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(field, key)
                walk(field, item)
        elif isinstance(value, list):
            for item in value:
                walk(field, item)

    for name, value in body.model_dump(exclude_none=True).items():
        walk(name, value)


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event in OpenAI's framing."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams from the request's fields; the ranges are SamplingParams' to check.

    ``structured_outputs``: a constraint that replaces the body's own (a forced tool call's).
    """
    kwargs: dict[str, Any] = {
        "n": body.n,
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "min_p": 0.0 if body.min_p is None else body.min_p,
        "stop": [body.stop] if isinstance(body.stop, str) else (body.stop or []),
    }
    for name in _PASSTHROUGH:
        value = getattr(body, name)
        if value is not None and value is not False:
            kwargs[name] = value
    if body.logit_bias:
        kwargs["logit_bias"] = _logit_bias(body.logit_bias)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    structured = structured_outputs if structured_outputs is not None else structured_outputs_for(body)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    for name in kwargs:
        if name not in known:
            raise APIError(400, f"{name}: not supported by this engine", name)
    return SamplingParams(**kwargs)


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise APIError(400, f"logit_bias: keys must be token ids, got {key!r}", "logit_bias") from None
    return out


def check_model(body: SamplingFields, served: str) -> None:
    if body.model is not None and body.model != served:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {served!r}", "model")


def completion_prompts(prompt: Any) -> list[Any]:
    """OpenAI's four prompt shapes as a list of engine prompts (text, or ``{"prompt_token_ids": [...]}``)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: is empty", "prompt")
    if isinstance(prompt[0], int):
        return [{"prompt_token_ids": list(prompt)}]
    if isinstance(prompt[0], list):
        return [{"prompt_token_ids": list(ids)} for ids in prompt]
    return list(prompt)


async def merged_outputs(
    engine: Any, prompts: Sequence[Any], params: SamplingParams, request_id: str
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(prompt index, cumulative output)`` from one engine request per prompt, as they come.

    Closing or cancelling this iterator cancels every pump task, which closes its ``generate``
    iterator and so aborts the engine request (its KV blocks are freed at once).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, prompt: Any) -> None:
        gen = engine.generate(prompt, params, f"{request_id}-{i}")
        try:
            async for out in gen:
                queue.put_nowait((i, out, None))
            queue.put_nowait((i, None, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, None, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(finals: Sequence[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in finals if o is not None)
    completion = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class _ChoiceCursor:
    """What one streamed choice has sent so far."""

    chars: int = 0
    tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _DeltaTracker:
    """Turns cumulative outputs into per-choice deltas (text, tokens, logprobs not yet sent)."""

    n: int
    want_logprobs: bool
    cursors: dict[int, _ChoiceCursor] = field(default_factory=dict)

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[_Delta]:
        found = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            cur = self.cursors.setdefault(index, _ChoiceCursor())
            if cur.finished:
                continue
            text, ids = c.text[cur.chars :], c.token_ids[cur.tokens :]
            if not text and c.finish_reason is None and not (self.want_logprobs and ids):
                continue
            lps = c.logprobs[cur.tokens :] if (self.want_logprobs and c.logprobs is not None) else None
            found.append(_Delta(index, text, ids, lps, c.finish_reason, c.stop_reason))
            cur.chars, cur.tokens = len(c.text), len(c.token_ids)
            cur.finished = c.finish_reason is not None
        return found


def _prompt_text(prompt: Any, out: RequestOutput, tokenizer: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if out.prompt is not None:
        return out.prompt
    return "" if tokenizer is None else tokenizer.decode(out.prompt_token_ids)


@dataclass(frozen=True)
class RequestLimits:
    """What one HTTP request may ask for, so that no single body ties the server up for minutes."""

    max_n: int = 64  # samples per prompt
    max_prompts: int = 256  # prompts in one /v1/completions body


def renamed(call: Callable[[], Any], renames: dict[str, str]) -> Any:
    """``call()``, with an input error about an engine field re-raised under the request's name for it."""
    try:
        return call()
    except InputError as err:
        field = renames.get(err.field)
        if field is None or field == err.field:
            raise
        message = str(err).removeprefix(f"{err.field}: ")
        raise APIError(400, f"{field}: {message}", field) from None


class _Handler:
    """What both endpoints share: the engine, the served name, and the envelope of a streamed chunk."""

    chunk_object: str

    def __init__(self, engine: Any, model_name: str, limits: RequestLimits | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or RequestLimits()

    def check_limits(self, n: int) -> None:
        if n > self.limits.max_n:
            raise APIError(400, f"n: {n} samples, more than this server's {self.limits.max_n}", "n")

    def max_tokens(self, given: int | None, field: str, prompt_len: int, default: int | None) -> int:
        """``given`` if prompt + it fit ``max_model_len`` (else OpenAI's 400); unset: ``default``, or the room left."""
        max_len = self.engine.config.max_model_len
        room = max(1, max_len - prompt_len)  # a prompt of exactly max_model_len tokens still samples one
        if given is None:
            return room if default is None else min(default, room)
        if isinstance(given, int) and given > 0 and prompt_len + given > max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + given} tokens ({prompt_len} in the prompt, {given} in the completion). "
                "Please reduce the length of the prompt or the completion.",
                field,
            )
        return given

    def _chunk(self, rid: str, created: int, choices: list[dict], usage: Any = ...) -> dict[str, Any]:
        """One chunk (or the whole completion); ``usage`` is left out unless given (None included)."""
        payload = {
            "id": rid,
            "object": self.chunk_object,
            "created": created,
            "model": self.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if usage is not ...:
            payload["usage"] = usage
        return payload


class CompletionHandler(_Handler):
    """POST /v1/completions."""

    chunk_object = "text_completion"

    def prepare(self, body: CompletionRequest) -> tuple[list[Any], SamplingParams]:
        """Check the whole request (model, every prompt) before anything is submitted.

        Text prompts come back tokenized (``{"prompt", "prompt_token_ids"}``), so the engine does
        not tokenize them again; call this off the event loop, a long prompt takes a while.
        """
        check_model(body, self.model_name)
        self.check_limits(body.n)
        prompts = completion_prompts(body.prompt)
        if len(prompts) > self.limits.max_prompts:
            raise APIError(
                400, f"prompt: {len(prompts)} prompts, more than this server's {self.limits.max_prompts}", "prompt"
            )
        probe = SamplingParams(max_tokens=1)  # tokenizes and checks the prompts; the real params come after
        tokenized = []
        for prompt in prompts:
            text, ids = self.engine.validate(prompt, probe)
            tokenized.append({"prompt_token_ids": ids} if text is None else {"prompt": text, "prompt_token_ids": ids})
        longest = max(len(p["prompt_token_ids"]) for p in tokenized)
        max_tokens = self.max_tokens(body.max_tokens, "max_tokens", longest, DEFAULT_COMPLETION_MAX_TOKENS)
        params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs)
        if body.echo and body.logprobs is not None:  # an echo's logprobs cover the prompt tokens too
            params = dataclasses.replace(params, prompt_logprobs=max(body.logprobs, params.prompt_logprobs or 0))
        for prompt in tokenized:
            self.engine.validate(prompt, params)
        return tokenized, params

    def _logprobs(self, d: _Delta, offset: int) -> dict | None:
        if d.logprobs is None:
            return None
        return completion_logprobs(d.token_ids, d.logprobs, self.engine.tokenizer, offset)

    def _echo_logprobs(self, out: RequestOutput, completion: dict, top_k: int) -> dict:
        """The prompt tokens' logprobs (the first one null, text offsets from 0), then ``completion``'s."""
        if out.prompt_logprobs is None:  # never computed: the request ended before its prompt did
            return completion
        head = completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, self.engine.tokenizer, 0, top_k)
        return {key: head[key] + completion[key] for key in completion}

    def _prompt_logprobs(self, body: CompletionRequest, out: RequestOutput) -> dict[str, Any]:
        """``{"prompt_logprobs": ...}`` for a choice when the body asked for them (vLLM's extra), else {}."""
        if body.prompt_logprobs is None or out.prompt_logprobs is None:
            return {}
        entries = prompt_logprobs_json(
            out.prompt_token_ids, out.prompt_logprobs, self.engine.tokenizer, body.prompt_logprobs
        )
        return {"prompt_logprobs": entries}

    async def full(
        self, body: CompletionRequest, prompts: list[Any], params: SamplingParams, timer: RequestTimer
    ) -> dict[str, Any]:
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, out in merged_outputs(self.engine, prompts, params, rid):
            timer.on_tokens()
            finals[i] = out
        choices = []
        want_lp = body.logprobs is not None
        for i, out in enumerate(finals):
            echo = _prompt_text(prompts[i], out, self.engine.tokenizer) if body.echo else ""
            for c in sorted(out.outputs, key=lambda c: c.index):
                lp = None
                if want_lp and c.logprobs is not None:
                    lp = completion_logprobs(c.token_ids, c.logprobs, self.engine.tokenizer, len(echo))
                    if body.echo:
                        lp = self._echo_logprobs(out, lp, body.logprobs)
                choices.append(
                    {
                        "index": i * params.n + c.index,
                        "text": echo + c.text,
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                        **self._prompt_logprobs(body, out),
                    }
                )
        timer.on_finish([c["finish_reason"] for c in choices])
        return self._chunk(rid, created, choices, _usage(finals))

    async def stream(
        self, body: CompletionRequest, prompts: list[Any], params: SamplingParams, timer: RequestTimer
    ) -> AsyncIterator[str]:
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_field = None if include_usage else ...
        tracker = _DeltaTracker(params.n, body.logprobs is not None)
        finals: list[RequestOutput | None] = [None] * len(prompts)
        reasons = []
        try:
            async for i, out in merged_outputs(self.engine, prompts, params, rid):
                timer.on_tokens()
                finals[i] = out
                for d in tracker.deltas(i, out):
                    cur = tracker.cursors[d.index]
                    text = d.text
                    opening = not cur.started
                    if body.echo and opening:
                        text = _prompt_text(prompts[i], out, self.engine.tokenizer) + text
                        cur.text_offset = len(text) - len(d.text)
                    cur.started = True
                    lp = self._logprobs(d, cur.text_offset)
                    cur.text_offset += sum(map(len, lp["tokens"])) if lp else len(d.text)
                    if body.echo and opening and lp is not None:
                        lp = self._echo_logprobs(out, lp, body.logprobs)
                    if d.finish_reason is not None:
                        reasons.append(d.finish_reason)
                    choice = {
                        "index": d.index,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason,
                        **(self._prompt_logprobs(body, out) if opening else {}),
                    }
                    yield sse(self._chunk(rid, created, [choice], usage_field))
            if include_usage:
                yield sse(self._chunk(rid, created, [], _usage(finals)))
            timer.on_finish(reasons)
        except Exception as err:  # noqa: BLE001 -- the 200 status line is already sent: report in-band
            yield sse(stream_error(err).body())
        yield DONE


class ChatHandler(_Handler):
    """POST /v1/chat/completions: messages through the model's chat template."""

    chunk_object = "chat.completion.chunk"

    @staticmethod
    def _tool_call_delta(
        body: ChatCompletionRequest, calls: dict[int, ToolCallStream], texts: dict[int, str], d: _Delta
    ) -> tuple[dict[str, Any], str | None]:
        """A forced call's ``(delta, finish_reason)``: ``tool_calls`` fragments, ending with ``"tool_calls"``.

        Cut short by ``max_tokens`` before its name was complete, the text goes out as plain
        content, as in the non-streamed answer.
        """
        call = calls.setdefault(d.index, ToolCallStream.for_request(body))
        texts[d.index] = text = texts.get(d.index, "") + d.text
        entry = call.update(text)
        delta: dict[str, Any] = {"tool_calls": [entry]} if entry is not None else {}
        if d.finish_reason == "stop":
            return delta, "tool_calls"
        if d.finish_reason is not None and not call.announced:
            return ({"content": text} if text else {}), d.finish_reason
        return delta, d.finish_reason

    def prepare(self, body: ChatCompletionRequest) -> tuple[list[Any], SamplingParams]:
        """Check the request and render the conversation (off the event loop: the template tokenizes)."""
        check_model(body, self.model_name)
        self.check_limits(body.n)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        if body.stream and body.prompt_logprobs is not None:
            raise APIError(
                400, "prompt_logprobs: not supported with stream=true on chat completions", "prompt_logprobs"
            )
        for i, message in enumerate(body.messages):
            if message.role not in CHAT_ROLES:
                raise APIError(
                    400,
                    f"messages: message {i} has role {message.role!r}, not one of {', '.join(CHAT_ROLES)}",
                    "messages",
                )
        prompt = self.engine.chat_prompt([m.as_template_dict() for m in body.messages])
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.max_tokens(given, field, len(prompt["prompt_token_ids"]), None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tools = tool_constraint(body)
        renames = {"max_tokens": field, "logprobs": "top_logprobs"}
        params = renamed(
            lambda: sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, structured_outputs=tools), renames
        )
        renamed(lambda: self.engine.validate(prompt, params), renames)
        return [prompt], params

    def _logprobs(self, token_ids: list[int], logprobs: list | None, body: ChatCompletionRequest) -> dict | None:
        if not body.logprobs or logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, self.engine.tokenizer, body.top_logprobs or 0)

    async def full(
        self, body: ChatCompletionRequest, prompts: list[Any], params: SamplingParams, timer: RequestTimer
    ) -> dict[str, Any]:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        final: RequestOutput | None = None
        async for _, out in merged_outputs(self.engine, prompts, params, rid):
            timer.on_tokens()
            final = out
        completions: list[CompletionOutput] = sorted(final.outputs, key=lambda c: c.index)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.token_ids, c.logprobs, body),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in completions
        ]
        if params.structured_outputs is not None and tool_constraint(body) is not None:
            for choice in choices:
                if choice["finish_reason"] == "stop":  # a call cut short by max_tokens stays plain text
                    choice["message"] = tool_call_message(body, choice["message"]["content"])
                    choice["finish_reason"] = "tool_calls"
        timer.on_finish([c.finish_reason for c in completions])
        response = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": _usage([final]),
        }
        if body.prompt_logprobs is not None and final.prompt_logprobs is not None:  # vLLM's extra, top level
            response["prompt_logprobs"] = prompt_logprobs_json(
                final.prompt_token_ids, final.prompt_logprobs, self.engine.tokenizer
            )
        return response

    async def stream(
        self, body: ChatCompletionRequest, prompts: list[Any], params: SamplingParams, timer: RequestTimer
    ) -> AsyncIterator[str]:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_field = None if include_usage else ...
        tracker = _DeltaTracker(params.n, body.logprobs)
        final: RequestOutput | None = None
        reasons = []
        calls: dict[int, ToolCallStream] = {}  # per choice, when tool_choice forces a call
        texts: dict[int, str] = {}
        forced = params.structured_outputs is not None and tool_constraint(body) is not None
        try:
            for index in range(params.n):
                role = {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield sse(self._chunk(rid, created, [role], usage_field))
            async for i, out in merged_outputs(self.engine, prompts, params, rid):
                timer.on_tokens()
                final = out
                for d in tracker.deltas(i, out):
                    if d.finish_reason is not None:
                        reasons.append(d.finish_reason)
                    delta, finish = {"content": d.text} if d.text else {}, d.finish_reason
                    if forced:
                        delta, finish = self._tool_call_delta(body, calls, texts, d)
                    lp = self._logprobs(d.token_ids, d.logprobs, body)
                    if not delta and finish is None and lp is None:
                        continue  # text held back until a tool call's name is complete
                    choice = {
                        "index": d.index,
                        "delta": delta,
                        "logprobs": lp,
                        "finish_reason": finish,
                        "stop_reason": d.stop_reason,
                    }
                    yield sse(self._chunk(rid, created, [choice], usage_field))
            if include_usage:
                yield sse(self._chunk(rid, created, [], _usage([final])))
            timer.on_finish(reasons)
        except Exception as err:  # noqa: BLE001 -- the 200 status line is already sent: report in-band
            yield sse(stream_error(err).body())
        yield DONE
