"""EngineCore: token ids in, token ids out, one step at a time (vLLM v1's ``EngineCore``).

The core owns the scheduler, the block manager and the worker, and nothing that
touches text: it has no tokenizer. Its whole public surface is

- ``check_request`` / ``add_request``: validate then queue token ids with their ``SamplingParams``;
- ``step()``: schedule -> worker -> sampler -> EOS / stop-token / length checks, returning one
  ``CoreOutput`` per sequence that gained a token or finished in this step;
- ``finish_sequence`` / ``abort``: end a sequence or a whole request now, its blocks freed at once
  (stop strings are found by the output processor, which then finishes the sequence here);
- ``stats()`` / ``trace``: what the queues and the KV cache look like.

Front ends (the offline ``LLM``, ``AsyncLLM``, beam search) drive one core through these
methods and never reach into each other. A prompt with ``n > 1`` samples is one ``Request``
here: its first ``Sequence`` computes the prompt, then forks into ``n`` sequences that
share the prompt's blocks (copy-on-write).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from collections import abc
from dataclasses import dataclass
from typing import Any

import torch

from minipaged.config import EngineConfig
from minipaged.core.block_manager import BlockManager, BlockStats
from minipaged.core.request import Request
from minipaged.core.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from minipaged.core.sequence import Sequence, SequenceStatus
from minipaged.engine.trace import StepRecord, Trace
from minipaged.errors import (
    InvalidEngineConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestTooLargeError,
)
from minipaged.outputs import Logprob, RequestMetrics
from minipaged.sampling_params import SamplingParams
from minipaged.spec_decode.controller import DraftController
from minipaged.spec_decode.draft_model import DraftModelProposer, draft_cache_bytes, load_draft_model
from minipaged.spec_decode.ngram import propose_ngram
from minipaged.spec_decode.verifier import split_speculative, verify
from minipaged.structured_output import StructuredOutputManager
from minipaged.worker.executor import build_executor
from minipaged.worker.sampler import sample, token_logprobs
from minipaged.worker.worker import num_kv_blocks_for

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreOutput:
    """What one sequence gained in one step (or how it ended)."""

    request_id: str
    index: int  # completion index, 0..n-1
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None  # one dict per new token, with SamplingParams.logprobs
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # With SamplingParams.prompt_logprobs, on sequence 0's first output: one entry per prompt token
    # (the first None), the prompt token's logprob and the top alternatives.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the queues and the KV cache (what /metrics and notebooks show)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    num_preemptions: int
    prompt_tokens_total: int  # prompt tokens computed, recomputation after preemption included
    generation_tokens_total: int  # tokens sampled
    spec_num_drafts: int = 0  # speculative decoding: verification steps that carried drafts
    spec_num_draft_tokens: int = 0  # draft tokens verified
    spec_num_accepted_tokens: int = 0  # of those, accepted


def _prebuilt_model_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs for an already built model: dtype, device and backend are the model's own.

    Passing a different one is an error rather than a silently ignored setting.
    """
    weight = next(model.parameters())
    own = {"dtype": weight.dtype, "device": weight.device.type, "attention_backend": model.attention_backend.name}
    canonical = {
        "dtype": lambda v: EngineConfig(dtype=v).torch_dtype,
        "device": lambda v: torch.device(v).type,
        "attention_backend": lambda v: v,
    }
    merged = dict(kwargs)
    for name, value in own.items():
        given = kwargs.get(name)
        if given is not None and canonical[name](given) != canonical[name](value):
            raise InvalidEngineConfigError(name, f"{given!r} differs from the prebuilt model's {value!r}")
        merged[name] = value
    return merged


