"""What ``LLM.generate`` returns (vLLM-shaped): RequestOutput > CompletionOutput, plus timings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token at one position (vLLM-shaped).

    ``rank``: 1 for the most likely token under the model's raw logits. ``decoded_token``:
    the token's text, filled in by the output processor (the engine core has no tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos / stop token / stop string), "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # With SamplingParams.logprobs: one dict per generated token, the sampled token and the top-k alternatives.
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (with ``logprobs`` set)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All completions of one prompt, in the order the prompts were given."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class StreamChunk:
    """Tokens produced for one completion since the previous chunk (``LLM.stream``)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # the new text only; stop strings are cut from it
    finish_reason: str | None = None
    prompt_index: int = 0  # position of the prompt in the list given to ``stream``
