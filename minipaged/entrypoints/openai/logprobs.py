"""Engine logprobs (one ``{token_id: Logprob}`` dict per generated token) in OpenAI's two shapes.

Completions (legacy): parallel arrays ``tokens``, ``token_logprobs``, ``top_logprobs`` (a
``{token_text: logprob}`` dict holding the sampled token and the top-k) and ``text_offset``
(character offset of each token in the choice's text, continuing across stream chunks).
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` with the top-k
by rank. vLLM's ``prompt_logprobs`` extra: per prompt token ``None`` (the first) or
``{token_id: {"logprob", "rank", "decoded_token"}}``. JSON has no ``-inf``, so an impossible
token's logprob is written as -9999.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from minipaged.outputs import Logprob

_NEG_INF_STAND_IN = -9999.0


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    chars = {b: b for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for i, b in enumerate(shifted):
        chars[b] = 256 + i
    return {chr(c): b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


def token_bytes(token_id: int, text: str, tokenizer: Any) -> list[int]:
    """The token's own bytes: a token holding part of a UTF-8 character has no text of its own.

    Read from the vocabulary piece (byte-level BPE or SentencePiece byte fallback); other pieces
    are their text's UTF-8.
    """
    piece = None
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece:
        if m := _BYTE_TOKEN.fullmatch(piece):
            return [int(m.group(1), 16)]
        if all(ch in _BYTE_LEVEL for ch in piece):
            return [_BYTE_LEVEL[ch] for ch in piece]
    return list(text.encode("utf-8"))


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
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob] | None],
    tokenizer: Any,
    first_offset: int,
    top_k: int | None = None,
) -> dict[str, list]:
    """The legacy completions ``logprobs`` object for ``token_ids``; ``first_offset``: the first token's text offset.

    A ``None`` entry (the first prompt token of an echo) has ``null`` logprob and top logprobs.
    ``top_k``: keep only the token itself and alternatives of rank <= ``top_k`` (all when None).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = first_offset
    for tid, by_token in zip(token_ids, logprobs):
        sampled = None if by_token is None else by_token.get(tid)
        text = token_text(tid, sampled, tokenizer)
        tokens.append(text)
        token_logprobs.append(None if sampled is None else _finite(sampled.logprob))
        if by_token is None:
            top_logprobs.append(None)
        else:
            kept = {
                t: lp
                for t, lp in by_token.items()
                if top_k is None or t == tid or (lp.rank is not None and lp.rank <= top_k)
            }
            top_logprobs.append({token_text(t, lp, tokenizer): _finite(lp.logprob) for t, lp in kept.items()})
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def prompt_logprobs_json(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None], tokenizer: Any, top_k: int | None = None
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None or ``{token_id: {"logprob", "rank", "decoded_token"}}``.

    ``top_k``: keep the prompt token itself and the alternatives of rank <= ``top_k`` (all when None).
    """
    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, entry in zip(token_ids, logprobs):
        if entry is None:
            out.append(None)
            continue
        out.append(
            {
                str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": token_text(t, lp, tokenizer)}
                for t, lp in entry.items()
                if top_k is None or t == tid or (lp.rank is not None and lp.rank <= top_k)
            }
        )
    return out


def _chat_entry(token_id: int, logprob: Logprob | None, tokenizer: Any) -> dict[str, Any]:
    text = token_text(token_id, logprob, tokenizer)
    value = _NEG_INF_STAND_IN if logprob is None else _finite(logprob.logprob)
    return {"token": text, "logprob": value, "bytes": token_bytes(token_id, text, tokenizer)}


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
