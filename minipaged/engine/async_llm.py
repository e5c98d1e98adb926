"""AsyncLLM: the engine for asyncio servers (vLLM v1's ``AsyncLLM``, with the core on its own thread).

One engine thread owns the ``EngineCore`` and the output processor. It loops: apply the
adds and aborts queued since the last step, run a step, detokenise, finish the sequences
that hit a stop string, then hand that step's outputs to the event loop in one batch
(one ``call_soon_threadsafe`` per step, however many requests it served). The next step
starts at once: it never waits for the event loop to get a turn, so a busy loop (many
streams to frame and send) does not stretch the gap between steps. torch releases the
GIL inside its kernels, so the event loop keeps serving connections meanwhile. With no
request left the thread waits, without using CPU, up to ``idle_linger_s`` for the next one, then
ends (a one-process engine dropped without ``shutdown`` holds no thread for long); the next request
starts another. A request added while a step runs joins the batch at the next step: continuous
batching across HTTP requests.

The engine is not built on the caller's thread (``_load_off_caller_thread`` says why), so that
the engine thread is the only thread that owns torch's OpenMP workers. A one-process engine is
built on a short-lived loader thread. A tensor- or pipeline-parallel engine is built by its
engine thread, which then stays until ``shutdown``, however long it idles, and stops the ranks
itself: the rank processes live only as long as the thread that spawned them. Such an engine
dropped without ``shutdown`` keeps its thread and ranks until the process exits.

``generate`` is an async iterator over one request's outputs. Cancelling the task that
consumes it (a client that went away) or closing it aborts the request; its blocks are
freed before the next step. The event loop only appends to the inbox (under a lock)
and owns the per-request queues; the engine thread owns everything else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from minipaged.core.sequence import SequenceStatus
from minipaged.distributed import torchrun_rank
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


@dataclass(frozen=True)
class _Abort:
    request_id: str


def _spawns_ranks(kwargs: dict[str, Any]) -> bool:
    """Whether ``load_engine(**kwargs)`` starts tensor- or pipeline-parallel rank processes of its own."""
    sizes = [kwargs.get(name) for name in ("tensor_parallel_size", "pipeline_parallel_size")]
    return torchrun_rank() is None and any(isinstance(size, int) and size > 1 for size in sizes)


def _load_off_caller_thread(model: Any, tokenizer: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``load_engine`` on a thread of its own that has ended by the time this returns.

    torch's OpenMP runtime (libgomp) gives every thread that enters a parallel region a team of
    workers that lives as long as that thread. Once two threads own teams on a host with no more
    cores than their threads, it stops letting idle workers spin and puts them to sleep instead,
    so every parallel region of a step pays a wake-up: a decode step on the engine thread took
    about 1.4x as long with the caller's thread (the server's event loop) holding the team that
    loading the model gave it. Loading on a thread that ends frees that team with it, and the
    engine thread is then the only owner. Re-measure: ``python -m minipaged bench serve`` at rate 1
    against ``bench latency --batch-size 1``, or time ``LLM.generate`` on a thread with and without
    a parallel torch op on the main thread first.

    Under torchrun the engine loads on the caller's thread: a rank's signal handling can be
    installed by the main thread only. (An engine that spawns its ranks is built by its engine
    thread instead: ``AsyncLLM._load_on_engine_thread``.)
    """
    if torchrun_rank() is not None:
        return load_engine(model, tokenizer, **kwargs)
    result: list[Any] = []

    def load() -> None:
        try:
            result.append(load_engine(model, tokenizer, **kwargs))
        except BaseException as exc:  # re-raised on the caller's thread
            result.append(exc)

    # A daemon, so that an interrupted caller can exit while a long load is still in progress.
    loader = threading.Thread(target=load, name="minipaged-load", daemon=True)
    loader.start()
    loader.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


# How long an idle engine thread waits for the next request before it ends. A fresh thread's first
# step costs tens of milliseconds more than the next ones (torch's OpenMP team and the allocator's
# per-thread state start cold), which a server whose requests arrive seconds apart would pay on
# nearly every request; a thread that never ended would keep a dropped one-process engine alive.
IDLE_LINGER_S = 10.0


# What the engine thread hands the event loop after a step: (request id, its cumulative output).
_Delivery = list[tuple[str, RequestOutput]]


