"""Replay a request trace against one KV memory strategy and measure where the memory goes.

Time advances in decode steps of ``step_time`` seconds. In each step, in this order:

1. requests that have arrived join the FCFS queue (those that could never fit even in an
   empty memory are rejected at once);
2. every running request appends one token (the KV of the token it produced last);
   a request that has reached ``input_len + output_len`` tokens finishes and frees its memory;
   with the paged strategy an append can find no free block: the most recently admitted
   request is then preempted (freed, put back at the head of the queue, recomputed later);
3. waiting requests are admitted from the head of the queue while memory allows (strict
   FCFS: a blocked head blocks everyone behind it); admission stores the prompt's KV;
4. the memory is classified slot by slot (:class:`~minipaged.memsim.allocators.MemoryBreakdown`).

Prefill and recomputation after a preemption are free in time (only memory is modelled).
When nothing is running or waiting the clock jumps to the next arrival; those idle gaps
are reported as ``idle_time`` but carry no memory samples, so every average below is over
*busy* time, weighted by step duration. ``SimResult.series`` keeps the per-step time
series so an engine trace (``BlockStats.utilization`` over time) can be overlaid on it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minipaged.memsim.allocators import MemoryBreakdown, Strategy
from minipaged.memsim.traces import Request, Trace

CATEGORIES = ("token_states", "reservation", "internal", "external", "free")


@dataclass(frozen=True)
class SimConfig:
    """How the replay runs; ``budget`` is the KV memory in token slots."""

    budget: int
    step_time: float = 0.05
    max_running: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 slot, got {self.budget}")
        if not self.step_time > 0:
            raise ValueError(f"step_time must be > 0 s, got {self.step_time}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be None or >= 1, got {self.max_running}")


@dataclass(frozen=True)
class StepSeries:
    """Per-step samples, each an array of shape [num_steps]; slot counts are int64."""

    time: np.ndarray
    duration: np.ndarray
    token_states: np.ndarray
    reservation: np.ndarray
    internal: np.ndarray
    external: np.ndarray
    free: np.ndarray
    running: np.ndarray
    waiting: np.ndarray

    def utilization(self) -> np.ndarray:
        """float64 [num_steps]: token states / allocated slots, 1.0 when nothing is allocated.

        The same quantity as ``BlockStats.utilization`` of the block manager, so an engine
        trace can be overlaid on it.
        """
        allocated = self.token_states + self.reservation + self.internal
        return np.where(allocated > 0, self.token_states / np.maximum(allocated, 1), 1.0)


@dataclass(frozen=True)
class SimResult:
    """What one replay measured."""

    strategy: str
    trace: str
    budget: int
    series: StepSeries
    num_requests: int
    completed: int
    rejected: int
    delayed: int
    preemptions: int
    idle_time: float
    mean_queue_delay: float
    makespan: float

    def breakdown(self, *, saturated_only: bool = False) -> dict[str, float]:
        """Time-averaged fraction of the budget in each category (sums to 1).

        ``saturated_only`` averages only over steps where a request was waiting, i.e.
        where memory (not the arrival rate) limited the batch, as in the paper's Fig. 2.
        """
        s = self.series
        w = s.duration * ((s.waiting > 0) if saturated_only else 1.0)
        if w.sum() == 0:
            return {c: float("nan") for c in CATEGORIES}
        return {c: float(np.sum(getattr(s, c) * w) / (w.sum() * self.budget)) for c in CATEGORIES}

    @property
    def max_running(self) -> int:
        return int(self.series.running.max(initial=0))

    @property
    def mean_running(self) -> float:
        d = self.series.duration
        return float(np.sum(self.series.running * d) / d.sum()) if d.sum() else 0.0

    def summary(self, *, saturated_only: bool = False) -> dict[str, float | int | str]:
        """One flat row for a pandas table."""
        row: dict[str, float | int | str] = {"strategy": self.strategy, "trace": self.trace}
        row.update(self.breakdown(saturated_only=saturated_only))
        row.update(
            max_running=self.max_running,
            mean_running=self.mean_running,
            completed=self.completed,
            rejected=self.rejected,
            delayed=self.delayed,
            preemptions=self.preemptions,
            mean_queue_delay_s=self.mean_queue_delay,
            makespan_s=self.makespan,
        )
        return row


@dataclass
class _Waiting:
    request: Request
    tokens: int  # prompt, plus tokens generated before a preemption (recomputed on readmission)


@dataclass
class _Running:
    request: Request
    tokens: int


@dataclass
class _Recorder:
    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in StepSeries.__dataclass_fields__})

    def add(self, t: float, dt: float, mem: MemoryBreakdown, running: int, waiting: int) -> None:
        c = self.columns
        c["time"].append(t)
        c["duration"].append(dt)
        for name in CATEGORIES:
            c[name].append(getattr(mem, name))
        c["running"].append(running)
        c["waiting"].append(waiting)

    def series(self) -> StepSeries:
        floats = {"time", "duration"}
        return StepSeries(
            **{k: np.asarray(v, dtype=np.float64 if k in floats else np.int64) for k, v in self.columns.items()}
        )


def simulate(trace: Trace, strategy: Strategy, config: SimConfig) -> SimResult:
    """Replay ``trace`` against ``strategy`` (which must manage ``config.budget`` slots)."""
    if strategy.budget != config.budget:
        raise ValueError(f"strategy manages {strategy.budget} slots but config.budget is {config.budget}")
    requests = trace.requests
    queue: deque[_Waiting] = deque()
    running: dict[int, _Running] = {}  # insertion order = admission order
    queued_at: dict[int, float] = {}  # step at which a request first joined the queue
    rec = _Recorder()
    delays: list[float] = []
    step, nxt, rejected, delayed, preemptions, completed, idle = 0, 0, 0, 0, 0, 0, 0.0
    while nxt < len(requests) or queue or running:
        t = step * config.step_time  # from an integer step count: no drift over long traces
        if not queue and not running and requests[nxt].arrival > t:
            idle_steps = int(np.ceil((requests[nxt].arrival - t) / config.step_time))
            step += idle_steps
            idle += idle_steps * config.step_time
            t = step * config.step_time
        while nxt < len(requests) and requests[nxt].arrival <= t:
            req = requests[nxt]
            nxt += 1
            if strategy.fits_ever(req):
                queue.append(_Waiting(req, req.input_len))
                queued_at[req.req_id] = t
            else:
                rejected += 1
        finished, preempted = _decode_step(strategy, running, queue)
        completed += finished
        preemptions += preempted
        admitted = _admit(strategy, running, queue, config.max_running)
        if queue and not running:
            raise RuntimeError(
                f"{strategy.name}: request {queue[0].request.req_id} cannot be admitted into an empty memory "
                f"of {config.budget} slots although fits_ever() accepted it"
            )
        for req in admitted:
            if req.req_id not in queued_at:
                continue  # readmission after a preemption: its first admission was counted
            delayed += t > queued_at.pop(req.req_id)
            delays.append(t - req.arrival)
        head = (queue[0].request, queue[0].tokens) if queue else None
        rec.add(t, config.step_time, strategy.snapshot(head), len(running), len(queue))
        step += 1
    return SimResult(
        strategy=strategy.name,
        trace=trace.name,
        budget=config.budget,
        series=rec.series(),
        num_requests=len(requests),
        completed=completed,
        rejected=rejected,
        delayed=delayed,
        preemptions=preemptions,
        idle_time=idle,
        mean_queue_delay=float(np.mean(delays)) if delays else 0.0,
        makespan=step * config.step_time,
    )


def _decode_step(strategy: Strategy, running: dict[int, _Running], queue: deque[_Waiting]) -> tuple[int, int]:
    """Append one token to every running request; returns (finished, preempted)."""
    finished = preempted = 0
    order = list(running)
    i = 0
    while i < len(order):
        rid = order[i]
        while not strategy.append(rid):
            victim = order.pop()  # the most recently admitted goes first, vLLM's recompute policy
            v = running.pop(victim)
            strategy.release(victim)
            queue.appendleft(_Waiting(v.request, v.tokens))
            preempted += 1
            if victim == rid:
                break
        else:
            live = running[rid]
            live.tokens += 1
            if live.tokens >= live.request.total_len:
                strategy.release(rid)
                del running[rid]
                finished += 1
            i += 1
    return finished, preempted


def _admit(
    strategy: Strategy, running: dict[int, _Running], queue: deque[_Waiting], max_running: int | None
) -> list[Request]:
    admitted = []
    while queue and (max_running is None or len(running) < max_running):
        head = queue[0]
        if not strategy.try_admit(head.request.req_id, head.request, head.tokens):
            break
        queue.popleft()
        running[head.request.req_id] = _Running(head.request, head.tokens)
        admitted.append(head.request)
    return admitted