def load_engine(model: Any = None, tokenizer: Any = None, **kwargs: Any) -> tuple[EngineCore, Any]:
    """Build the model named by ``model`` (or take a prebuilt one) and an ``EngineCore`` over it.

    Returns ``(core, tokenizer)``: the tokenizer is the given one, else the model's own (``None``
    for a tokenizer-less model). Every keyword is an ``EngineConfig`` field.
    """
    from minipaged.models import CausalLM, LoadedModel, load_model

    if isinstance(model, CausalLM):
        model = LoadedModel(model=model, tokenizer=tokenizer, config=model.config, name=type(model).__name__)
    if isinstance(model, LoadedModel):
        loaded = model
        config = EngineConfig.from_kwargs(model=loaded.name, **_prebuilt_model_kwargs(loaded.model, kwargs))
    else:
        config = EngineConfig.from_kwargs(model=model, **kwargs)
        if config.pipeline_parallel_size > 1:  # each stage reads its own weights; none loads the whole model
            from minipaged.models.pipeline import load_for_pipeline

            loaded = load_for_pipeline(model, **config.model_kwargs())
        else:
            loaded = load_model(model, **config.model_kwargs())
    tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
    core = EngineCore(loaded.model, loaded.config, config, model_name=loaded.name, tokenizer=tokenizer)
    if tokenizer is not None:
        core.structured_output = StructuredOutputManager(tokenizer, core.vocab_size, core.eos_token_ids)
    return core, tokenizer


