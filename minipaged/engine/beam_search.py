"""Beam search on the paged engine: every beam is a sequence in the block manager.

``LLM.beam_search(prompts, BeamSearchParams(beam_width=k, max_tokens=...))`` (vLLM's API).
Each request starts as one sequence; once its prompt is computed, every engine step
decodes all live beams of the request in the same batch, takes the
``log_softmax`` of their logits, and keeps the best ``2k`` (beam, next token)
candidates by cumulative log-probability. The best ``k`` that did not stop become the
next live beams: a parent with several surviving children is ``BlockManager.fork``-ed
(children share all its blocks; the shared, partially filled last block is copied on
write when each child appends), and a parent with none is freed at once, its blocks
back in the pool. So ``k`` beams of a long prompt hold the prompt's KV once.

Finished hypotheses follow transformers' ``generate(num_beams=k, do_sample=False)``:
a candidate that ends in EOS (unless ``ignore_eos``) or reaches ``max_tokens`` is a
finished hypothesis if it ranks among the best ``k`` candidates of its step; its score
is ``cum_logprob / num_generated_tokens ** length_penalty`` and the best ``k`` are kept.
``early_stopping``: ``True`` stops a request as soon as ``k`` hypotheses are finished;
``False`` (default) stops when the best live beam, scored at its current length, can no
longer beat the worst finished one; ``"never"`` scores it at ``max_tokens`` instead
when ``length_penalty > 0`` (the canonical, exhaustive rule).

Beams stay in lockstep under memory pressure: when the scheduler preempts a beam
(recompute), its siblings whose logits are already in wait outside the running queue,
keeping their blocks, until it catches up. If the waiting beams' blocks are what keeps
the others from running, they give their blocks back (their logits are kept) and are
recomputed from their tokens after the next selection, so a request whose single
sequence fits the cache always completes, however few blocks there are; the result is
the same as without preemption. Beams never grow past ``max_model_len``.

Beam search drives the ``EngineCore``'s public scheduler, block manager and ``execute``
itself rather than submitting requests, because its sequences are not independent
requests. (vLLM instead runs beam search outside its core as one-token requests asking
for ``2 * beam_width`` logprobs and relies on prefix caching; here the forks and frees
are the point: they show the PagedAttention paper's sharing argument block by block.)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import abc
from dataclasses import dataclass, field
from typing import Any

import torch

from minipaged.core.sequence import Sequence, SequenceStatus
from minipaged.engine.core import EngineCore
from minipaged.errors import InvalidSamplingParamsError
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """Settings of ``LLM.beam_search``.

    beam_width: live beams per prompt (>= 1), also the number of returned sequences.
    max_tokens: most generated tokens per beam (>= 1).
    length_penalty: finished scores are ``cum_logprob / length ** length_penalty``.
    ignore_eos: keep extending beams past the model's EOS.
    early_stopping: True, False or "never" (see the module docstring).
    """

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSamplingParamsError(name, f"must be an integer >= 1, got {value!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise InvalidSamplingParamsError("length_penalty", f"must be a finite number, got {lp!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingParamsError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidSamplingParamsError(
                "early_stopping", f"must be True, False or 'never', got {self.early_stopping!r}"
            )


@dataclass
class BeamSearchSequence:
    """One finished hypothesis: generated tokens, their summed log-probability and its ranking score."""

    tokens: list[int]
    cum_logprob: float
    score: float  # cum_logprob / len(tokens) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"
    text: str = ""


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` hypotheses of one prompt, best first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]
    metrics: RequestMetrics


@dataclass(frozen=True)
class Candidate:
    """A (beam, next token) extension chosen in one step."""

    parent: int  # index into the live beams of the step
    token: int
    cum_logprob: float
    stopped: str | None  # "stop" / "length" when this extension ends the hypothesis


@dataclass
class BeamState:
    """Transformers-equivalent bookkeeping of one prompt's beam search (no engine state here)."""

    params: BeamSearchParams
    eos_ids: frozenset[int]
    live_scores: list[float] = field(default_factory=lambda: [0.0])
    finished: list[BeamSearchSequence] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    def step(self, logprobs: torch.Tensor, generated: int, histories: abc.Sequence[list[int]]) -> list[Candidate]:
        """Choose the next live beams.

        logprobs: ``[num_live, vocab]`` float32 log-softmax of each live beam's next-token logits;
        ``generated``: tokens each live beam already has; ``histories``: their generated tokens.
        Returns the new live beams (parent index, token), best first; updates ``finished``/``done``.
        """
        p = self.params
        k = p.beam_width
        eos = frozenset() if p.ignore_eos else self.eos_ids
        vocab = logprobs.shape[1]
        acc = logprobs.double() + torch.tensor(self.live_scores, dtype=torch.float64).unsqueeze(1)
        # 2k (more with several EOS ids) candidates so that k live beams remain after some stop.
        keep = min(max(2, 1 + len(eos)) * k, acc.numel())
        scores, flat = torch.topk(acc.flatten().float(), keep)
        length = generated + 1
        candidates = []
        for rank, (score, index) in enumerate(zip(scores.tolist(), flat.tolist())):
            parent, token = divmod(index, vocab)
            stopped = "stop" if token in eos else ("length" if length >= p.max_tokens else None)
            candidates.append((rank, Candidate(parent, token, score, stopped)))
        full = len(self.finished) == k and p.early_stopping is True
        if self.improvable and not full:
            for rank, c in candidates:
                if c.stopped is not None and rank < k:  # only the top k candidates may finish, as in transformers
                    self.finished.append(
                        BeamSearchSequence(
                            histories[c.parent] + [c.token],
                            c.cum_logprob,
                            c.cum_logprob / length**p.length_penalty,
                            c.stopped,
                        )
                    )
            self.finished.sort(key=lambda s: -s.score)
            del self.finished[k:]
        live = [c for _, c in candidates if c.stopped is None][:k]
        self.live_scores = [c.cum_logprob for c in live]
        if live:
            best_len = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else length
            best_possible = live[0].cum_logprob / best_len**p.length_penalty
            worst = self.finished[-1].score if len(self.finished) == k else -math.inf
            self.improvable = self.improvable and best_possible > worst
        all_finished = len(self.finished) == k
        self.done = not live or not self.improvable or (all_finished and p.early_stopping is True)
        return live


