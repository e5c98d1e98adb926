"""Request: what a user submitted, a prompt and the sequences it forks into (vLLM's ``Request``).

A request with ``SamplingParams(n=k)`` owns ``k`` sequences (``minipaged.core.sequence``).
Only sequence 0 exists until the prompt is computed; then it forks into ``k`` sequences
that share the prompt's blocks. The request is finished when all ``k`` are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipaged.core.sequence import Sequence
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams


@dataclass
class Request:
    """One submitted prompt and its sequences.

    request_id: the caller's id, unique among live requests.
    prompt_token_ids: the prompt, shared by every sequence.
    params: how to sample; ``params.n`` is the number of sequences.
    priority: lower runs first; arrival_order breaks ties (FCFS).
    metrics: timings shared by all its sequences.
    seqs: its sequences by index (just sequence 0 until the prompt is computed).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_order: int
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """All ``params.n`` sequences exist (the prompt has forked) and every one is finished."""
        return len(self.seqs) == self.params.n and all(s.status.finished for s in self.seqs)
