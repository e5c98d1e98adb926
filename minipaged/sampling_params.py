"""SamplingParams: how one request is decoded (vLLM-shaped fields and defaults).

``top_k=None`` disables top-k (vLLM uses -1/0 for that; here ``None`` says it and
any integer must be >= 1). ``temperature=0`` means greedy: argmax of the fp32 logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from minipaged.errors import InvalidSamplingParamsError


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidSamplingParamsError(field, f"must be an integer >= {minimum}, got {value!r}")


def _check_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidSamplingParamsError(field, f"must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request.

    n: parallel samples of the same prompt (they share the prompt's KV blocks).
    temperature: 0 = greedy; > 0 scales the logits.  top_k: None = off, else keep the k best.
    top_p: nucleus mass in (0, 1].  min_p: drop tokens with prob < min_p * max prob, in [0, 1].
    seed: per-request generator seed (None: drawn from the engine seed at submission).
    max_tokens: most generated tokens (>= 1).  stop: strings that end generation (not included in
    the text).  stop_token_ids: extra ids that end generation (included in token_ids).
    ignore_eos: keep generating past the model's EOS.  skip_special_tokens: when detokenising.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if _check_float("temperature", self.temperature) < 0 or math.isinf(self.temperature):
            raise InvalidSamplingParamsError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < _check_float("top_p", self.top_p) <= 1.0:
            raise InvalidSamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= _check_float("min_p", self.min_p) <= 1.0:
            raise InvalidSamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        # Normalising to tuples keeps the dataclass hashable and immune to later edits of a caller's list.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, int))
        if any(s == "" for s in self.stop):
            raise InvalidSamplingParamsError("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParamsError("stop_token_ids", f"token ids must be >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