@dataclass
class _BeamRequest:
    """One beam search request: its prompt, its live beams and the search over them."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    state: BeamState
    live: list[Sequence]
    metrics: RequestMetrics
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # id(beam) -> logprobs [vocab]
    next_index: itertools.count = field(default_factory=lambda: itertools.count(1))


class BeamSearchRunner:
    """Drives an ``EngineCore``'s scheduler, worker and block manager for beam search requests."""

    def __init__(self, core: EngineCore, tokenizer: Any = None) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.parked: list[Sequence] = []  # beams whose logits are in while a sibling still computes
        self.evicted: list[Sequence] = []  # parked beams that gave their blocks back (logits kept)

    def run(
        self, prompts: abc.Sequence[tuple[str | None, list[int]]], params: BeamSearchParams
    ) -> list[BeamSearchOutput]:
        """Beam search over ``(text, token ids)`` prompts; outputs in input order."""
        core = self.core
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        # Beams are ordinary sequences to the scheduler; these params only size the validation checks.
        seq_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True)
        for _, ids in prompts:
            core.check_request(ids, seq_params)
        requests: dict[str, _BeamRequest] = {}
        order = []
        for text, ids in prompts:
            arrival = core.next_arrival()
            rid = f"beam-{arrival}"
            metrics = RequestMetrics(arrival_time=time.monotonic())
            first = Sequence(rid, 0, list(ids), seq_params, torch.Generator(), 0, arrival, metrics)
            # A beam stops at max_model_len as generate's sequences do (one token at least, as vLLM).
            room = max(1, core.config.max_model_len - len(ids))
            state = BeamState(dataclasses.replace(params, max_tokens=min(params.max_tokens, room)), core.eos_token_ids)
            requests[rid] = _BeamRequest(rid, text, list(ids), state, [first], metrics)
            core.scheduler.add(first)
            order.append(rid)
        results: dict[str, BeamSearchOutput] = {}
        try:
            while len(results) < len(order):
                for r in self._step(requests):
                    results[r.request_id] = self._output(r)
                    del requests[r.request_id]
        except BaseException:
            for r in requests.values():
                self._release(r)
            raise
        return [results[rid] for rid in order]

    def _schedule(self):
        """The next step's schedule; when parked beams' blocks block everything, they give them back."""
        scheduler, bm = self.core.scheduler, self.core.block_manager
        while True:
            sched = scheduler.schedule()
            if not sched.is_empty or not self.parked:
                return sched
            beam = self.parked.pop()
            bm.free(beam.seq_id)
            beam.num_computed_tokens = 0
            self.evicted.append(beam)

    def _step(self, requests: dict[str, _BeamRequest]) -> list[_BeamRequest]:
        core, scheduler = self.core, self.core.scheduler
        t0 = time.monotonic()
        before = core.block_manager.stats()
        sched = self._schedule()
        if sched.is_empty:
            raise RuntimeError("beam search made no progress: the KV cache cannot hold one beam")
        logits, sampled = core.execute(sched)
        touched: list[_BeamRequest] = []
        if sampled:
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, s in enumerate(sampled):
                request = requests[s.seq.request_id]
                request.pending[id(s.seq)] = logprobs[row]
                if request not in touched:
                    touched.append(request)
        done = []
        num_finished = 0
        for request in touched:
            if all(id(b) in request.pending for b in request.live):
                num_finished += self._advance(request)
                if request.state.done:
                    self._release(request)
                    request.metrics.finished_time = time.monotonic()
                    done.append(request)
            else:
                # Lockstep: a beam whose sibling was preempted (or is still in a recompute)
                # waits out of the running queue, keeping its blocks, until the sibling catches up.
                for b in request.live:
                    if id(b) in request.pending and b in scheduler.running:
                        scheduler.running.remove(b)
                        self.parked.append(b)
        core.record_step(sched, before, num_finished, time.monotonic() - t0, extra_held=self.parked)
        return done

    def _advance(self, request: _BeamRequest) -> int:
        """Select the next beams: fork survivors from their parents, free the pruned ones."""
        scheduler, bm = self.core.scheduler, self.core.block_manager
        beams = request.live
        logprobs = torch.stack([request.pending[id(b)] for b in beams])
        request.pending.clear()
        generated = len(beams[0].output_token_ids)
        before = len(request.state.finished)
        chosen = request.state.step(logprobs, generated, [b.output_token_ids for b in beams])
        new_live: list[Sequence] = []
        reused: set[int] = set()
        now = time.monotonic()
        for c in chosen:
            parent = beams[c.parent]
            if c.parent not in reused:
                reused.add(c.parent)
                child = parent
            else:
                child = Sequence(
                    request.request_id,
                    next(request.next_index),
                    parent.prompt_token_ids,
                    parent.params,
                    parent.generator,
                    parent.priority,
                    parent.arrival_order,
                    parent.metrics,
                    output_token_ids=list(parent.output_token_ids),
                    num_computed_tokens=parent.num_computed_tokens,
                    num_cached_tokens=parent.num_cached_tokens,
                )
                if bm.has_sequence(parent.seq_id):
                    # Before the parent's new token reaches the block manager: the child shares every block.
                    bm.fork(parent.seq_id, child.seq_id)
                else:  # the parent gave its blocks back: the child recomputes (the prefix cache helps)
                    child.num_computed_tokens = 0
            new_live.append((child, c.token))
        for i, b in enumerate(beams):
            if i not in reused:
                self._finish(b, SequenceStatus.FINISHED_ABORTED)
        request.live = []
        for child, token in new_live:
            child.output_token_ids.append(token)
            if child.metrics.first_token_time is None:
                child.metrics.first_token_time = now
            if child in self.parked:
                self.parked.remove(child)
            if child in self.evicted:
                self.evicted.remove(child)
            if not bm.has_sequence(child.seq_id):
                scheduler.add(child)  # waits for blocks like any recompute
            elif child not in scheduler.running:
                scheduler.add_running(child)
            request.live.append(child)
        return max(0, len(request.state.finished) - before)

    def _finish(self, beam: Sequence, status: SequenceStatus) -> None:
        if beam in self.parked:
            self.parked.remove(beam)
        if beam in self.evicted:
            self.evicted.remove(beam)
        self.core.scheduler.finish(beam, status)

    def _release(self, request: _BeamRequest) -> None:
        for b in request.live:
            self._finish(b, SequenceStatus.FINISHED_ABORTED)
        request.live = []

    def _output(self, request: _BeamRequest) -> BeamSearchOutput:
        tok = self.tokenizer
        seqs = request.state.finished
        if tok is not None:
            for s in seqs:
                s.text = tok.decode(s.tokens, skip_special_tokens=True)
        return BeamSearchOutput(request.request_id, request.prompt, request.prompt_token_ids, seqs, request.metrics)
