"""LLM: the offline, synchronous front end (vLLM's ``LLM``): ``generate``, ``chat``, ``stream``, ``beam_search``.

It drives one ``EngineCore`` (scheduler -> block manager -> worker -> sampler) through its
public interface and turns token ids into text with an ``OutputProcessor``. Every request
has one *owner* that its outputs are delivered to: a ``generate`` call, a ``stream``
iterator, or the manual ``add_request`` / ``step`` loop. Whoever calls the core's
``step()`` delivers every request's news to its owner, so several streams, a ``generate``
and manual requests can be interleaved freely: each output is delivered exactly once, to
the caller that submitted it, and nobody waits for a request that another caller aborted.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from minipaged.core.sequence import SequenceStatus
from minipaged.engine.core import load_engine
from minipaged.engine.inputs import chat_prompts, check_params, check_priority, normalize_batch, parse_prompt
from minipaged.engine.output_processor import OutputProcessor, RequestUpdate
from minipaged.errors import InvalidPromptError, UnknownRequestError
from minipaged.outputs import RequestOutput, StreamChunk
from minipaged.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minipaged.engine.beam_search import BeamSearchOutput, BeamSearchParams


class _Collector:
    """Owner for ``generate``: keeps each request's final output."""

    def __init__(self) -> None:
        self.done: dict[str, RequestOutput] = {}

    def deliver(self, update: RequestUpdate) -> None:
        if update.finished:
            self.done[update.request_id] = update.state.output()


class _StreamBuffer:
    """Owner for ``stream``: text deltas in the order the steps produced them."""

    def __init__(self) -> None:
        self.chunks: deque[StreamChunk] = deque()
        self.finished: set[str] = set()

    def deliver(self, update: RequestUpdate) -> None:
        self.chunks.extend(update.chunks)
        if update.finished:
            self.finished.add(update.request_id)


class _ManualQueue:
    """Owner for ``add_request``: finished outputs wait here until ``step()`` returns them."""

    def __init__(self) -> None:
        self.done: list[RequestOutput] = []

    def deliver(self, update: RequestUpdate) -> None:
        if update.finished and any(c.finish_reason != "abort" for c in update.state.completions.values()):
            self.done.append(update.state.output())


