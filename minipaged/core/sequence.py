"""Sequence: the scheduler's unit, one sequence of tokens with its progress.

The engine never tracks "prefill" or "decode" phases; it tracks how many of a
sequence's tokens have their KV in the cache (``num_computed_tokens``), as vLLM v1
does. A step computes tokens ``[num_computed_tokens, num_computed_tokens + k)``; when
that reaches ``num_tokens`` the last position's logits give the next token.

A request (``minipaged.core.request.Request``) with ``n > 1`` samples starts as one
Sequence; once its prompt is computed it forks into ``n`` sequences (``index`` 0..n-1)
that share the prompt's blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from minipaged.outputs import Logprob, RequestMetrics
from minipaged.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued, in the batch, or finished; a finished status's value is its
    ``finish_reason``."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        """Neither waiting nor running."""
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    """One sequence of a request. ``seq_id`` is its key in the block manager: ``(request_id, index)``."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    priority: int
    arrival_order: int  # FCFS tie-break among equal priorities; kept across preemption
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    forked: bool = False  # n > 1: children already created
    stop_reason: int | str | None = None
    # Speculative decoding: proposed continuation, verified (and dropped) by the next step that runs it.
    spec_token_ids: list[int] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs, on sequence 0 only: entry i scores prompt token i (entry 0 is
    # None, nothing precedes it); it grows chunk by chunk until it covers the whole prompt.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def seq_id(self) -> tuple[str, int]:
        """``(request_id, index)``: the sequence's key in the block manager."""
        return (self.request_id, self.index)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list: the prompt followed by the generated tokens (``num_tokens`` ids)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def computing_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet (its prompt must skip the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower runs first: priority, then arrival (FCFS)."""
        return (self.priority, self.arrival_order)

    @property
    def finish_reason(self) -> str | None:
        """``"stop"``, ``"length"`` or ``"abort"`` once finished, else None."""
        return self.status.value if self.status.finished else None