class AsyncLLM:
    """An asyncio front end over one engine core; same constructor arguments as ``LLM``."""

    def __init__(self, model: Any = None, *, tokenizer: Any = None, **kwargs: Any) -> None:
        self._queues: dict[str, asyncio.Queue] = {}  # the event loop's only
        self._inbox: list[_Add | _Abort] = []  # in arrival order; guarded by _lock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # an idle engine thread waits on it for work
        self.idle_linger_s = IDLE_LINGER_S
        # The engine thread spawned the rank processes, which end with it: it stays until shutdown.
        self._owns_ranks = _spawns_ranks(kwargs)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered
        self._dead: BaseException | None = None
        self._stopping = False
        self._ids = itertools.count()
        try:
            if self._owns_ranks:
                self.engine_core, self.tokenizer = self._load_on_engine_thread(model, tokenizer, kwargs)
            else:
                self.engine_core, self.tokenizer = _load_off_caller_thread(model, tokenizer, kwargs)
            self.engine_core.cap_max_model_len_to_cache()
            self.processor = OutputProcessor(self.tokenizer)
            self._stats = self.engine_core.stats()
        except BaseException:  # an engine thread that already serves (or will) stops and shuts its engine down
            with self._lock:
                self._stopping = True
                self._wake.notify()
            raise

    @property
    def config(self):
        return self.engine_core.config

    @property
    def model_name(self) -> str:
        return self.engine_core.model_name

    @property
    def is_running(self) -> bool:
        """False once the engine thread has failed."""
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
        self._bind_loop()
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped ({type(self._dead).__name__})") from self._dead
        if self._stopping:
            raise EngineDeadError("the engine has been shut down")
        text, ids = self.validate(prompt, params)
        check_priority(priority)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._queues:
            raise InvalidPromptError("request_id", f"{rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._submit(_Add(rid, text, ids, params, priority, time.monotonic()))
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
                self._submit(_Abort(rid))

    async def abort(self, request_id: str) -> None:
        """Abort a request (idempotent; unknown ids are ignored); its ``generate`` ends with ``"abort"``."""
        self._submit(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every request in flight (a bounded shutdown); each ``generate`` ends with ``"abort"``.

        Call from the engine's event loop.
        """
        if self._queues:
            self._submit(*(_Abort(rid) for rid in self._queues))

    def stats(self) -> EngineStats:
        """The queues and KV cache as of the last step (or now, when idle)."""
        return self._stats

    def bookkeeping(self) -> dict[str, int]:
        """Entries in the tables this engine keeps beside the KV cache, by table name.

        ``request_queues`` (requests with a consumer), ``output_states`` (requests being
        detokenised) and ``grammar_matchers`` (constrained sequences) return to 0 once no request
        is in flight; ``cached_grammars`` and ``trace_steps`` are caches with a bound of their own
        (``max_cached_grammars``, twice ``max_trace_steps``). A leak check reads these.
        """
        core, grammars = self.engine_core, self.engine_core.structured_output
        return {
            "request_queues": len(self._queues),
            "output_states": len(self.processor.states),
            "grammar_matchers": 0 if grammars is None else grammars.num_matchers,
            "cached_grammars": 0 if grammars is None else grammars.num_cached_grammars,
            "trace_steps": len(core.trace),
        }

    async def shutdown(self) -> None:
        """Stop the engine thread (pending requests are aborted), then the worker processes, if any."""
        with self._lock:
            self._inbox.extend(_Abort(rid) for rid in self._queues)
            self._stopping = True
            self._wake.notify()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)  # the step in flight finishes first
        self.engine_core.shutdown()

    # ---- the event loop's side --------------------------------------------------------------
    def _bind_loop(self) -> None:
        """Outputs go to one event loop, so every caller must share it.

        A caller on another loop would wait on a queue that loop never wakes; refuse it while the
        bound loop still has requests in flight. With none in flight a new loop may take over
        (a previous ``asyncio.run`` returned).
        """
        loop = asyncio.get_running_loop()
        bound = self._loop
        if bound is not None and bound is not loop and self._queues and not bound.is_closed():
            raise RuntimeError(
                f"this AsyncLLM is bound to the event loop {bound!r}, which still has requests in flight; "
                "use it from that loop only (or one AsyncLLM per loop)"
            )
        self._loop = loop

    def _submit(self, *ops: _Add | _Abort) -> None:
        """Queue adds / aborts for the engine thread, starting one if none runs."""
        with self._lock:
            if self._stopping or self._dead is not None:
                return
            self._inbox.extend(ops)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, args=(self.engine_core,), name="minipaged-engine", daemon=True
                )
                self._thread.start()
            else:
                self._wake.notify()

    def _deliver(self, delivered: _Delivery) -> None:
        """On the event loop: each output to its request's queue (requests already gone are skipped)."""
        for rid, out in delivered:
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(out)

    def _fail(self, exc: BaseException) -> None:
        """On the event loop: wake every waiter with the engine's failure."""
        for queue in self._queues.values():
            queue.put_nowait(exc)

    # ---- the engine thread -------------------------------------------------------------------
    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Run ``callback(arg)`` on the bound event loop; dropped if that loop has closed (no one listens)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop closed while this thread worked
            pass

    def _load_on_engine_thread(self, model: Any, tokenizer: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Start the engine thread that builds the engine and then serves it until ``shutdown``;
        returns ``(engine core, tokenizer)`` once built, or raises the load's error here."""
        loaded: list[Any] = []
        ready = threading.Event()

        def build_then_serve() -> None:
            try:
                loaded.append(load_engine(model, tokenizer, **kwargs))
            except BaseException as exc:  # re-raised on the caller's thread
                loaded.append(exc)
                return
            finally:
                ready.set()
            self._serve(loaded[0][0])

        self._thread = threading.Thread(target=build_then_serve, name="minipaged-engine", daemon=True)
        self._thread.start()
        ready.wait()  # an interrupt here reaches __init__, which tells the thread to stop once built
        if isinstance(loaded[0], BaseException):
            self._thread = None
            raise loaded[0]
        return loaded[0]

    def _serve(self, core: Any) -> None:
        """The engine thread's loop (see the module docstring); a thread that spawned the ranks shuts
        ``core`` down itself when it ends, before the ranks see it go."""
        try:
            self._serve_until_idle(core)
        finally:
            if self._owns_ranks:
                core.shutdown()

    def _serve_until_idle(self, core: Any) -> None:
        try:
            while True:
                with self._lock:
                    while not self._inbox and not self._stopping and not core.has_unfinished():
                        timed_out = not self._wake.wait(None if self._owns_ranks else self.idle_linger_s)
                        # A request can come between the timeout and taking the lock back: look again.
                        if timed_out and not self._inbox and not self._stopping:
                            self._thread = None  # idle: the next request starts a fresh thread
                            return
                    ops, self._inbox = self._inbox, []
                    stopping = self._stopping
                delivered = self._apply(ops)
                if not stopping and core.has_unfinished():
                    delivered += self._step()
                self._stats = core.stats()
                if delivered:
                    self._post(self._deliver, delivered)
                if stopping:
                    return
        except Exception as exc:  # the engine is unusable: wake every waiter with the cause
            _log.error("the engine loop failed; no request can be served any more", exc_info=exc)
            self._dead = exc
            self._post(self._fail, exc)

    def _apply(self, ops: list[_Add | _Abort]) -> _Delivery:
        """Adds and aborts in arrival order (only ever between steps); returns the aborted requests' outputs."""
        core, delivered = self.engine_core, []
        for op in ops:
            if isinstance(op, _Add):
                core.add_request(
                    op.request_id, op.token_ids, op.params, priority=op.priority, arrival_time=op.arrival_time
                )
                self.processor.add_request(op.request_id, op.text, op.token_ids, op.params, core.metrics(op.request_id))
            else:
                core.abort([op.request_id])
                update = self.processor.abort(op.request_id)
                if update is not None:
                    delivered.append((op.request_id, update.state.output()))
        return delivered

    def _step(self) -> _Delivery:
        """One engine step, detokenised; stop strings finish their sequences before the next step."""
        core = self.engine_core
        updates, stops = self.processor.process(core.step())
        for hit in stops:
            core.finish_sequence(hit.request_id, hit.index, SequenceStatus.FINISHED_STOPPED, hit.stop)
        return [(update.request_id, update.state.output()) for update in updates]