class LLM:
    """A continuous-batching engine over one model.

    ``model``: HF directory, ``.gguf`` file, ``None`` (the embedded SmolLM2-135M-Instruct), or an
    already built ``LoadedModel`` / ``CausalLM`` (tests build tiny ones with ``build_model_from_hf``;
    ``attention_backend`` is then the model's own). ``tokenizer`` overrides the loaded one
    (``None`` with a tokenizer-less model: prompts must be token ids, texts are "").
    Every other keyword is an ``EngineConfig`` field; an unknown keyword is a TypeError.
    """

    def __init__(self, model: Any = None, *, tokenizer: Any = None, **kwargs: Any) -> None:
        self.engine_core, self.tokenizer = load_engine(model, tokenizer, **kwargs)
        self.processor = OutputProcessor(self.tokenizer)
        self._owners: dict[str, Any] = {}
        self._manual = _ManualQueue()
        self._ids = itertools.count()

    # ---- what the core holds, for notebooks and tests -----------------------------------
    @property
    def config(self):
        return self.engine_core.config

    @property
    def model_config(self):
        return self.engine_core.model_config

    @property
    def model(self):
        return self.engine_core.worker.model

    @property
    def block_manager(self):
        return self.engine_core.block_manager

    @property
    def scheduler(self):
        return self.engine_core.scheduler

    @property
    def trace(self):
        return self.engine_core.trace

    @property
    def num_preemptions(self) -> int:
        return self.engine_core.scheduler.num_preemptions

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's worker processes (``tensor_parallel_size > 1``); a no-op in one process.

        Also done when the engine is garbage collected and at interpreter exit; ``with LLM(...) as llm``
        does it on leaving the block.
        """
        self.engine_core.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- submission (all checks before any request is queued) ----------------------------
    def validate(self, prompt: Any, params: Any) -> tuple[str | None, list[int]]:
        """``(text, token ids)`` of a prompt, or the typed error it would raise; queues nothing."""
        params = check_params(params, self.tokenizer)
        text, ids = parse_prompt(prompt, self.tokenizer)
        self.engine_core.check_request(ids, params)
        return text, ids

    def _submit(self, items: list[tuple[Any, Any, Any]], owner: Any, request_ids: list[str] | None = None) -> list[str]:
        checked = [self.validate(prompt, params) for prompt, params, _ in items]
        ids = request_ids if request_ids is not None else [self._fresh_id() for _ in items]
        taken = [rid for rid in ids if self._in_use(rid)]
        if taken or len(set(ids)) != len(ids):
            raise InvalidPromptError("request_id", f"{(taken or ids)[0]!r} is already in use")
        for rid, (text, tokens), (_, params, priority) in zip(ids, checked, items):
            self.engine_core.add_request(rid, tokens, params, priority=priority)
            self.processor.add_request(rid, text, tokens, params, self.engine_core.metrics(rid))
            self._owners[rid] = owner
        return ids

    def _fresh_id(self) -> str:
        while True:  # skip ids a caller chose themselves
            rid = str(next(self._ids))
            if not self._in_use(rid):
                return rid

    def _in_use(self, request_id: str) -> bool:
        """Live, or finished with its output not yet returned by ``step()``."""
        return (
            request_id in self._owners
            or self.engine_core.has_request(request_id)
            or any(out.request_id == request_id for out in self._manual.done)
        )

    def add_request(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        *,
        priority: int = 0,
        request_id: str | None = None,
    ) -> str:
        """Validate and queue one prompt; ``step()`` returns its output once finished. Lower ``priority`` runs first."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        item = [(prompt, params, check_priority(priority))]
        return self._submit(item, self._manual, None if request_id is None else [request_id])[0]

    def abort(self, request_id: str) -> None:
        """Stop a request now and release its blocks (queued, running or mid-prefill).

        A ``stream`` or ``generate`` waiting for it receives it with ``finish_reason="abort"``.
        """
        waiting = [out for out in self._manual.done if out.request_id == request_id]
        if waiting:  # finished, but not returned yet: the caller no longer wants it
            self._manual.done.remove(waiting[0])
            return
        if request_id not in self._owners:
            raise UnknownRequestError(request_id)
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        self.engine_core.abort([request_id])
        update = self.processor.abort(request_id)
        owner = self._owners.pop(request_id, None)
        if update is not None and owner is not None:
            owner.deliver(update)

    def has_unfinished_requests(self) -> bool:
        """True while requests run, or finished ``add_request`` outputs wait for ``step()``."""
        return self.engine_core.has_unfinished() or bool(self._manual.done)

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the ``add_request`` requests that have finished since the last call."""
        if self.engine_core.has_unfinished():
            self._step_once()
        done, self._manual.done = self._manual.done, []
        return done

    def _step_once(self) -> None:
        """One core step, its outputs processed and delivered to their owners."""
        updates, stops = self.processor.process(self.engine_core.step())
        for hit in stops:
            self.engine_core.finish_sequence(hit.request_id, hit.index, SequenceStatus.FINISHED_STOPPED, hit.stop)
        for update in updates:
            owner = self._owners.get(update.request_id)
            if owner is not None:
                owner.deliver(update)
            if update.finished:
                self._owners.pop(update.request_id, None)

    def _drive(self, until) -> None:
        """Step until ``until()``; a step with nothing to do while waiting would be a bug, so say so."""
        while not until():
            if not self.engine_core.has_unfinished():
                raise RuntimeError("waiting for requests the engine no longer holds")
            self._step_once()

    # ---- batch APIs ---------------------------------------------------------------------
    def generate(
        self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True, priority: Any = None
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or ``{"prompt_token_ids": [...]}``); outputs in input order."""
        collector = _Collector()
        ids = self._submit(normalize_batch(prompts, sampling_params, priority), collector)
        bar = _ProgressBar(self.trace, len(ids)) if use_tqdm else None

        def all_done() -> bool:
            if bar is not None:
                bar.update(len(collector.done))
            return len(collector.done) == len(ids)

        try:
            self._drive(all_done)
        except BaseException:
            for rid in ids:  # an interrupted generate must not leave blocks allocated
                if rid not in collector.done:
                    self._abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [collector.done[rid] for rid in ids]

    def stream(self, prompts: Any, sampling_params: Any = None, *, priority: Any = None) -> Iterator[StreamChunk]:
        """Yield new tokens per completion as each step produces them (text deltas, stop strings cut).

        The prompts are validated and queued at once (bad input raises here, not on the first
        ``next``). The joined text of a completion's chunks equals ``generate``'s text. Closing
        the iterator early aborts its unfinished requests; an ``abort`` of one of them ends its
        completions with ``finish_reason="abort"``.
        """
        buffer = _StreamBuffer()
        ids = self._submit(normalize_batch(prompts, sampling_params, priority), buffer)  # bad input raises here
        return self._stream(buffer, ids)

    def _stream(self, buffer: _StreamBuffer, ids: list[str]) -> Iterator[StreamChunk]:
        position = {rid: i for i, rid in enumerate(ids)}
        try:
            while True:
                while buffer.chunks:
                    chunk = buffer.chunks.popleft()
                    yield StreamChunk(
                        chunk.request_id,
                        chunk.index,
                        chunk.token_ids,
                        chunk.text,
                        chunk.finish_reason,
                        position[chunk.request_id],
                    )
                if len(buffer.finished) == len(ids):
                    return
                self._drive(lambda: bool(buffer.chunks) or len(buffer.finished) == len(ids))
        finally:
            for rid in ids:
                if rid not in buffer.finished and rid in self._owners:
                    self._abort(rid)

    def chat(
        self, messages: Any, sampling_params: Any = None, *, use_tqdm: bool = True, add_generation_prompt: bool = True
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (list of {"role","content"}) or a list of them."""
        return self.generate(self.chat_prompts(messages, add_generation_prompt), sampling_params, use_tqdm=use_tqdm)

    def chat_prompts(self, messages: Any, add_generation_prompt: bool = True) -> list[dict[str, Any]]:
        """``{"prompt", "prompt_token_ids"}`` per conversation, through the tokenizer's chat template."""
        return chat_prompts(messages, self.tokenizer, add_generation_prompt)

    def beam_search(self, prompts: Any, params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search over each prompt (vLLM's ``LLM.beam_search``); outputs in input order.

        Every beam is a block-manager sequence: survivors are forked from their parent beam
        (shared blocks, copy-on-write) and pruned beams are freed at once; see
        ``minipaged.engine.beam_search``. Each output holds the best ``beam_width`` hypotheses, best first.
        """
        from minipaged.engine.beam_search import BeamSearchRunner

        if self.engine_core.has_unfinished():
            raise RuntimeError("beam_search runs on an idle engine: finish or abort the pending requests first")
        prompts = [prompt for prompt, _, _ in normalize_batch(prompts, None, None)]
        parsed = [parse_prompt(p, self.tokenizer) for p in prompts]
        return BeamSearchRunner(self.engine_core, self.tokenizer).run(parsed, params)


class _ProgressBar:
    """tqdm over finished prompts, with the prompt/decode token rates of the steps so far."""

    def __init__(self, trace, total: int) -> None:
        from tqdm.auto import tqdm

        self.trace, self.counted = trace, trace.num_steps
        self.prefill = self.decode = 0
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start = time.monotonic()

    def update(self, done: int) -> None:
        for record in self.trace.since(self.counted):
            self.prefill += record.num_prefill_tokens
            self.decode += record.num_decode_tokens
        self.counted = self.trace.num_steps
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"prefill {self.prefill / elapsed:.0f} tok/s, decode {self.decode / elapsed:.0f} tok/s", refresh=False
        )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()
