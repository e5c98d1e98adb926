"""Tensor-parallel process groups and the few collectives the engine uses, on ``torch.distributed``.

A tensor-parallel engine is ``world_size`` processes, one rank each; rank 0 is the
engine process (scheduler, block manager, sampler) and also runs its own slice of the
model. Two process groups connect them, as in vLLM:

- the **device group** (NCCL on CUDA, gloo on CPU) carries the one all-reduce after each
  row-parallel layer; its timeout is short, so a rank that stops answering mid-step
  turns into an error on the others instead of a hang;
- the **control group** (always gloo, on CPU tensors) carries each step's flat metadata
  from rank 0 to the others, one broadcast per step. Workers wait on it between steps,
  so its timeout is long: an idle engine is not an error. On CUDA this keeps the
  host-side metadata off the GPU stream.

Both are created by ``init_process_groups`` on the default ``torch.distributed`` world,
which is per process: one tensor-parallel engine per process at a time (vLLM has the
same rule). ``destroy_process_groups`` tears it down so another engine can start.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minipaged.errors import InvalidEngineConfigError, MinipagedError

# In-step collectives: a healthy step takes far less; a dead or stuck peer surfaces after this.
DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
# Between steps workers wait for rank 0's next message; an idle server must not time them out.
CONTROL_TIMEOUT_S = 7 * 24 * 3600.0

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: rank 0's TCP key-value store (``MASTER_ADDR``/``MASTER_PORT`` in torchrun's terms).

    ``port`` is ``None`` under torchrun, whose own store the ranks join (``env://``).
    """

    host: str
    port: int | None

    @classmethod
    def for_spawn(cls) -> Rendezvous:
        """``MASTER_ADDR``/``MASTER_PORT`` when set, else this host and a port the store picks (0)."""
        return cls(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0)))

    def open_store(self, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
        """Rank 0 hosts the store (without waiting for the others); the other ranks connect to it."""
        return dist.TCPStore(
            self.host,
            self.port or 0,
            world_size,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )


def announce_ready(store: dist.Store, rank: int) -> None:
    """A spawned rank is up and about to join (rank 0 waits for this before it blocks in the join)."""
    store.set(f"minipaged/ready/{rank}", "1")


def wait_until_ready(store: dist.Store, world_size: int, dead_ranks: Callable[[], list], timeout_s: float) -> None:
    """Rank 0: poll until every other rank announced itself, stopping early if ``dead_ranks()`` names any.

    Joining the process group blocks without a way out until its timeout; checking
    first turns a rank that died while starting (import error, out of memory) into an
    error at once.
    """
    keys = [f"minipaged/ready/{r}" for r in range(1, world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if dead_ranks():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks did not start within {timeout_s:.0f} s")
        time.sleep(0.02)


# ---- ranks started by torchrun, possibly on several machines ------------------------------------------------
class PeerLostError(MinipagedError, RuntimeError):
    """A rank of a torchrun-launched engine never joined, or stopped answering; every rank ends."""


def launched_by_agent() -> bool:
    """torchrun's agent hosts the rendezvous store and is this process's parent (not a hand-set ``RANK`` etc.)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def open_launch_store(rank: int, world_size: int, timeout_s: float) -> tuple[dist.Store, str]:
    """A client of the store at ``MASTER_ADDR:MASTER_PORT`` for the engine's own keys, and that address.

    Under torchrun the agent of node 0 hosts it; with ``RANK``/``WORLD_SIZE``/... set by hand
    rank 0 hosts it, shared (``multi_tenant``) with the process group's ``env://`` join.
    Keys live under this run's id and restart count, so a restarted job never reads the old ones.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0 and not launched_by_agent(),
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        multi_tenant=True,
    )
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"minipaged/{run}", store), f"{host}:{port}"


def _beat_key(rank: int) -> str:
    return f"minipaged/beat/{rank}"


_LEFT = b"left"
_STOP_KEY = "minipaged/stop"  # a rank asking rank 0 to shut the engine down: why


def wait_for_peers(store: dist.Store, rank: int, world_size: int, where: str, timeout_s: float) -> None:
    """Announce ``rank`` and wait until all ``world_size`` ranks have; ``PeerLostError`` naming the missing
    ranks and the rendezvous address after ``timeout_s``.

    Joining the process group would also wait, but only to fail after its own timeout with
    "k/n clients joined"; this names who is missing and where they should have come.
    """
    store.set(_beat_key(rank), "0")
    keys = [_beat_key(r) for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r in range(world_size) if not store.check([_beat_key(r)])]
            raise PeerLostError(
                f"ranks {missing} of {world_size} did not join the rendezvous at {where} within {timeout_s:.0f} s: "
                "start the same torchrun command on every node (--nnodes, its own --node-rank, node 0's "
                "--master-addr and --master-port) and check the missing nodes' logs"
            )
        time.sleep(0.05)


class LivenessWatch:
    """A heartbeat in the rendezvous store, and a watch on every other rank's.

    Across machines a rank can vanish without closing its connections (a node powered off,
    a network cut), and a rank waiting for the next step waits on a receive that never
    times out, because an idle engine is not an error. So every rank bumps its counter in the
    store every ``timeout_s / 10`` and checks the others': a counter that has not moved for
    ``timeout_s``, or a store that cannot be reached (node 0 gone), calls ``on_lost(message)``
    (``exit_process`` for torchrun ranks). A rank that shuts down in order marks itself as
    left, and the others stop watching it.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        where: str,
        timeout_s: float,
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        on_stop: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.rank, self.world_size, self.where = store, rank, world_size, where
        self.timeout_s, self.on_lost, self.clock, self.on_stop = timeout_s, on_lost, clock, on_stop
        self._stop_seen = False
        self._beats = 0
        self._last: dict[int, tuple[bytes, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LivenessWatch:
        """Beat and watch from a daemon thread until ``stop`` or ``leave``."""
        self._thread = threading.Thread(target=self._run, name="minipaged-liveness", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.timeout_s / 10):
            message = self.check()
            if message is not None and not self._stop.is_set():
                self.on_lost(message)
                return
            self.check_stop_request()

    def check_stop_request(self) -> str | None:
        """Once, when another rank asked the engine to stop (``request_stop``): ``on_stop(reason)``, and the reason.

        Only a watch given ``on_stop`` (rank 0's) looks; the watch goes on beating while the engine
        shuts down, since a peer may still die on the way.
        """
        if self.on_stop is None or self._stop_seen:
            return None
        try:
            if not self.store.check([_STOP_KEY]):
                return None
            reason = self.store.get(_STOP_KEY).decode()
        except Exception:  # the store is gone: the next beat reports it
            return None
        self._stop_seen = True
        self.on_stop(reason)
        return reason

    def check(self) -> str | None:
        """One beat and one look at the others: ``None`` while all answer, else what went wrong."""
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            self._beats += 1
            self.store.set(_beat_key(self.rank), str(self._beats))
            values = self.store.multi_get([_beat_key(r) for r in others])
        except Exception as exc:  # the store's connection errors have no common type (DistNetworkError, ...)
            return (
                f"rank {self.rank} lost the rendezvous store at {self.where} (the node hosting it, node 0, "
                f"is gone or unreachable): {exc}"
            )
        now = self.clock()
        for rank, value in zip(others, values):
            if value == _LEFT:
                continue
            previous = self._last.get(rank)
            if previous is None or previous[0] != value:
                self._last[rank] = (value, now)
            elif now - previous[1] > self.timeout_s:
                return (
                    f"rank {rank} of {self.world_size} stopped answering: no heartbeat for {self.timeout_s:.0f} s "
                    f"in the store at {self.where} (its process or node died; see that node's log)"
                )
        return None

    def stop(self) -> None:
        """Stop beating without saying goodbye: the others will see this rank as gone."""
        self._stop.set()

    def leave(self) -> None:
        """An orderly shutdown: mark this rank as left (the others stop watching it), then stop."""
        self.stop()
        try:
            self.store.set(_beat_key(self.rank), _LEFT)
        except Exception:  # the store's node already went: nobody is left to tell
            pass


def exit_process(message: str) -> None:
    """What a torchrun rank does when a peer is lost: say why on stderr and end at once.

    The main thread may be blocked in a receive from the lost peer that no timeout bounds, so
    raising there is not possible; torchrun's agent reports the non-zero exit and stops the
    node's other ranks.
    """
    sys.stderr.write(f"minipaged: {message}; ending this rank\n")
    sys.stderr.flush()
    os._exit(PEER_LOST_EXIT_CODE)


PEER_LOST_EXIT_CODE = 75  # distinct from a Python traceback's 1, so launch scripts can tell the two apart


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def request_stop(store: dist.Store, reason: str) -> None:
    """Ask rank 0 to shut the whole engine down in order (its ``LivenessWatch`` polls for this)."""
    store.set(_STOP_KEY, reason)


def forward_stop_signals(store: dist.Store, rank: int) -> None:
    """A torchrun rank other than 0: turn SIGINT / SIGTERM (Ctrl-C on its node, which torchrun's agent
    passes on) into ``request_stop``, and keep serving until rank 0's shutdown message comes.

    A rank that simply ended would take its stage, or its slice of every layer, with it and fail
    rank 0's engine; asked instead, rank 0 drains and shuts every rank down in order, so each exits 0.
    The main thread sits in a receive that lasts as long as the engine is idle, and Python runs
    signal handlers only there, between bytecodes; so the handlers do nothing and the signal
    number reaches a relay thread through the interpreter's wake-up fd, written at C level.
    Does nothing outside the main thread (a handler can be set there only).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore_signal)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def relay() -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum not in STOP_SIGNALS:
                    continue
                reason = f"rank {rank} got {signal.Signals(signum).name}"
                sys.stderr.write(f"minipaged: {reason}; asking rank 0 to shut the engine down\n")
                sys.stderr.flush()
                try:
                    request_stop(store, reason)
                except Exception:  # the store's node is gone: the liveness watch ends this rank
                    pass

    threading.Thread(target=relay, name="minipaged-stop-relay", daemon=True).start()


def _ignore_signal(signum: int, frame: object) -> None:
    """The Python-level handler of a forwarded stop signal: the relay thread acts on it."""


def interrupt_main_thread(reason: str) -> None:
    """Rank 0's answer to ``request_stop``: the Ctrl-C of this process (the server drains, a script
    gets ``KeyboardInterrupt``), whichever rank's node it was pressed on."""
    sys.stderr.write(f"minipaged: {reason}; shutting the engine down\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGINT)


@dataclass
class CommStats:
    """Wall time this rank spent inside collectives (includes waiting for slower ranks)."""

    all_reduce_s: float = 0.0
    all_reduces: int = 0
    broadcast_s: float = 0.0
    broadcasts: int = 0


@dataclass(frozen=True)
class TensorParallelGroup:
    """One rank's view of the tensor-parallel world: who it is and the groups it talks over.

    Model layers hold this object (not a module global) and call its collectives.
    """

    rank: int
    world_size: int
    device: torch.device
    device_group: dist.ProcessGroup
    control_group: dist.ProcessGroup
    stats: CommStats = field(default_factory=CommStats)

    @property
    def is_driver(self) -> bool:
        """Rank 0: the engine process, the only rank that samples."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over all ranks in place (the row-parallel layers' partial products); returns ``x``."""
        start = time.perf_counter()
        dist.all_reduce(x, group=self.device_group)
        self.stats.all_reduce_s += time.perf_counter() - start
        self.stats.all_reduces += 1
        return x

    def broadcast_control(self, buffer: torch.Tensor) -> None:
        """Rank 0's CPU int64 ``buffer`` into every rank's buffer of the same shape (one step's metadata)."""
        dist.broadcast(buffer, src=0, group=self.control_group)


def device_backend(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_no_running_engine() -> None:
    """``InvalidEngineConfigError`` if this process already joined a tensor-parallel world.

    The process groups are per process, so a second engine would share (and, on failing,
    tear down) the running one's; callers check before they spawn anything.
    """
    if dist.is_initialized():
        raise InvalidEngineConfigError(
            "tensor_parallel_size",
            "another tensor-parallel engine is running in this "
            "process (torch.distributed is initialised); shut it down first",
        )


def init_process_groups(
    rank: int,
    world_size: int,
    device: torch.device,
    store: dist.Store | None,
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> TensorParallelGroup:
    """Join the ``world_size``-rank world as ``rank`` through ``store`` (``None``: torchrun's ``env://``).

    Blocks until all ranks have joined (or ``collective_timeout_s`` passes).
    """
    check_no_running_engine()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    where = dict(init_method="env://") if store is None else dict(store=store)
    dist.init_process_group(device_backend(device), rank=rank, world_size=world_size, timeout=timeout, **where)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    return TensorParallelGroup(rank, world_size, device, dist.group.WORLD, control)


def destroy_process_groups() -> None:
    """Leave the world (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` when this process was started by torchrun (or alike), else ``None``."""
    if all(name in os.environ for name in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def check_tensor_parallel_size(tp_size: int, model_config) -> None:
    """InvalidEngineConfigError naming the first model dimension ``tp_size`` does not divide.

    Ranks split the query heads, the KV heads (the KV cache is split by KV head, never
    within one) and the MLP's intermediate features evenly.
    """
    dims = (
        ("num_attention_heads", model_config.num_heads),
        ("num_key_value_heads", model_config.num_kv_heads),
        ("intermediate_size", model_config.intermediate_size),
    )
    for name, size in dims:
        if size % tp_size:
            raise InvalidEngineConfigError(
                "tensor_parallel_size", f"{tp_size} does not divide the model's {name}={size}; use a divisor of it"
            )


# ---- pipeline parallelism: stages of tensor-parallel groups ------------------------------------------------
@dataclass(frozen=True)
class StageLink:
    """Two groups joining this rank to its peer on a neighbouring stage (or the last stage to rank 0).

    ``control`` (gloo, long timeout) carries CPU messages a rank may wait on while idle: a
    step's header and its packed batch; ``data`` (the device backend, the in-step timeout)
    carries the tensors of the residual stream or the logits.
    """

    peer: int  # the other end's global rank
    control: dist.ProcessGroup
    data: dist.ProcessGroup


@dataclass(frozen=True)
class PipelineGroups:
    """One rank's place in a ``P x T`` world: ``rank = stage * T + tp_rank`` (tensor parallelism innermost).

    ``tp``: this stage's tensor-parallel group (``rank`` in it is ``tp_rank``), ``None`` when
    ``T == 1``; ``prev`` / ``next``: links to the same ``tp_rank`` on the stages before and
    after; ``to_driver``: from the last stage's TP rank 0 to rank 0, which it sends the logits.
    """

    rank: int
    stage: int
    tp_rank: int
    num_stages: int
    tp_size: int
    device: torch.device
    tp: TensorParallelGroup | None
    prev: StageLink | None
    next: StageLink | None
    to_driver: StageLink | None


def pipeline_rank(stage: int, tp_rank: int, tp_size: int) -> int:
    """Global rank of ``tp_rank`` on ``stage`` (tensor-parallel ranks of a stage are consecutive)."""
    return stage * tp_size + tp_rank


def init_pipeline_groups(
    rank: int,
    num_stages: int,
    tp_size: int,
    device: torch.device,
    store: dist.Store | None,
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> PipelineGroups:
    """Join the ``num_stages * tp_size``-rank world as ``rank`` and create every group (see ``PipelineGroups``).

    ``new_group`` is collective over the whole world: every rank creates every group, in
    the same order, and keeps the ones it belongs to.
    """
    check_no_running_engine()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = num_stages * tp_size
    short = datetime.timedelta(seconds=collective_timeout_s)
    long = datetime.timedelta(seconds=CONTROL_TIMEOUT_S)
    where = dict(init_method="env://") if store is None else dict(store=store)
    backend = device_backend(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=short, **where)
    stage, tp_rank = divmod(rank, tp_size)
    tp = None
    for s in range(num_stages):
        ranks = [pipeline_rank(s, t, tp_size) for t in range(tp_size)]
        if tp_size == 1:
            continue
        device_group = dist.new_group(ranks, timeout=short, backend=backend)
        control = dist.new_group(ranks, timeout=long, backend="gloo")
        if s == stage:
            tp = TensorParallelGroup(tp_rank, tp_size, device, device_group, control)

    def link(a: int, b: int) -> StageLink | None:
        control = dist.new_group([a, b], timeout=long, backend="gloo")
        data = dist.new_group([a, b], timeout=short, backend=backend)
        if rank == a:
            return StageLink(b, control, data)
        if rank == b:
            return StageLink(a, control, data)
        return None

    prev = nxt = None
    for s in range(num_stages - 1):
        for t in range(tp_size):
            a, b = pipeline_rank(s, t, tp_size), pipeline_rank(s + 1, t, tp_size)
            joined = link(a, b)
            if rank == a:
                nxt = joined
            elif rank == b:
                prev = joined
    to_driver = link(pipeline_rank(num_stages - 1, 0, tp_size), 0)
    return PipelineGroups(rank, stage, tp_rank, num_stages, tp_size, device, tp, prev, nxt, to_driver)
