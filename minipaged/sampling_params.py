"""SamplingParams: how one request is decoded (vLLM-shaped fields and defaults).

``top_k=None`` disables top-k (vLLM uses -1/0 for that; here ``None`` says it and
any integer must be >= 1). ``temperature=0`` means greedy: argmax of the fp32 logits.
Penalties, ``logit_bias``, ``min_tokens`` and ``logprobs`` follow vLLM's semantics
(see ``minipaged.worker.sampler`` for the order they are applied in).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from minipaged.errors import InvalidSamplingParamsError

# Most alternatives ``logprobs`` may ask for (vLLM's default ``max_logprobs``; OpenAI chat allows 20).
MAX_LOGPROBS = 20
# ``torch.Generator.manual_seed`` takes [-2**63, 2**64 - 1]; sample i of a request is seeded with seed + i,
# and negative seeds would alias large positive ones, so seeds live in [0, 2**64 - n].
MAX_SEED = 2**64 - 1
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
PENALTY_LIMIT = 2.0  # OpenAI's range for presence / frequency penalties: [-2, 2]


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidSamplingParamsError(field, f"must be an integer >= {minimum}, got {value!r}")


def _check_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidSamplingParamsError(field, f"must be a number, got {value!r}")
    return float(value)


def _check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidSamplingParamsError(field, f"must be True or False, got {value!r}")


class LogitBias(Mapping[int, float]):
    """An immutable, hashable ``{token_id: bias}`` (keeps ``SamplingParams`` frozen and hashable)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[int, float]) -> None:
        self._items = dict(items)

    def __getitem__(self, token_id: int) -> float:
        return self._items[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"LogitBias({self._items!r})"


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the generated text to a grammar; set exactly one field (vLLM's ``structured_outputs``).

    json: a JSON schema (dict or JSON string) the output must validate against.
    json_object: True for any JSON object.  regex: the output matches this regular expression.
    choice: the output is exactly one of these strings.  grammar: an EBNF grammar (GBNF dialect,
    root rule ``root``).  Whether a schema, regex or grammar compiles is checked when the request
    is added (``InvalidSamplingParamsError`` naming ``structured_outputs.<kind>``).
    """

    json: Any = None
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidSamplingParamsError(
                "structured_outputs", f"set exactly one of {', '.join(STRUCTURED_KINDS)}; got {given or 'none'}"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, Mapping):
                value = json.dumps(value, sort_keys=True)  # a string keeps the dataclass hashable
            if not isinstance(value, str):
                raise InvalidSamplingParamsError(
                    "structured_outputs.json", f"must be a dict or a string, got {value!r}"
                )
            object.__setattr__(self, "json", value)
        elif kind == "json_object":
            _check_bool("structured_outputs.json_object", value)
        elif kind == "choice":
            choices = _as_tuple("structured_outputs.choice", value, str)
            if not choices or any(c == "" for c in choices):
                raise InvalidSamplingParamsError("structured_outputs.choice", "needs non-empty strings")
            object.__setattr__(self, "choice", choices)
        elif not isinstance(value, str) or not value:
            raise InvalidSamplingParamsError(f"structured_outputs.{kind}", f"must be a non-empty string, got {value!r}")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of ``STRUCTURED_KINDS``."""
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """``(kind, spec)``: what a compiled grammar is cached under."""
        value = getattr(self, self.kind)
        return self.kind, json.dumps(list(value)) if self.kind == "choice" else str(value)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request.

    n: parallel samples of the same prompt (they share the prompt's KV blocks).
    temperature: 0 = greedy; > 0 scales the logits.  top_k: None = off, else keep the k best.
    top_p: nucleus mass in (0, 1].  min_p: drop tokens with prob < min_p * max prob, in [0, 1].
    presence_penalty / frequency_penalty: in [-2, 2], subtracted from the logit of every token
        already *generated* (once, resp. once per occurrence); the prompt does not count (OpenAI, vLLM).
    repetition_penalty: > 0, 1 = off; the logit of every token in the prompt or the output is divided
        by it when positive and multiplied by it when negative (vLLM / transformers).
    logit_bias: ``{token_id: bias}``, bias in [-100, 100], added to the logits first (ids >= 0;
        the engine checks them against the vocabulary).
    logprobs: None, or how many most-likely alternatives to return *besides* the sampled token
        (0..MAX_LOGPROBS); log-probabilities of the model's raw logits, before any processing.
    prompt_logprobs: None, or how many most-likely alternatives to return beside each *prompt* token
        (0..MAX_LOGPROBS; the first prompt token has no logprob). Such a request takes no prefix-cache
        hits while its prompt is computed, since every prompt position's logits are needed (as vLLM).
    min_tokens: EOS (unless ``ignore_eos``) and ``stop_token_ids`` are masked until this many tokens
        were generated; the engine also ignores stop strings before then.  0 <= min_tokens <= max_tokens.
    seed: per-request generator seed in [0, 2**64 - n] (sample i uses seed + i; None: drawn from the
        engine seed at submission).
    max_tokens: most generated tokens (>= 1).  stop: strings that end generation (not included in
        the text).  stop_token_ids: extra ids that end generation (included in token_ids).
    ignore_eos: keep generating past the model's EOS.  skip_special_tokens: when detokenising.
    structured_outputs: None, or the grammar the output must follow (``StructuredOutputsParams``);
        the sequence finishes with ``"stop"`` when the grammar is complete and admits nothing more.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if _check_float("temperature", self.temperature) < 0 or math.isinf(self.temperature):
            raise InvalidSamplingParamsError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < _check_float("top_p", self.top_p) <= 1.0:
            raise InvalidSamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= _check_float("min_p", self.min_p) <= 1.0:
            raise InvalidSamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        for field in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_LIMIT <= _check_float(field, getattr(self, field)) <= PENALTY_LIMIT:
                raise InvalidSamplingParamsError(field, f"must be in [-2, 2], got {getattr(self, field)}")
        rp = _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < rp < math.inf:
            raise InvalidSamplingParamsError("repetition_penalty", f"must be a finite number > 0, got {rp}")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None:
                _check_int(field, value, 0)
                if value > MAX_LOGPROBS:
                    raise InvalidSamplingParamsError(
                        field, f"at most {MAX_LOGPROBS} alternatives can be returned, got {value}"
                    )
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed > MAX_SEED - (self.n - 1):
                raise InvalidSamplingParamsError(
                    "seed", f"must be <= 2**64 - n = {MAX_SEED - self.n + 1} (sample i uses seed + i), got {self.seed}"
                )
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        # Normalising to tuples keeps the dataclass hashable and immune to later edits of a caller's list.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, int))
        object.__setattr__(self, "logit_bias", _as_logit_bias(self.logit_bias))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidSamplingParamsError(
                "structured_outputs", f"must be a StructuredOutputsParams, got {self.structured_outputs!r}"
            )
        if any(s == "" for s in self.stop):
            raise InvalidSamplingParamsError("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamsError("stop_token_ids", f"token ids must be >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether any of the presence / frequency / repetition penalties is on."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _as_tuple(field: str, value: object, kind: type) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidSamplingParamsError(field, f"must be a {kind.__name__} or a list of them, got {value!r}")
    items = tuple(value)
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
        raise InvalidSamplingParamsError(field, f"every entry must be a {kind.__name__}, got {value!r}")
    return items


def _as_logit_bias(value: Any) -> LogitBias | None:
    """``None`` for no bias (an empty mapping included), else a validated immutable copy with float values."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidSamplingParamsError("logit_bias", f"must be a dict {{token_id: bias}}, got {value!r}")
    items: dict[int, float] = {}
    for token, bias in value.items():
        # numbers.Integral / Real take numpy scalars too; JSON's string keys are the server's to convert.
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise InvalidSamplingParamsError("logit_bias", f"token ids must be integers >= 0, got {token!r}")
        if (
            isinstance(bias, bool)
            or not isinstance(bias, numbers.Real)
            or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT
        ):
            raise InvalidSamplingParamsError(
                "logit_bias", f"bias of token {token} must be a number in [-100, 100], got {bias!r}"
            )
        items[int(token)] = float(bias)
    return LogitBias(items) if items else None
