"""LLM: the public, vLLM-shaped entry point (``generate``, ``chat``, ``stream``, ``abort``).

One engine step = scheduler.schedule() -> worker.execute() -> sample -> stop checks.
``add_request`` / ``step`` / ``abort`` expose that loop for notebooks and servers;
``generate`` and ``stream`` drive it until their requests finish.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from minipaged.block_manager import BlockManager
from minipaged.config import EngineConfig
from minipaged.errors import (
    InvalidEngineConfigError, InvalidPromptError, PromptTooLongError, RequestTooLargeError, UnknownRequestError,
)
from minipaged.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamChunk
from minipaged.request import Request, RequestStatus
from minipaged.sampler import sample
from minipaged.sampling_params import SamplingParams
from minipaged.scheduler import Scheduler, SchedulerOutput
from minipaged.trace import StepRecord, Trace
from minipaged.executor import build_executor
from minipaged.worker import num_kv_blocks_for

if TYPE_CHECKING:
    from minipaged.beam_search import BeamSearchOutput, BeamSearchParams


def _check_priority(priority: Any) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidPromptError("priority", f"must be an integer, got {priority!r}")


@dataclass
class _RequestGroup:
    """One user request: a prompt and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.status.finished for s in self.seqs)


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


class LLM:
    """A continuous-batching engine over one model.

    ``model``: HF directory, ``.gguf`` file, ``None`` (the embedded SmolLM2-135M-Instruct), or an
    already built ``LoadedModel`` / ``CausalLM`` (tests build tiny ones with ``build_model_from_hf``;
    ``attention_backend`` is then the model's own). ``tokenizer`` overrides
    the loaded one (``None`` with a tokenizer-less model: prompts must be token ids, texts are "").
    Every other keyword is an ``EngineConfig`` field; an unknown keyword is a TypeError.
    """

    def __init__(self, model: Any = None, *, tokenizer: Any = None, **kwargs: Any) -> None:
        from minipaged.models import CausalLM, LoadedModel, load_model

        if isinstance(model, CausalLM):
            model = LoadedModel(model=model, tokenizer=tokenizer, config=model.config, name=type(model).__name__)
        if isinstance(model, LoadedModel):
            loaded = model
            config = EngineConfig.from_kwargs(model=loaded.name, **_prebuilt_model_kwargs(loaded.model, kwargs))
        else:
            config = EngineConfig.from_kwargs(model=model, **kwargs)
            loaded = load_model(model, dtype=config.torch_dtype, device=config.torch_device,
                                attention_backend=config.attention_backend)
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        self.config = self._resolve(config)
        self.worker = build_executor(self.model, self.config)
        self.block_manager = BlockManager(self.config.num_kv_blocks, self.config.block_size,
                                          enable_prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens)
        self.trace = Trace()
        self._groups: dict[str, _RequestGroup] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(self.config.seed)
        self._eos_ids = frozenset(self.model_config.eos_token_ids or ())
        self._new_tokens: list[tuple[Request, int]] = []  # (sequence, token) sampled in the last step

    def _resolve(self, config: EngineConfig) -> EngineConfig:
        """A new config with the model-dependent values filled in (the given one is never mutated)."""
        model_max = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise InvalidEngineConfigError("max_model_len", f"{config.max_model_len} exceeds the model's "
                                           f"max_position_embeddings={model_max}")
        max_len = config.max_model_len or model_max
        return dataclasses.replace(config, max_model_len=max_len,
                                   num_kv_blocks=num_kv_blocks_for(config, self.model_config))

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---- input checks (all before any work) ------------------------------------------
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidPromptError("prompt", "is empty")
            if self.tokenizer is None:
                raise InvalidPromptError("prompt", "text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidPromptError("prompt_token_ids", "must be a list of ints")
            return prompt.get("prompt"), list(ids)
        raise InvalidPromptError("prompt", f"must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _validate(self, prompt: Any, params: SamplingParams) -> tuple[str | None, list[int]]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise InvalidPromptError("prompt", "has no tokens")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidPromptError("prompt_token_ids", f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        max_len = self.config.max_model_len
        if len(ids) > max_len:
            raise PromptTooLongError("prompt", f"has {len(ids)} tokens, more than max_model_len={max_len}")
        total = min(len(ids) + params.max_tokens, max_len)
        num_blocks = self.block_manager.num_blocks
        if self.block_manager.blocks_for(len(ids)) > num_blocks:
            raise RequestTooLargeError("prompt", f"{len(ids)} tokens need more than the KV cache's {num_blocks} blocks")
        if self.block_manager.blocks_for(total) > num_blocks:
            raise RequestTooLargeError("max_tokens", f"prompt + max_tokens = {total} tokens need "
                                       f"{self.block_manager.blocks_for(total)} blocks; the KV cache has {num_blocks}")
        return text, ids

    # ---- request lifecycle -------------------------------------------------------------
    def add_request(self, prompt: Any, sampling_params: SamplingParams | None = None, *,
                    priority: int = 0, request_id: str | None = None) -> str:
        """Validate and queue one prompt; returns its request id. Lower ``priority`` runs first."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        text, ids = self._validate(prompt, params)
        return self._add_validated(text, ids, params, priority, request_id)

    def _add_validated(self, text: str | None, ids: list[int], params: SamplingParams,
                       priority: int, request_id: str | None) -> str:
        _check_priority(priority)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._groups:
            raise InvalidPromptError("request_id", f"{rid!r} is already in use")
        metrics = RequestMetrics(arrival_time=time.monotonic())
        first = self._new_sequence(rid, 0, ids, params, priority, next(self._arrivals), metrics)
        self._groups[rid] = _RequestGroup(rid, text, ids, params, [first], metrics)
        self.scheduler.add(first)
        return rid

    def _new_sequence(self, rid: str, index: int, ids: list[int], params: SamplingParams,
                      priority: int, arrival: int, metrics: RequestMetrics) -> Request:
        # Explicit seeds give sample i the seed seed+i; otherwise the engine's seeded stream decides,
        # so a run is reproducible for a given submission order either way.
        seed = params.seed + index if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
        gen = torch.Generator(device=self.worker.device).manual_seed(seed)
        return Request(rid, index, list(ids), params, gen, priority, arrival, metrics)

    def abort(self, request_id: str) -> None:
        """Stop a request now and release its blocks (queued, running or mid-prefill)."""
        group = self._groups.get(request_id)
        if group is None:
            raise UnknownRequestError(request_id)
        for seq in group.seqs:
            if not seq.status.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
        group.metrics.finished_time = time.monotonic()
        del self._groups[request_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one engine step -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs of requests that finished in it (the engine forgets them)."""
        t0 = time.monotonic()
        before = self.block_manager.stats()
        sched = self.scheduler.schedule()
        self._new_tokens = []
        finished_groups: list[_RequestGroup] = []
        if sched.is_empty:
            if self.scheduler.running or self.scheduler.waiting:
                raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
            return []
        logits, sampled = self._execute(sched)
        num_finished = 0
        if sampled:
            rows, seqs = self._fork_and_expand(sampled)
            if len(rows) != logits.shape[0]:  # n > 1 forks share their parent's row: copy it out
                logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
            tokens = sample(logits, [q.params for q in seqs], [q.generator for q in seqs])
            now = time.monotonic()
            for seq, tok in zip(seqs, tokens):
                self._append_token(seq, tok, now)
                if seq.status.finished:
                    num_finished += 1
                    group = self._groups[seq.request_id]
                    if group.finished and group not in finished_groups:
                        group.metrics.finished_time = now
                        finished_groups.append(group)
        self._record(sched, before, num_finished, time.monotonic() - t0)
        for g in finished_groups:
            del self._groups[g.request_id]
        return [self._output(g) for g in finished_groups]

    def _execute(self, sched: SchedulerOutput):
        """Run the scheduled tokens through the worker and record them as computed.

        Returns the worker's ``(logits [num_sampled, vocab], sampled requests)``; shared by
        ``step`` and beam search, which differ only in what they do with the logits.
        """
        now = time.monotonic()
        for s in sched.scheduled:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        logits, sampled = self.worker.execute(sched.scheduled, sched.block_copies, self.block_manager)
        for s in sched.scheduled:
            s.request.num_computed_tokens = s.end
            self.block_manager.mark_computed(s.request.seq_id, s.end)
        return logits, sampled

    def _fork_and_expand(self, sampled) -> tuple[list[int], list[Request]]:
        """Logit row per sequence to sample; a finished n>1 prompt first forks into its n samples."""
        rows: list[int] = []
        seqs: list[Request] = []
        for row, s in enumerate(sampled):
            req = s.request
            rows.append(row)
            seqs.append(req)
            if req.params.n > 1 and req.index == 0 and not req.forked:
                req.forked = True
                group = self._groups[req.request_id]
                for index in range(1, req.params.n):
                    child = self._new_sequence(req.request_id, index, req.prompt_token_ids, req.params,
                                               req.priority, req.arrival_order, group.metrics)
                    child.num_computed_tokens = req.num_computed_tokens
                    child.forked = True
                    child.num_cached_tokens = req.num_cached_tokens
                    self.block_manager.fork(req.seq_id, child.seq_id)
                    self.scheduler.add_running(child)
                    group.seqs.append(child)
                    rows.append(row)
                    seqs.append(child)
        return rows, seqs

    def _append_token(self, seq: Request, token: int, now: float) -> None:
        seq.output_token_ids.append(token)
        self._new_tokens.append((seq, token))
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        status = self._check_stop(seq, token)
        if status is not None:
            self.scheduler.finish(seq, status)

    def _check_stop(self, seq: Request, token: int) -> RequestStatus | None:
        p = seq.params
        if token in self._eos_ids and not p.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            # Only the tail can hold a newly completed stop string.
            search_from = max(0, len(seq.text) - max(len(s) for s in p.stop))
            hits = [(text.find(s, search_from), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            seq.text = text
            if hits:
                cut, stop = min(hits)
                seq.text = text[:cut]
                seq.stop_reason = stop
                return RequestStatus.FINISHED_STOPPED
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _record(self, sched: SchedulerOutput, before, num_finished: int, duration: float,
                extra_held: Sequence[Request] = ()) -> None:
        """Append the step's StepRecord; ``extra_held``: sequences holding blocks outside the queues (parked beams)."""
        after = self.block_manager.stats()
        bm = self.block_manager
        held = [r for r in itertools.chain(self.scheduler.running, extra_held) if bm.has_sequence(r.seq_id)]
        self.trace.append(StepRecord(
            step=len(self.trace),
            num_scheduled=len(sched.scheduled),
            scheduled=tuple((s.request.request_id, s.request.index, s.num_new_tokens) for s in sched.scheduled),
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
        ))

    # ---- outputs ---------------------------------------------------------------------
    def _text(self, seq: Request) -> str:
        if self.tokenizer is None:
            return ""
        if seq.stop_reason is not None and isinstance(seq.stop_reason, str):
            return seq.text  # already cut at the stop string
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _output(self, group: _RequestGroup) -> RequestOutput:
        completions = [
            CompletionOutput(index=s.index, text=self._text(s), token_ids=list(s.output_token_ids),
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for s in sorted(group.seqs, key=lambda s: s.index)
        ]
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=list(group.prompt_token_ids), outputs=completions,
                             finished=group.finished, metrics=group.metrics,
                             num_cached_tokens=group.seqs[0].num_cached_tokens)

    # ---- batch APIs ------------------------------------------------------------------
    def _add_batch(self, prompts: Any, sampling_params: Any, priority: Any) -> list[str]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidPromptError("sampling_params", f"has {len(params)} entries for {len(prompts)} prompts")
        if priority is None or isinstance(priority, int):
            priorities = [priority or 0] * len(prompts)
        else:
            priorities = list(priority)
            if len(priorities) != len(prompts):
                raise InvalidPromptError("priority", f"has {len(priorities)} entries for {len(prompts)} prompts")
        for pri in priorities:
            _check_priority(pri)
        # Validate everything first: one bad prompt must not leave the others half-submitted.
        checked = [self._validate(pr, sp) for pr, sp in zip(prompts, params)]
        return [self._add_validated(t, ids, sp, pri, None) for (t, ids), sp, pri in zip(checked, params, priorities)]

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True,
                 priority: Any = None) -> list[RequestOutput]:
        """Generate for each prompt (a string or ``{"prompt_token_ids": [...]}``); outputs in input order."""
        ids = self._add_batch(prompts, sampling_params, priority)
        results = self._run(ids, use_tqdm)
        return [results[rid] for rid in ids]

    def beam_search(self, prompts: Any, params: "BeamSearchParams") -> list["BeamSearchOutput"]:
        """Beam search over each prompt (vLLM's ``LLM.beam_search``); outputs in input order.

        Every beam is a block-manager sequence: survivors are forked from their parent beam
        (shared blocks, copy-on-write) and pruned beams are freed at once; see
        ``minipaged.beam_search``. Each output holds the best ``beam_width`` hypotheses, best first.
        """
        from minipaged.beam_search import BeamSearchRunner

        return BeamSearchRunner(self).run(prompts, params)

    def chat(self, messages: Any, sampling_params: Any = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (list of {"role","content"}) or a list of them."""
        return self.generate(self.chat_prompts(messages, add_generation_prompt), sampling_params, use_tqdm=use_tqdm)

    def chat_prompts(self, messages: Any, add_generation_prompt: bool = True) -> list[dict[str, Any]]:
        if self.tokenizer is None:
            raise InvalidPromptError("messages", "chat needs a tokenizer with a chat template")
        if not messages:
            raise InvalidPromptError("messages", "is empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        out = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
            # The template already holds any BOS it wants; do not let encode add another.
            out.append({"prompt": text, "prompt_token_ids": list(self.tokenizer.encode(text, add_special_tokens=False))})
        return out

    def stream(self, prompts: Any, sampling_params: Any = None, *, priority: Any = None) -> Iterator[StreamChunk]:
        """Yield new tokens per completion as each step produces them (text deltas, stop strings cut).

        Closing the iterator early aborts its unfinished requests.
        """
        ids = self._add_batch(prompts, sampling_params, priority)
        position = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        emitted: dict[tuple[str, int], str] = {}
        try:
            while pending:
                pending.difference_update(o.request_id for o in self.step())
                for seq, tok in self._new_tokens:
                    if seq.request_id not in position:
                        continue
                    text = self._text(seq)
                    prev = emitted.get(seq.seq_id, "")
                    # Hold back a trailing partial UTF-8 character until the next token completes it.
                    if text.endswith("\ufffd") and not seq.status.finished:
                        delta = ""
                    else:
                        delta, emitted[seq.seq_id] = text[len(prev):], text
                    yield StreamChunk(seq.request_id, seq.index, [tok], delta, seq.finish_reason, position[seq.request_id])
        finally:
            for rid in pending:
                self.abort(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        start = time.monotonic()
        prefill_tokens = decode_tokens = 0
        try:
            while pending:
                for out in self.step():
                    results[out.request_id] = out
                    pending.discard(out.request_id)
                if bar is not None:
                    prefill_tokens += self.trace[-1].num_prefill_tokens
                    decode_tokens += self.trace[-1].num_decode_tokens
                    elapsed = max(time.monotonic() - start, 1e-9)
                    bar.set_postfix_str(f"prefill {prefill_tokens / elapsed:.0f} tok/s, "
                                        f"decode {decode_tokens / elapsed:.0f} tok/s", refresh=False)
                    bar.update(len(ids) - len(pending) - bar.n)
        except BaseException:
            for rid in pending:  # an interrupted generate must not leave blocks allocated
                if rid in self._groups:
                    self.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results
