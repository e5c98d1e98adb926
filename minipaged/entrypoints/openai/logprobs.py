"""Engine logprobs (one ``{token_id: Logprob}`` dict per generated token) in OpenAI's two shapes.

Completions (legacy): parallel arrays ``tokens``, ``token_logprobs``, ``top_logprobs`` (a
``{token_text: logprob}`` dict holding the sampled token and the top-k) and ``text_offset``
(character offset of each token in the choice's text, continuing across stream chunks).
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` with the top-k
by rank. JSON has no ``-inf``, so an impossible token's logprob is written as -9999.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from minipaged.outputs import Logprob

_NEG_INF_STAND_IN = -9999.0


def _finite(value: float) -> float:
    return _NEG_INF_STAND_IN if math.isinf(value) or math.isnan(value) else value


def token_text(token_id: int, logprob: Logprob | None, tokenizer: Any) -> str:
    """The token's own text: the engine's ``decoded_token`` when it filled one in, else the tokenizer's."""
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    if tokenizer is None:
        return f"<token {token_id}>"
    return tokenizer.decode([token_id])


def completion_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], tokenizer: Any, first_offset: int
) -> dict[str, list]:
    """The legacy completions ``logprobs`` object for ``token_ids``; ``first_offset``: the first token's text offset."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = first_offset
    for tid, by_token in zip(token_ids, logprobs):
        sampled = by_token.get(tid)
        text = token_text(tid, sampled, tokenizer)
        tokens.append(text)
        token_logprobs.append(None if sampled is None else _finite(sampled.logprob))
        top_logprobs.append({token_text(t, lp, tokenizer): _finite(lp.logprob) for t, lp in by_token.items()})
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _chat_entry(token_id: int, logprob: Logprob | None, tokenizer: Any) -> dict[str, Any]:
    text = token_text(token_id, logprob, tokenizer)
    value = _NEG_INF_STAND_IN if logprob is None else _finite(logprob.logprob)
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], tokenizer: Any, top_logprobs: int
) -> dict[str, list]:
    """The chat ``logprobs`` object: each sampled token with its ``top_logprobs`` best alternatives by rank."""
    content = []
    for tid, by_token in zip(token_ids, logprobs):
        entry = _chat_entry(tid, by_token.get(tid), tokenizer)
        ranked = sorted(by_token.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))
        entry["top_logprobs"] = [_chat_entry(t, lp, tokenizer) for t, lp in ranked[:top_logprobs]]
        content.append(entry)
    return {"content": content}
