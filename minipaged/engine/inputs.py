"""Prompts in: text or token ids, single or batched, and chat conversations, checked before any work.

Shared by every front end (``LLM``, ``AsyncLLM``, the server) so that one prompt means the
same thing everywhere and a malformed one fails with the same typed error.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from minipaged.errors import InputError, InvalidPromptError, InvalidSamplingParamsError
from minipaged.sampling_params import SamplingParams


def _token_ids(ids: Any) -> list[int]:
    """Token ids as plain ints: lists, tuples, torch tensors and numpy arrays of integers are accepted."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids
    ):
        raise InvalidPromptError("prompt_token_ids", "must be a list of ints")
    return [int(t) for t in ids]


def check_text(field: str, text: str, error: type[InputError] = InvalidPromptError) -> str:
    """``text`` if it can be encoded as UTF-8; a lone surrogate (valid in JSON and Python, not in UTF-8) fails here.

    Tokenizers reject such strings with an untyped ``TypeError``; this names the field instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(
            field, f"is not valid Unicode: lone surrogate {text[err.start]!r} at character {err.start}"
        ) from None
    return text


def parse_prompt(prompt: Any, tokenizer: Any) -> tuple[str | None, list[int]]:
    """``(text or None, token ids)`` of a string or ``{"prompt_token_ids": [...], "prompt": optional text}``."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidPromptError("prompt", "is empty")
        check_text("prompt", prompt)
        if tokenizer is None:
            raise InvalidPromptError("prompt", "text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
        return prompt, list(tokenizer.encode(prompt))
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise InvalidPromptError(
                "prompt", f"must be a string when given with prompt_token_ids, got {type(text).__name__}"
            )
        return text, _token_ids(prompt["prompt_token_ids"])
    raise InvalidPromptError(
        "prompt", f"must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
    )


def check_params(params: Any, tokenizer: Any) -> SamplingParams:
    """``params`` if it is a ``SamplingParams`` this engine can honour, else a typed error."""
    if not isinstance(params, SamplingParams):
        raise InvalidSamplingParamsError(
            "sampling_params", f"must be a SamplingParams (or a list with one per prompt), got {type(params).__name__}"
        )
    if params.stop and tokenizer is None:
        raise InvalidSamplingParamsError(
            "stop", "stop strings need a tokenizer; this engine has none (use stop_token_ids)"
        )
    return params


def _per_prompt(name: str, value: Any, count: int, single: type, default: Any) -> list[Any]:
    """One entry per prompt: a single value is repeated, a list must match the prompts."""
    if value is None:
        return [default] * count
    if isinstance(value, single) and not isinstance(value, bool):
        return [value] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidPromptError(name, f"has {len(value)} entries for {count} prompts")
        return list(value)
    raise InvalidPromptError(name, f"must be a {single.__name__} or a list with one per prompt, got {value!r}")


def normalize_batch(prompts: Any, sampling_params: Any, priority: Any) -> list[tuple[Any, Any, Any]]:
    """``[(prompt, params, priority)]`` from the forms ``LLM.generate`` accepts; nothing is validated beyond shape."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidPromptError("prompts", f"must be a prompt or a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidPromptError("prompts", "is empty")
    params = _per_prompt("sampling_params", sampling_params, len(prompts), SamplingParams, SamplingParams())
    priorities = _per_prompt("priority", priority, len(prompts), int, 0)
    for p in priorities:
        check_priority(p)
    return list(zip(prompts, params, priorities))


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidPromptError("priority", f"must be an integer, got {priority!r}")
    return priority


def check_messages(conversation: Any, where: str = "messages") -> list[dict[str, Any]]:
    """A conversation: a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InvalidPromptError(where, "must be a non-empty list of {'role', 'content'} messages")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise InvalidPromptError(where, f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidPromptError(where, f"message {i} needs a string {key!r}, got {message.get(key)!r}")
            check_text(where, message[key])
    return list(conversation)


def chat_prompts(messages: Any, tokenizer: Any, add_generation_prompt: bool = True) -> list[dict[str, Any]]:
    """One conversation (list of messages) or a list of them -> ``{"prompt", "prompt_token_ids"}`` each."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise InvalidPromptError("messages", "chat needs a tokenizer with a chat template")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidPromptError("messages", "must be a conversation (a list of messages) or a list of conversations")
    single = isinstance(messages[0], dict)
    conversations: Sequence[Any] = [messages] if single else messages
    out = []
    for i, conv in enumerate(conversations):
        conv = check_messages(conv, "messages" if single else f"messages[{i}]")
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template already holds any BOS it wants; do not let encode add another.
        out.append({"prompt": text, "prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False))})
    return out
