"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Engine state (queues, KV blocks, preemptions, token counters) is read from ``engine.stats()``
at scrape time; latencies are observed by the request handlers as outputs reach them, so
they are what the HTTP layer sees (TTFT includes queueing). Process gauges say whether the
server lets anything pile up: streamed responses still open, asyncio tasks alive on the
server's event loop, and the entries of each engine table
(``minipaged_engine_table_entries{table=...}``) all return to their idle values when no request
is in flight; ``minipaged_heap_in_use_bytes`` is the C heap's bytes in use, which a leak grows
and which, unlike RSS, freed memory the allocator keeps does not. A registry per app, not
prometheus-client's global default, lets several apps live in one process (tests).
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    """Gauges and counters read from one ``engine.stats()`` snapshot per scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        s = self.engine.stats()
        gauges = {
            "minipaged_num_requests_running": ("sequences in the running batch", s.num_running),
            "minipaged_num_requests_waiting": ("sequences queued for a first (or post-preemption) step", s.num_waiting),
            "minipaged_kv_blocks_total": ("KV cache blocks", s.num_blocks),
            "minipaged_kv_blocks_used": ("KV blocks referenced by a live sequence", s.used_blocks),
            "minipaged_kv_blocks_cached": ("free KV blocks still holding a reusable prefix", s.cached_blocks),
            "minipaged_kv_blocks_free": ("allocatable KV blocks (cached ones included)", s.free_blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "minipaged_num_preemptions": ("sequences preempted (recomputed later)", s.num_preemptions),
            "minipaged_prompt_tokens": ("prompt tokens computed (prefix-cache hits excluded)", s.prompt_tokens_total),
            "minipaged_generation_tokens": ("tokens generated", s.generation_tokens_total),
            "minipaged_spec_decode_num_drafts": ("verification steps with drafts", s.spec_num_drafts),
            "minipaged_spec_decode_num_draft_tokens": ("draft tokens verified", s.spec_num_draft_tokens),
            "minipaged_spec_decode_num_accepted_tokens": ("draft tokens accepted", s.spec_num_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33+): the C heap's counters, in bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_reader() -> Any:
    """A function returning the C heap's bytes in use (``malloc`` minus ``free``, mmapped blocks included),
    or None where the C library is not glibc 2.33+.

    RSS also counts memory the allocator got back from ``free`` but keeps for reuse, which moves
    by megabytes with the allocation pattern; bytes in use move only when something is kept.
    """
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError, TypeError):  # no C library by that name, or not glibc 2.33+
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class _ServerCollector(Collector):
    """Open streams, live asyncio tasks and the engine's per-request tables, read at scrape time
    (the scrape runs on the server's loop)."""

    def __init__(self, metrics: ServerMetrics, engine: Any) -> None:
        self.metrics = metrics
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        if self.metrics.heap_in_use is not None:
            yield GaugeMetricFamily(
                "minipaged_heap_in_use_bytes",
                "C heap bytes allocated and not freed (glibc mallinfo2); unlike RSS, not moved by freed memory kept",
                value=self.metrics.heap_in_use(),
            )
        bookkeeping = getattr(self.engine, "bookkeeping", None)
        if bookkeeping is not None:  # an engine without it (a test double) has nothing to report
            tables = GaugeMetricFamily(
                "minipaged_engine_table_entries",
                "entries in the engine's per-request tables and bounded caches, by table",
                labels=["table"],
            )
            for table, size in bookkeeping().items():
                tables.add_metric([table], size)
            yield tables
        yield GaugeMetricFamily(
            "minipaged_open_streams", "streamed responses not yet closed", value=self.metrics.open_streams
        )
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside an event loop (no server running): nothing to count
            return
        yield GaugeMetricFamily(
            "minipaged_asyncio_tasks", "asyncio tasks alive on the server's event loop", value=tasks
        )


class ServerMetrics:
    """The app's registry and the latency histograms the handlers feed."""

    def __init__(self, engine: Any) -> None:
        self.open_streams = 0  # streamed responses started and not yet closed (the app counts them)
        self.heap_in_use = heap_reader()
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.registry.register(_ServerCollector(self, engine))
        self.ttft = Histogram(
            "minipaged_time_to_first_token_seconds",
            "request arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "minipaged_inter_token_latency_seconds",
            "time between successive outputs of one request",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "minipaged_e2e_request_latency_seconds",
            "request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "minipaged_request_finished",
            "finished requests by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "minipaged_client_disconnected",
            "non-streamed requests whose client disconnected before the answer (aborted, not failed)",
            registry=self.registry,
        )
        self.http_errors = Counter(
            "minipaged_request_errors", "requests answered with an error status", ["status"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


@dataclass
class RequestTimer:
    """Latency bookkeeping of one HTTP request (all its prompts and samples together)."""

    metrics: ServerMetrics
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None

    def on_tokens(self) -> None:
        """Call when an output that carries new tokens reaches the handler."""
        now = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.inter_token.observe(now - self.last_token)
        self.last_token = now

    def on_finish(self, finish_reasons: list[str | None]) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for reason in finish_reasons:
            self.metrics.finished.labels(finish_reason=reason or "none").inc()
