"""A request is finished only when all ``n`` of its sequences exist and are finished."""

from __future__ import annotations

import torch

from minipaged.core.request import Request
from minipaged.core.sequence import Sequence, SequenceStatus
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams


def _seq(request: Request, index: int) -> Sequence:
    return Sequence(
        request.request_id,
        index,
        list(request.prompt_token_ids),
        request.params,
        torch.Generator(),
        request.priority,
        request.arrival_order,
        request.metrics,
    )


def test_request_finishes_when_every_forked_sequence_has():
    request = Request("r", [1, 2, 3], SamplingParams(n=2, max_tokens=4), 0, 0, RequestMetrics(arrival_time=0.0))
    request.seqs.append(_seq(request, 0))
    request.seqs[0].status = SequenceStatus.FINISHED_LENGTH
    assert not request.finished  # sequence 1 is not forked yet
    request.seqs.append(_seq(request, 1))
    assert not request.finished
    request.seqs[1].status = SequenceStatus.FINISHED_STOPPED
    assert request.finished
    assert request.seqs[1].seq_id == ("r", 1) and request.seqs[1].finish_reason == "stop"
