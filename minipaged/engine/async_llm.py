"""AsyncLLM: the engine for asyncio servers (vLLM v1's ``AsyncLLM``, in one process).

One background task owns the ``EngineCore``: it applies queued adds and aborts, runs a
step in a worker thread (``asyncio.to_thread``: torch releases the GIL, so the event loop
keeps serving connections meanwhile), and puts each request's cumulative output on that
request's queue. When no request is left it waits on an event, so an idle server uses no
CPU. A request added while a step runs joins the batch at the next step: continuous
batching across HTTP requests.

``generate`` is an async iterator over one request's outputs. Cancelling the task that
consumes it (a client that went away) or closing it aborts the request; its blocks are
freed before the next step. Only the background task touches the core and the output
processor while it runs, so no lock is needed: everything else only appends to the inbox.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from minipaged.core.sequence import SequenceStatus
from minipaged.engine.core import EngineStats, load_engine
from minipaged.engine.inputs import chat_prompts, check_messages, check_params, check_priority, parse_prompt
from minipaged.engine.output_processor import OutputProcessor
from minipaged.errors import EngineDeadError, InvalidPromptError
from minipaged.outputs import RequestOutput
from minipaged.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError"]


_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float


class AsyncLLM:
    """An asyncio front end over one engine core; same constructor arguments as ``LLM``."""

    def __init__(self, model: Any = None, *, tokenizer: Any = None, **kwargs: Any) -> None:
        self.engine_core, self.tokenizer = load_engine(model, tokenizer, **kwargs)
        self.engine_core.cap_max_model_len_to_cache()
        self.processor = OutputProcessor(self.tokenizer)
        self._queues: dict[str, asyncio.Queue] = {}
        self._adds: list[_Add] = []
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        self._stats = self.engine_core.stats()
        self._ids = itertools.count()

    @property
    def config(self):
        return self.engine_core.config

    @property
    def model_name(self) -> str:
        return self.engine_core.model_name

    @property
    def is_running(self) -> bool:
        """False once the engine loop has failed."""
        return self._dead is None

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt: Any, params: Any) -> tuple[str | None, list[int]]:
        """``(text, token ids)`` of a prompt, or the typed error it would raise; queues nothing."""
        params = check_params(params, self.tokenizer)
        text, ids = parse_prompt(prompt, self.tokenizer)
        self.engine_core.check_request(ids, params)
        return text, ids

    def chat_prompt(self, messages: Any, add_generation_prompt: bool = True) -> dict[str, Any]:
        """``{"prompt", "prompt_token_ids"}`` of one conversation through the chat template."""
        return chat_prompts(check_messages(messages), self.tokenizer, add_generation_prompt)[0]

    async def generate(
        self, prompt: Any, params: SamplingParams, request_id: str | None = None, *, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request, one per step that changed it; the last has ``finished=True``.

        Invalid input raises a typed error on the first iteration, before anything is queued.
        """
        self._check_loop()
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped ({type(self._dead).__name__})") from self._dead
        text, ids = self.validate(prompt, params)
        check_priority(priority)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._queues:
            raise InvalidPromptError("request_id", f"{rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._adds.append(_Add(rid, text, ids, params, priority, time.monotonic()))
        self._kick()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not isinstance(item, BaseException) and not queue.empty():
                    item = queue.get_nowait()  # a slow consumer gets the latest cumulative output only
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed ({type(item).__name__})") from item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._aborts.append(rid)
                self._kick()

    async def abort(self, request_id: str) -> None:
        """Abort a request (idempotent; unknown ids are ignored); its ``generate`` ends with ``"abort"``."""
        self._aborts.append(request_id)
        self._kick()

    def abort_all(self) -> None:
        """Abort every request in flight (a bounded shutdown); each ``generate`` ends with ``"abort"``.

        Call from the engine's event loop.
        """
        self._aborts.extend(self._queues)
        if self._queues:
            self._kick()

    def stats(self) -> EngineStats:
        """The queues and KV cache as of the last step (or now, when idle)."""
        return self._stats

    async def shutdown(self) -> None:
        """Stop the engine loop (pending requests are aborted), then the worker processes, if any."""
        self._aborts.extend(self._queues)
        self._stopping = True
        task = self._loop_task
        if task is not None and not task.done():
            self._wakeup.set()
            await asyncio.gather(task, return_exceptions=True)  # the step in flight finishes first
        self._apply_inbox()
        self.engine_core.shutdown()

    # ---- the engine loop ----------------------------------------------------------------
    def _check_loop(self) -> None:
        """One engine loop task serves every caller, so they must share its event loop.

        A caller on another loop would wait on a queue that loop never wakes; refuse instead. Once
        the bound loop's task has ended (its ``asyncio.run`` returned), a new loop may take over.
        """
        task = self._loop_task
        if task is not None and not task.done() and task.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError(
                f"this AsyncLLM is bound to the event loop {task.get_loop()!r}, which is still running its "
                "engine loop; use it from that loop only (or one AsyncLLM per loop)"
            )

    def _kick(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            if self._dead is not None or self._stopping:
                return
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="minipaged-engine")
        self._wakeup.set()

    def _apply_inbox(self) -> None:
        """Adds and aborts that arrived since the last step (only ever called between steps)."""
        core = self.engine_core
        adds, self._adds = self._adds, []
        for add in adds:
            if add.request_id not in self._queues:  # cancelled before it was ever queued
                continue
            core.add_request(
                add.request_id, add.token_ids, add.params, priority=add.priority, arrival_time=add.arrival_time
            )
            self.processor.add_request(
                add.request_id, add.text, add.token_ids, add.params, core.metrics(add.request_id)
            )
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            core.abort([rid])
            update = self.processor.abort(rid)
            queue = self._queues.get(rid)
            if update is not None and queue is not None:
                queue.put_nowait(update.state.output())
        self._stats = core.stats()

    async def _run(self) -> None:
        core = self.engine_core
        try:
            while not self._stopping:
                self._apply_inbox()
                if not core.has_unfinished():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                outputs = await asyncio.to_thread(core.step)
                updates, stops = self.processor.process(outputs)
                for hit in stops:
                    core.finish_sequence(hit.request_id, hit.index, SequenceStatus.FINISHED_STOPPED, hit.stop)
                for update in updates:
                    queue = self._queues.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update.state.output())
                self._stats = core.stats()
        except Exception as exc:  # the engine is unusable: wake every waiter with the cause
            _log.error("the engine loop failed; no request can be served any more", exc_info=exc)
            self._dead = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)  # delivered to the waiters; the task itself ends quietly
