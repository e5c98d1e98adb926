"""What ``LLM.generate`` returns (vLLM-shaped): RequestOutput > CompletionOutput, plus timings."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Speculative decoding (all zero without it): verification steps that carried drafts, the draft
    # tokens they carried and how many were accepted, and accepted drafts by position 0..k-1.
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / draft tokens; None before any draft."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per verification step: 1 + accepted drafts / drafts (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def record_verification(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Count one verification step of ``num_draft_tokens`` drafts of which the first ``num_accepted`` held."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position.extend([0] * (num_draft_tokens - len(self.accepted_per_position)))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1


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
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # precedes it), else the prompt token's and the top alternatives' logprobs. None until computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(frozen=True)
class StreamChunk:
    """Tokens produced for one completion since the previous chunk (``LLM.stream``)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # the new text only; stop strings are cut from it
    finish_reason: str | None = None
    prompt_index: int = 0  # position of the prompt in the list given to ``stream``