class EngineCore:
    """Scheduler + block manager + worker behind add / step / abort (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: Any,
        config: EngineConfig,
        *,
        model_name: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        """``tokenizer``: the target's, only to check a draft model's against (speculative decoding)."""
        self.model_config = model_config
        self.model_name = model_name or config.model or type(model).__name__
        self._check_speculation(config)
        spec = config.speculative_config
        draft = load_draft_model(config, model_config, tokenizer) if spec and spec.method == "draft_model" else None
        self.config = self._resolve(config, None if draft is None else draft.config)
        self.worker = build_executor(model, self.config)
        self.block_manager = BlockManager(
            self.config.num_kv_blocks, self.config.block_size, enable_prefix_caching=self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )
        self.trace = Trace(self.config.max_trace_steps)
        self.eos_token_ids = frozenset(model_config.eos_token_ids or ())
        # Speculative decoding with a draft model: it runs in this process, over the target's block ids.
        self.drafter: DraftModelProposer | None = None
        if draft is not None:
            self.drafter = DraftModelProposer(draft.model, self.config, self.eos_token_ids, self.worker.device)
        # Grammars need the vocabulary's text: load_engine sets this when there is a tokenizer.
        self.structured_output: StructuredOutputManager | None = None
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(self.config.seed)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._spec_totals = [0, 0, 0]  # drafts, draft tokens, accepted tokens
        spec = self.config.speculative_config
        self.draft_control = (
            None
            if spec is None
            else DraftController(spec.backoff_after, spec.backoff_min_steps, spec.backoff_max_steps)
        )
        # Pipeline parallelism keeps up to this many batches in flight (vLLM's batch queue); 1 elsewhere.
        self._batch_queue_depth = self.config.batch_queue_depth if self.config.pipeline_parallel_size > 1 else 1
        self._in_flight: collections.deque = collections.deque()

    @staticmethod
    def _check_speculation(config: EngineConfig) -> None:
        """Refuse a speculative config this engine cannot run, before anything is loaded or started."""
        if config.speculative_config is not None and config.pipeline_parallel_size > 1:
            # A batch in flight on a later stage would hold drafts whose rollback the next batch races.
            raise InvalidEngineConfigError(
                "speculative_config", "is not supported with pipeline_parallel_size > 1; use one of the two"
            )

    def _resolve(self, config: EngineConfig, draft_config: Any = None) -> EngineConfig:
        """A new config with the model-dependent values filled in (the given one is never mutated).

        ``draft_config``: a draft model's ``ModelConfig``, whose KV cache shares the budget.
        """
        model_max = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise InvalidEngineConfigError(
                "max_model_len", f"{config.max_model_len} exceeds the model's max_position_embeddings={model_max}"
            )
        extra, reserved = (0, 0) if draft_config is None else draft_cache_bytes(draft_config, config)
        num_blocks = num_kv_blocks_for(config, self.model_config, extra_bytes_per_block=extra, reserved_bytes=reserved)
        capacity = num_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise InvalidEngineConfigError(
                "max_model_len",
                f"{config.max_model_len} tokens do not fit the KV cache ({num_blocks} blocks of "
                f"{config.block_size} = {capacity} tokens); lower it or give the cache more blocks",
            )
        max_len = config.max_model_len or model_max
        if draft_config is not None and draft_config.max_position_embeddings < max_len:
            raise InvalidEngineConfigError(
                "speculative_config.model",
                f"the draft model's max_position_embeddings={draft_config.max_position_embeddings} is shorter "
                f"than max_model_len={max_len}; lower max_model_len",
            )
        return dataclasses.replace(config, max_model_len=max_len, num_kv_blocks=num_blocks)

    def cap_max_model_len_to_cache(self) -> None:
        """Lower an unset ``max_model_len`` to what one sequence can hold in the KV cache (logged).

        For servers, which advertise ``max_model_len``: what they advertise is then what they enforce.
        The offline engine keeps the model's length and refuses a request that can never fit instead.
        """
        capacity = self.config.num_kv_blocks * self.config.block_size
        if self.config.max_model_len > capacity:
            _log.info(
                "max_model_len capped to %d, the tokens the KV cache holds (the model allows %d)",
                capacity,
                self.config.max_model_len,
            )
            self.config = dataclasses.replace(self.config, max_model_len=capacity)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size: valid token ids are ``[0, vocab_size)``."""
        return self.model_config.vocab_size

    # ---- requests in ------------------------------------------------------------------
    def check_request(self, prompt_token_ids: abc.Sequence[int], params: SamplingParams) -> None:
        """Raise the typed error a request with these token ids and params would hit; no side effect."""
        ids = prompt_token_ids
        if not ids:
            raise InvalidPromptError("prompt", "has no tokens")
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidPromptError(
                "prompt_token_ids", f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}"
            )
        for name, values in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            bad = [t for t in values if t >= vocab]
            if bad:
                raise InvalidPromptError(name, f"token ids must be < the vocabulary size {vocab}, got {bad[:5]}")
        if params.prompt_logprobs is not None and self.config.pipeline_parallel_size > 1:
            raise InvalidSamplingParamsError(
                "prompt_logprobs", "is not supported with pipeline_parallel_size > 1 (only sampled rows travel back)"
            )
        if params.structured_outputs is not None:
            if self.structured_output is None:
                raise InvalidSamplingParamsError("structured_outputs", "needs a tokenizer; this engine has none")
            self.structured_output.check(params.structured_outputs)
        max_len = self.config.max_model_len
        if len(ids) > max_len:
            raise PromptTooLongError("prompt", f"has {len(ids)} tokens, more than max_model_len={max_len}")
        bm = self.block_manager
        if bm.blocks_for(len(ids)) > bm.num_blocks:
            raise RequestTooLargeError(
                "prompt", f"{len(ids)} tokens need more than the KV cache's {bm.num_blocks} blocks"
            )
        slots = self.max_kv_slots(len(ids), params.max_tokens)
        if bm.blocks_for(slots) > bm.num_blocks:
            raise RequestTooLargeError(
                "max_tokens",
                f"prompt + max_tokens need {slots} KV slots in "
                f"{bm.blocks_for(slots)} blocks; the KV cache has {bm.num_blocks}",
            )

    def max_kv_slots(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """KV slots one sequence can ever hold: every token but the last sampled one, which is never fed back.

        A prompt of exactly ``max_model_len`` tokens still samples one token (as vLLM does).
        """
        total = min(num_prompt_tokens + max_tokens, self.config.max_model_len)
        return max(num_prompt_tokens, total - 1)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: abc.Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (after ``check_request``); its sequences join the batch at the next step."""
        if request_id in self._requests:
            raise InvalidPromptError("request_id", f"{request_id!r} is already in use")
        ids = list(prompt_token_ids)
        metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        request = Request(request_id, ids, params, priority, next(self._arrivals), metrics)
        request.seqs.append(self.new_sequence(request, 0))
        if params.structured_outputs is not None and self.structured_output is not None:
            self.structured_output.prepare(params.structured_outputs)
        self._requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def new_sequence(self, request: Request, index: int) -> Sequence:
        """Sequence ``index`` of a request, with its own sampling generator."""
        params = request.params
        # Explicit seeds give sample i the seed seed+i; otherwise the engine's seeded stream decides,
        # so a run is reproducible for a given submission order either way.
        seed = (
            params.seed + index
            if params.seed is not None
            else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        )
        gen = torch.Generator(device=self.worker.device).manual_seed(seed)
        return Sequence(
            request.request_id,
            index,
            list(request.prompt_token_ids),
            params,
            gen,
            request.priority,
            request.arrival_order,
            request.metrics,
            # Sequence 0 computes the prompt; its forks share the blocks and never score it again.
            prompt_logprobs=[None] if params.prompt_logprobs is not None and index == 0 else None,
        )

    def next_arrival(self) -> int:
        """A fresh FCFS arrival number (beam search queues its own sequences)."""
        return next(self._arrivals)

    def has_request(self, request_id: str) -> bool:
        """The id is live: queued or running, not yet finished or aborted."""
        return request_id in self._requests

    def has_unfinished(self) -> bool:
        """Any sequence still waiting or running, or a batch still in flight, so ``step()`` has work."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def metrics(self, request_id: str) -> RequestMetrics:
        """The live request's timings (arrival, first token, finish), shared by its sequences; KeyError if unknown."""
        return self._requests[request_id].metrics

    # ---- requests out -----------------------------------------------------------------
    def finish_sequence(
        self, request_id: str, index: int, status: SequenceStatus, stop_reason: int | str | None = None
    ) -> None:
        """End one sequence now (a stop string found by the output processor); frees its blocks."""
        request = self._requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if seq.index == index and not seq.status.finished:
                seq.stop_reason = stop_reason
                self.scheduler.finish(seq, status)
        self._forget_if_finished(request, time.monotonic())

    def abort(self, request_ids: abc.Iterable[str]) -> list[str]:
        """Stop these requests now and free their blocks; unknown or finished ids are ignored.

        Returns the ids that were actually aborted (idempotent, so a racing abort is harmless).
        """
        aborted = []
        now = time.monotonic()
        for rid in request_ids:
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.status.finished:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
            request.metrics.finished_time = now
            self._release_matchers(request)
            self._forget_drafts(request)
            aborted.append(rid)
        return aborted

    def _forget_if_finished(self, request: Request, now: float) -> None:
        if request.finished and self._requests.get(request.request_id) is request:
            request.metrics.finished_time = now
            del self._requests[request.request_id]
            self._release_matchers(request)
            self._forget_drafts(request)

    def _forget_drafts(self, request: Request) -> None:
        if self.draft_control is not None:
            self.draft_control.forget(s.seq_id for s in request.seqs)

    def _release_matchers(self, request: Request) -> None:
        if self.structured_output is not None and request.params.structured_outputs is not None:
            self.structured_output.release(s.seq_id for s in request.seqs)

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """Run one iteration; one ``CoreOutput`` per sequence that gained a token in it."""
        if self._batch_queue_depth > 1:
            return self._step_with_batch_queue()
        t0 = time.monotonic()
        before = self.block_manager.stats()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
            return []
        logits, sampled = self.execute(sched)
        return self._process_outputs(sched, logits, sampled, before, t0)

    def _step_with_batch_queue(self) -> list[CoreOutput]:
        """One iteration with up to ``max_concurrent_batches`` batches in flight through the pipeline stages.

        While the queue has room, schedule a batch from the sequences not already in flight
        and submit it (returning no outputs, so the next call can submit another); once it is
        full, or nothing else can be scheduled, wait for the oldest batch and sample from it.
        """
        queue = self._in_flight
        if len(queue) < self._batch_queue_depth:
            t0, before = time.monotonic(), self.block_manager.stats()
            sched = self._schedule_idle()
            if not sched.is_empty:
                queue.append((sched, self._submit(sched), before, t0))
                if len(queue) < self._batch_queue_depth:
                    return []
            elif not queue:
                if self.scheduler.has_unfinished():
                    raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
                return []
        sched, handle, before, t0 = queue.popleft()
        logits, sampled = self.worker.collect(handle)
        # A sequence finished while its batch was in flight (an abort, a stop string) gets no token.
        keep = [i for i, s in enumerate(sampled) if not s.seq.status.finished]
        if len(keep) != len(sampled):
            sampled = [sampled[i] for i in keep]
            logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)] if keep else None
        return self._process_outputs(sched, logits, sampled, before, t0)

    def _schedule_idle(self) -> SchedulerOutput:
        """Schedule from the running sequences that are in no in-flight batch (and the waiting ones).

        An in-flight sequence awaits the token its batch will sample, so it can be neither
        scheduled nor preempted (its blocks are being written); hiding it from the scheduler
        for this call does both. ``max_num_seqs`` then bounds each batch, not their sum.
        """
        busy = {id(s.seq) for sched, *_ in self._in_flight for s in sched.scheduled}
        running = self.scheduler.running
        self.scheduler.running = [seq for seq in running if id(seq) not in busy]
        try:
            return self.scheduler.schedule()
        finally:
            self.scheduler.running.extend(seq for seq in running if id(seq) in busy)

    def _submit(self, sched: SchedulerOutput):
        """``execute``'s first half: send the batch into the pipeline and count its tokens as computed.

        Marking them computed before the batch finishes is safe because every stage runs
        batches in submission order: a later batch that reuses these KV blocks (the prefix
        cache) reads them at each stage after this batch wrote them there.
        """
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.metrics.first_scheduled_time is None:
                s.seq.metrics.first_scheduled_time = now
        handle = self.worker.submit(sched.scheduled, sched.block_copies, self.block_manager)
        for s in sched.scheduled:
            s.seq.num_computed_tokens = s.end
            self.block_manager.mark_computed(s.seq.seq_id, s.end)
        self._prompt_tokens_total += sched.num_prefill_tokens
        return handle

    def _process_outputs(
        self,
        sched: SchedulerOutput,
        logits: torch.Tensor | None,
        sampled: list[ScheduledSequence],
        before: BlockStats,
        t0: float,
    ) -> list[CoreOutput]:
        """Sample from a finished batch's logits, append the tokens, check stops, record the step."""
        outputs: list[CoreOutput] = []
        num_sample_rows = sum(s.num_draft_tokens + 1 for s in sampled)
        if logits is not None and logits.shape[0] > num_sample_rows:
            self._score_prompts(sched, logits[num_sample_rows:])
            logits = logits[:num_sample_rows] if sampled else None
        if sampled:
            logits, sampled, spec_logits, speculated = split_speculative(logits, sampled)
            seqs: list[Sequence] = []
            if sampled:
                rows, seqs = self._fork_and_expand(sampled)
                if len(rows) != logits.shape[0]:  # n > 1 forks share their parent's row: copy it out
                    logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
                tokens, logprobs = self._sample(logits, seqs)
                now = time.monotonic()
                for seq, tok, lp in zip(seqs, tokens, logprobs):
                    outputs.append(self._append_tokens(seq, [tok], lp, now))
            if speculated:
                outputs += self._verify(spec_logits, speculated)
                seqs += [s.seq for s in speculated]
            now = time.monotonic()
            for request in {id(self._requests[s.request_id]): self._requests[s.request_id] for s in seqs}.values():
                self._forget_if_finished(request, now)
            self._propose(seqs)
        num_finished = sum(o.finish_reason is not None for o in outputs)
        self.record_step(sched, before, num_finished, time.monotonic() - t0)
        return outputs

    def _score_prompts(self, sched: SchedulerOutput, logits: torch.Tensor) -> None:
        """Extend each scheduled sequence's prompt logprobs by this step's positions.

        logits: ``[num_rows, vocab]`` fp32, the rows of every ``s.prompt_logprob_positions`` in schedule order.
        """
        row = 0
        for s in sched.scheduled:
            positions = s.prompt_logprob_positions
            if not positions:
                continue
            rows = logits[row : row + len(positions)]
            row += len(positions)
            seq = s.seq
            # Position q's logits score the prompt token at q + 1.
            targets = torch.tensor(
                seq.prompt_token_ids[positions.start + 1 : positions.stop + 1], dtype=torch.long, device=rows.device
            )
            seq.prompt_logprobs.extend(token_logprobs(rows, targets, [seq.params.prompt_logprobs] * len(positions)))

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledSequence]]:
        """Run the scheduled tokens through the worker and record them as computed.

        Returns the worker's ``(logits [num_sampled, vocab], sampled sequences)``; shared by
        ``step`` and beam search, which differ only in what they do with the logits.
        """
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.metrics.first_scheduled_time is None:
                s.seq.metrics.first_scheduled_time = now
        logits, sampled = self.worker.execute(sched.scheduled, sched.block_copies, self.block_manager)
        for s in sched.scheduled:
            # Draft tokens count as computed only once verified (``_verify``).
            s.seq.num_computed_tokens = s.verified_end
            self.block_manager.mark_computed(s.seq.seq_id, s.verified_end)
        self._prompt_tokens_total += sched.num_prefill_tokens
        return logits, sampled

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[list[dict[int, Logprob]] | None]]:
        if self.structured_output is not None:
            logits = self.structured_output.apply_bitmask(logits, seqs)
        out = sample(
            logits,
            [q.params for q in seqs],
            [q.generator for q in seqs],
            prompt_token_ids=[q.prompt_token_ids for q in seqs],
            output_token_ids=[q.output_token_ids for q in seqs],
            eos_token_ids=self.eos_token_ids,
        )
        self._generation_tokens_total += len(out.token_ids)
        return out.token_ids, [None if lp is None else [lp] for lp in out.logprobs]

    def _fork_and_expand(self, sampled: list[ScheduledSequence]) -> tuple[list[int], list[Sequence]]:
        """Logit row per sequence to sample; a finished n>1 prompt first forks into its n samples.

        Children beyond ``max_num_seqs`` are not forked: they wait in the queue holding no blocks,
        and the prefix cache gives the prompt's blocks back when they are admitted.
        """
        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, s in enumerate(sampled):
            seq = s.seq
            rows.append(row)
            seqs.append(seq)
            if seq.params.n > 1 and seq.index == 0 and not seq.forked:
                seq.forked = True
                request = self._requests[seq.request_id]
                for index in range(1, seq.params.n):
                    child = self.new_sequence(request, index)
                    child.forked = True
                    child.num_cached_tokens = seq.num_cached_tokens
                    if len(self.scheduler.running) < self.scheduler.max_num_seqs:
                        child.num_computed_tokens = seq.num_computed_tokens
                        self.block_manager.fork(seq.seq_id, child.seq_id)
                        self.scheduler.add_running(child)
                    else:
                        self.scheduler.add(child)
                    request.seqs.append(child)
                    rows.append(row)
                    seqs.append(child)
        return rows, seqs

    def _verify(self, logits: torch.Tensor, speculated: list[ScheduledSequence]) -> list[CoreOutput]:
        """Accept or reject the drafts of ``speculated`` (``logits``: their ``k + 1`` rows each), append the
        kept tokens, and roll each block table back to the tokens whose KV is now valid."""
        seqs, drafts = [s.seq for s in speculated], [s.draft_token_ids for s in speculated]
        draft_probs = None if self.drafter is None else self.drafter.draft_probs(seqs, drafts)
        results = verify(logits, seqs, drafts, self.eos_token_ids, draft_probs=draft_probs)
        now = time.monotonic()
        outputs = []
        for s, r in zip(speculated, results):
            seq = s.seq
            seq.metrics.record_verification(r.num_draft_tokens, r.num_accepted)
            self.draft_control.record(seq.seq_id, r.num_draft_tokens, r.num_accepted)
            for i, n in enumerate((1, r.num_draft_tokens, r.num_accepted)):
                self._spec_totals[i] += n
            self._generation_tokens_total += len(r.token_ids)
            # The accepted drafts' KV was written by this step, at the positions they now hold.
            seq.num_computed_tokens += r.num_accepted
            outputs.append(self._append_tokens(seq, r.token_ids, r.logprobs, now))
            if not seq.status.finished:
                self.block_manager.truncate(seq.seq_id, seq.num_computed_tokens)
                self.block_manager.mark_computed(seq.seq_id, seq.num_computed_tokens)
        return outputs

    def _propose(self, seqs: list[Sequence]) -> None:
        """Give each still-running sequence draft tokens for the next step (speculative decoding): from
        the draft model (all sequences in one batch of forwards) or the n-gram proposer.

        At most as many as could still be emitted before ``max_tokens`` or ``max_model_len``, less the
        one token every step adds anyway, so the drafts never need KV slots the request could not use.
        A sequence under a grammar gets no drafts: verification samples without the grammar's bitmask,
        so it decodes one masked token a step. A sequence whose drafts keep failing pauses
        (``minipaged.spec_decode.controller``). While ``disable_by_batch_size`` or more sequences
        are running, nobody gets drafts (``SpeculativeConfig``).
        """
        spec = self.config.speculative_config
        if spec is None:
            return
        if spec.disable_by_batch_size is not None and len(self.scheduler.running) >= spec.disable_by_batch_size:
            return
        wanted: list[tuple[Sequence, int]] = []
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING or seq.params.structured_outputs is not None:
                continue
            room = min(seq.params.max_tokens - len(seq.output_token_ids), self.config.max_model_len - seq.num_tokens)
            k = min(spec.num_speculative_tokens, room - 1)
            if k >= 1 and self.draft_control.should_propose(seq.seq_id):
                wanted.append((seq, k))
        if self.drafter is not None:
            drafts = self.drafter.propose([seq for seq, _ in wanted], [k for _, k in wanted], self.block_manager)
            for (seq, _), draft in zip(wanted, drafts):
                seq.spec_token_ids = draft
            return
        for seq, k in wanted:
            seq.spec_token_ids = propose_ngram(seq.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs, now: float) -> CoreOutput:
        """Append ``tokens`` in order, stopping at the first that finishes the sequence."""
        # The prompt's logprobs travel once, with the first tokens (the prompt is complete by then).
        prompt_logprobs = list(seq.prompt_logprobs) if seq.prompt_logprobs and not seq.output_token_ids else None
        appended = []
        for token in tokens:
            seq.output_token_ids.append(token)
            appended.append(token)
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            status = self._check_stop(seq, token)
            if status is not None:
                self.scheduler.finish(seq, status)
                break
        if logprobs is not None:
            logprobs = logprobs[: len(appended)]
        return CoreOutput(
            seq.request_id,
            seq.index,
            appended,
            logprobs,
            seq.finish_reason,
            seq.stop_reason,
            seq.num_cached_tokens,
            prompt_logprobs,
        )

    def _check_stop(self, seq: Sequence, token: int) -> SequenceStatus | None:
        """EOS, stop tokens and length; stop strings are the output processor's (it has the tokenizer)."""
        p = seq.params
        if p.structured_outputs is not None and self.structured_output.accept(seq, token):
            return SequenceStatus.FINISHED_STOPPED  # the grammar is complete and admits nothing more
        if len(seq.output_token_ids) >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def shutdown(self) -> None:
        """Release the worker (stops tensor-parallel ranks; nothing to do in one process). Idempotent."""
        self.worker.shutdown()
        if self.structured_output is not None:
            self.structured_output.shutdown()

    # ---- observing ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of queue lengths, KV block usage and token counters."""
        s: BlockStats = self.block_manager.stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=s.num_blocks,
            used_blocks=s.used_blocks,
            cached_blocks=s.cached_blocks,
            free_blocks=s.free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            spec_num_drafts=self._spec_totals[0],
            spec_num_draft_tokens=self._spec_totals[1],
            spec_num_accepted_tokens=self._spec_totals[2],
        )

    def record_step(
        self,
        sched: SchedulerOutput,
        before: BlockStats,
        num_finished: int,
        duration: float,
        extra_held: abc.Sequence[Sequence] = (),
    ) -> None:
        """Append the step's StepRecord; ``extra_held``: sequences holding blocks outside the queues (parked beams)."""
        after = self.block_manager.stats()
        bm = self.block_manager
        held = [r for r in itertools.chain(self.scheduler.running, extra_held) if bm.has_sequence(r.seq_id)]
        self.trace.append(
            StepRecord(
                step=self.trace.num_steps,
                num_scheduled=len(sched.scheduled),
                scheduled=tuple((s.seq.request_id, s.seq.index, s.num_new_tokens) for s in sched.scheduled),
                num_prefill_tokens=sched.num_prefill_tokens,
                num_decode_tokens=sched.num_decode_tokens,
                blocks_allocated=after.total_allocated - before.total_allocated,
                blocks_freed=after.total_freed - before.total_freed,
                blocks_copied=after.total_copied - before.total_copied,
                preemptions=len(sched.preempted),
                num_waiting=len(self.scheduler.waiting),
                num_running=len(self.scheduler.running),
                used_blocks=after.used_blocks,
                free_blocks=after.free_blocks,
                cached_blocks=after.cached_blocks,
                utilization=after.utilization,
                tokens_stored=after.tokens_stored,
                logical_blocks=sum(len(bm.block_table(r.seq_id)) for r in held),
                num_finished=num_finished,
                duration_s=duration,
                num_draft_tokens=sum(s.num_draft_tokens for s in sched.scheduled),
            )
        )
