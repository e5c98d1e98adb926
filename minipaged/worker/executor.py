"""Executors: what the engine calls to run a step, in one process or over tensor-parallel ranks.

``build_executor(model, config)`` returns

- with ``tensor_parallel_size == 1``: the plain ``Worker`` (nothing else is started, no
  collective is ever called: a single process pays nothing for tensor parallelism);
- with ``N > 1``: a ``TensorParallelExecutor``. The engine process is rank 0: it keeps
  the scheduler, block manager and sampler, and runs its own slice of the model. It
  spawns ranks ``1..N-1`` (``torch.multiprocessing``, "spawn"), each of which builds its
  slice of the model and its slice of the KV cache and then loops: receive a step,
  run the forward (joining the all-reduces), wait for the next one.

One step on rank 0: pack the scheduled batch (token ids, lengths, block tables,
copy-on-write copies, sampled rows) into one int64 tensor, broadcast it, run the
forward; only rank 0 computes logits. The others never see a sequence object.

Both executors answer ``execute(scheduled, copies, bm) -> (logits | None, sampled)`` and
``shutdown()``. The tensor-parallel one also tears its processes down when garbage
collected or at interpreter exit, and turns a rank that dies mid-run into a
``WorkerDiedError`` (the collectives fail when a peer's connection drops, and time out
after ``collective_timeout_s`` if it hangs) instead of a hang.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, with
``WORLD_SIZE == tensor_parallel_size``) nothing is spawned: every process runs the same
script, rank 0's ``LLM(...)`` becomes the engine, and on every other rank ``LLM(...)``
serves rank 0's steps until it shuts down, then exits the process. With no child processes
to poll there, every rank beats a heartbeat in torchrun's store and watches the others'
(``minipaged.distributed.LivenessWatch``), so a rank or node that vanishes ends the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from minipaged.config import EngineConfig
from minipaged.core.block_manager import BlockCopy, BlockManager
from minipaged.core.scheduler import ScheduledSequence
from minipaged.distributed import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    LivenessWatch,
    Rendezvous,
    TensorParallelGroup,
    announce_ready,
    check_no_running_engine,
    check_tensor_parallel_size,
    destroy_process_groups,
    exit_process,
    forward_stop_signals,
    init_process_groups,
    interrupt_main_thread,
    launched_by_agent,
    open_launch_store,
    torchrun_rank,
    wait_for_peers,
    wait_until_ready,
)
from minipaged.errors import InvalidEngineConfigError, MinipagedError
from minipaged.models.quantization.layers import check_tensor_parallel_split
from minipaged.worker.worker import StepBatch, Worker


class WorkerDiedError(MinipagedError, RuntimeError):
    """A tensor-parallel rank died or stopped answering; the engine cannot continue."""


# ---- the per-step channel (rank 0 -> every rank) --------------------------------------------------------
_STEP, _SHUTDOWN, _GROW = 1, 2, 3
# Exit status of a spawned rank that re-imported a script without a ``__main__`` guard; rank 0 explains it.
_NO_MAIN_GUARD_EXIT = 3
_NO_MAIN_GUARD = (
    "starts one process per rank, and each re-imports your script: put the code that builds "
    "the engine under 'if __name__ == \"__main__\":'"
)
_HEADER = 3  # tag, payload length, new capacity (for _GROW)


class StepChannel:
    """Rank 0 sends each step's packed ``StepBatch`` to all ranks in one broadcast.

    Every rank keeps a buffer of the same capacity, so a receiver knows how much to
    receive before it knows the step: ``[tag, length, capacity, payload..., unused]``. A
    step that does not fit first sends a ``_GROW`` message (both sides double the buffer
    until it fits), so a long run settles at one broadcast per step.
    """

    def __init__(self, tp: TensorParallelGroup, capacity: int = 4096) -> None:
        self.tp = tp
        self.buffer = torch.zeros(capacity, dtype=torch.int64)

    def _broadcast(self) -> None:
        start = time.perf_counter()
        self.tp.broadcast_control(self.buffer)
        self.tp.stats.broadcast_s += time.perf_counter() - start
        self.tp.stats.broadcasts += 1

    def send(self, batch: StepBatch | None) -> None:
        """Rank 0: broadcast ``batch`` (``None``: tell the workers to shut down)."""
        if batch is None:
            self.buffer[:_HEADER] = torch.tensor([_SHUTDOWN, 0, 0])
            self._broadcast()
            return
        payload = batch.pack()
        needed = _HEADER + payload.numel()
        if needed > self.buffer.numel():
            capacity = self.buffer.numel()
            while capacity < needed:
                capacity *= 2
            self.buffer[:_HEADER] = torch.tensor([_GROW, 0, capacity])
            self._broadcast()
            self.buffer = torch.zeros(capacity, dtype=torch.int64)
        self.buffer[:_HEADER] = torch.tensor([_STEP, payload.numel(), 0])
        self.buffer[_HEADER:needed] = payload
        self._broadcast()

    def receive(self) -> StepBatch | None:
        """Ranks > 0: the next step's batch, or ``None`` when rank 0 shuts down."""
        while True:
            self._broadcast()
            tag, length, capacity = self.buffer[:_HEADER].tolist()
            if tag == _STEP:
                return StepBatch.unpack(self.buffer[_HEADER : _HEADER + length])
            if tag == _SHUTDOWN:
                return None
            if tag != _GROW:
                raise RuntimeError(f"unknown step-channel message tag {tag}")
            self.buffer = torch.zeros(capacity, dtype=torch.int64)


# ---- the worker processes ---------------------------------------------------------------------------------
@dataclass
class _RankSpec:
    """What a spawned rank needs to build its slice of the engine (pickled to it by ``spawn``)."""

    config: EngineConfig
    model_config: Any
    attention_backend: str
    full_state: dict[str, torch.Tensor]  # CPU; sent through shared memory, read once
    rendezvous: Rendezvous | None  # rank 0's store; None under torchrun (env://)
    collective_timeout_s: float
    num_threads: int
    device_offset: int = 0  # rank r runs on cuda:(device_offset + r)


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors as plain CPU tensors, ready to pickle to the spawned ranks.

    A model that a single-process CPU engine already ran holds oneDNN-packed weights
    (``pack_in_place``), which have no storage to share; ``to_dense`` recovers them exactly.
    """
    return {name: (t.to_dense() if t.is_mkldnn else t).detach().cpu() for name, t in model.state_dict().items()}


def rank_device(config: EngineConfig, rank: int, device_offset: int = 0) -> torch.device:
    """Rank ``r``'s device: ``cuda:(offset + r)`` on CUDA (one GPU per rank), else the CPU."""
    if config.torch_device.type == "cuda":
        return torch.device("cuda", device_offset + rank)
    return torch.device("cpu")


def _build_rank(
    spec: _RankSpec, rank: int, store: torch.distributed.Store | None
) -> tuple[TensorParallelGroup, Worker]:
    """Join the world as ``rank`` and build this rank's model slice and KV-cache slice."""
    from minipaged.models.loader import build_sharded_model

    device = rank_device(spec.config, rank, spec.device_offset)
    tp = init_process_groups(rank, spec.config.tensor_parallel_size, device, store, spec.collective_timeout_s)
    model = build_sharded_model(
        spec.model_config,
        spec.full_state,
        tp,
        dtype=spec.config.torch_dtype,
        device=device,
        attention_backend=spec.attention_backend,
    )
    spec.full_state = {}  # release the shared full weights: this rank keeps its slice only
    return tp, Worker(model, spec.config, spec.config.num_kv_blocks, device=device)


def _exit_when_parent_dies() -> None:
    # A SIGKILLed engine leaves no one to shut its ranks down; they notice being re-parented.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="minipaged-parent-watch", daemon=True).start()


def serve_steps(tp: TensorParallelGroup, worker: Worker) -> None:
    """Ranks > 0: run every step rank 0 broadcasts until it says to shut down."""
    channel = StepChannel(tp)
    while (batch := channel.receive()) is not None:
        worker.run(batch)


def run_spawned_rank(index: int, spec, world_size: int, build: Callable, serve: Callable) -> None:
    """The body of spawned rank ``index + 1`` of ``world_size``, for every parallel executor: join the
    rendezvous, ``build(spec, rank, store) -> (groups, worker)``, then ``serve(groups, worker)`` until rank 0
    says to stop, and leave the process groups however that ends."""
    torch.set_num_threads(spec.num_threads)
    _exit_when_parent_dies()
    rank = index + 1
    store = spec.rendezvous.open_store(rank, world_size, spec.collective_timeout_s)
    announce_ready(store, rank)
    groups, worker = build(spec, rank, store)
    try:
        serve(groups, worker)
    finally:
        destroy_process_groups()


def _rank_main(index: int, spec: _RankSpec) -> None:
    """Entry point of spawned rank ``index + 1``."""
    run_spawned_rank(index, spec, spec.config.tensor_parallel_size, _build_rank, serve_steps)


@contextmanager
def ctrl_c_after_step() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that comes while rank 0 is inside a step until the step is done.

    The other ranks run the same step's collectives; a rank 0 that left in the middle would leave
    them waiting in one until it times out, and the shutdown after the interrupt with them. A
    second Ctrl-C interrupts at once (a step stuck on a peer). Only in the main thread, where
    Python runs signal handlers; the previous handler gets the held signal afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    if previous is None:  # a handler installed outside Python: give it back the default's way
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


# ---- rank 0 -----------------------------------------------------------------------------------------------
def _stop_processes(processes: list, timeout_s: float = 5.0) -> None:
    """Wait up to ``timeout_s`` for ``processes`` to exit, then terminate, then kill what is left; reap all."""
    deadline = time.monotonic() + timeout_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _release(processes: list, watches: list[LivenessWatch]) -> None:
    """Garbage-collection / interpreter-exit teardown: no goodbye message, just stop the ranks and leave."""
    for watch in watches:
        watch.stop()
    _stop_processes(processes, timeout_s=0.0)
    destroy_process_groups()


class _SpawnedRanks:
    """What a multi-process executor does with the ranks it spawned: start them around a rendezvous
    store, notice the dead ones, and turn a failure into one ``WorkerDiedError`` that stops them all.

    Subclasses set ``_processes``, ``_watches``, ``_error_files``, ``_error``, ``_closed`` and
    ``_finalizer`` in ``__init__``; ``_KIND`` names them in errors, ``_FAILED`` what failed when no
    rank died. Under torchrun nothing is spawned and ``_join_launched`` watches the other ranks instead.
    """

    _KIND = "tensor-parallel"
    _FAILED = "collective"

    def _spawn_ranks(self, rank_main: Callable, spec: Any) -> torch.distributed.TCPStore:
        """Host the rendezvous store, then start ranks 1..N-1 running ``rank_main(index, spec)``."""
        where = Rendezvous.for_spawn()
        store = where.open_store(0, self.world_size, spec.collective_timeout_s)
        spec.rendezvous = Rendezvous(where.host, store.port)
        context = mp.start_processes(
            rank_main, args=(spec,), nprocs=self.world_size - 1, join=False, daemon=True, start_method="spawn"
        )
        self._processes.extend(context.processes)  # the finalizer holds this very list
        self._error_files = list(context.error_files)
        return store

    def _join_launched(self, rank: int, peer_timeout_s: float) -> None:
        """torchrun: wait for every rank to show up, then keep a heartbeat watch on them (``LivenessWatch``).

        A rank whose agent is killed exits too (the agent starts its ranks in their own
        session, so nothing else would stop them). SIGINT / SIGTERM on a rank other than 0 asks
        rank 0 to shut everything down in order (``forward_stop_signals``).
        """
        if launched_by_agent():
            _exit_when_parent_dies()
        store, where = open_launch_store(rank, self.world_size, peer_timeout_s)
        wait_for_peers(store, rank, self.world_size, where, peer_timeout_s)
        on_stop = interrupt_main_thread if rank == 0 else None
        watch = LivenessWatch(store, rank, self.world_size, where, peer_timeout_s, exit_process, on_stop=on_stop)
        self._watches.append(watch.start())
        if rank != 0:
            forward_stop_signals(store, rank)

    def _leave(self) -> None:
        """An orderly end under torchrun: the other ranks stop watching this one."""
        for watch in self._watches:
            watch.leave()

    def _child_tracebacks(self) -> str:
        """The exceptions spawned ranks died of, as ``torch.multiprocessing`` recorded them ("" if none)."""
        parts = []
        for index, path in enumerate(self._error_files):
            if path and os.access(path, os.R_OK) and os.path.getsize(path) > 0:
                with open(path, "rb") as f:
                    parts.append(f"\n-- rank {index + 1}:\n{pickle.load(f)}")
        return "".join(parts)

    def _dead_ranks(self) -> list[tuple[int, int | None]]:
        return [(i + 1, p.exitcode) for i, p in enumerate(self._processes) if not p.is_alive()]

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError(f"the {self._KIND} executor was shut down")
        if self._dead_ranks():
            raise self._fail(None)

    def _fail(self, exc: BaseException | None, starting: bool = False) -> WorkerDiedError:
        """Turn a failed collective or a dead process into one ``WorkerDiedError``; stop every rank."""
        if self._error is not None:
            return self._error
        deadline = time.monotonic() + 2.0  # a rank killed mid-step may take a moment to be reaped
        while not self._dead_ranks() and time.monotonic() < deadline and self._processes:
            time.sleep(0.05)
        dead = self._dead_ranks()
        if dead:
            what = ", ".join(f"rank {r} ({_describe_exit(code)})" for r, code in dead)
            when = " while the ranks were starting" if starting else "; the engine cannot continue"
            message = f"{self._KIND} {what} died{when}{self._child_tracebacks()}"
        elif self._watches:
            message = (
                f"a {self._KIND} {self._FAILED} failed (a rank of this torchrun job stopped; "
                f"its node's log says why): {exc}"
            )
        else:
            message = f"a {self._KIND} {self._FAILED} failed: {exc}"
        self._error = WorkerDiedError(message)
        self._closed = True
        self._finalizer()
        return self._error


class TensorParallelExecutor(_SpawnedRanks):
    """Rank 0 of a tensor-parallel engine: owns the other ranks' processes (see module docstring).

    ``model``: the full ``CausalLM``; its weights are shared with the spawned ranks through
    shared memory (one host copy), each rank copies out only its slice.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: EngineConfig,
        *,
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        num_threads_per_rank: int | None = None,
    ) -> None:
        check_tensor_parallel_size(config.tensor_parallel_size, model.config)
        check_tensor_parallel_split(model.config, config.tensor_parallel_size)  # quantized layers' packed words
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A spawned rank re-imports the user's script; without the guard it would build an engine again.
            # It leaves without a traceback of its own: rank 0 reads the status and raises the one error.
            raise SystemExit(_NO_MAIN_GUARD_EXIT)
        check_no_running_engine()  # before anything is spawned
        if config.num_kv_blocks is None:
            raise ValueError("resolve config.num_kv_blocks (num_kv_blocks_for) before building the executor")
        self.config = config
        self.world_size = config.tensor_parallel_size
        self._processes: list = []
        self._watches: list = []
        self._error_files: list[str] = []
        self._error: WorkerDiedError | None = None
        self._closed = False
        launched = torchrun_rank()
        rank, device_offset = self._placement(config, launched)
        threads = num_threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
        spec = _RankSpec(
            config,
            model.config,
            model.attention_backend.name,
            _plain_state_dict(model),
            None,
            collective_timeout_s,
            threads,
            device_offset,
        )
        # Rank 0 hosts the store (the process group keeps it too); under torchrun, torchrun does.
        self._store = self._spawn(spec) if launched is None else None
        self._finalizer = weakref.finalize(self, _release, self._processes, self._watches)
        try:
            if self._store is not None:
                wait_until_ready(self._store, self.world_size, self._dead_ranks, collective_timeout_s)
                if any(code == _NO_MAIN_GUARD_EXIT for _, code in self._dead_ranks()):
                    raise InvalidEngineConfigError("tensor_parallel_size", _NO_MAIN_GUARD)
                if self._dead_ranks():
                    raise self._fail(None, starting=True)
            else:
                self._join_launched(rank, config.peer_timeout_s)
            self.tp, self.worker = _build_rank(spec, rank, self._store)
        except BaseException:
            self._finalizer()
            raise
        if rank != 0:  # torchrun: this process serves rank 0 and then ends
            try:
                serve_steps(self.tp, self.worker)
            except RuntimeError as exc:  # a peer's connection dropped: name it as the engine's failure
                raise self._fail(exc) from exc
            self._leave()
            destroy_process_groups()
            sys.exit(0)
        self.device = self.worker.device
        self.channel = StepChannel(self.tp)

    def _placement(self, config: EngineConfig, launched: tuple[int, int] | None) -> tuple[int, int]:
        """``(this process's rank, offset of rank 0's GPU)``: 0 unless torchrun started us."""
        if launched is None:
            return 0, (config.torch_device.index or 0) if config.torch_device.type == "cuda" else 0
        rank, env_world = launched
        if env_world != self.world_size:
            raise InvalidEngineConfigError(
                "tensor_parallel_size", f"{self.world_size} differs from torchrun's WORLD_SIZE={env_world}"
            )
        return rank, int(os.environ.get("LOCAL_RANK", rank)) - rank

    def _spawn(self, spec: _RankSpec) -> torch.distributed.TCPStore:
        """Host the rendezvous store, then start ranks 1..N-1 pointed at it; returns the store."""
        return self._spawn_ranks(_rank_main, spec)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned ranks (1..N-1)."""
        return [p.pid for p in self._processes]

    @property
    def model(self) -> torch.nn.Module:
        """Rank 0's slice of the model."""
        return self.worker.model

    @property
    def kv_cache_bytes_per_rank(self) -> int:
        """Bytes of one rank's KV cache slice (every rank holds the same)."""
        return self.worker.kv_cache_bytes

    def execute(self, scheduled: list[ScheduledSequence], copies: list[BlockCopy], bm: BlockManager):
        """Run one step on every rank. Returns ``(logits [num_sampled, vocab] float32 | None, sampled sequences)``."""
        self._check_usable()
        batch, sampled = StepBatch.from_schedule(scheduled, copies, bm)
        try:
            with ctrl_c_after_step():
                self.channel.send(batch)
                logits = self.worker.run(batch)
        except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, ...) are RuntimeErrors
            raise self._fail(exc) from exc
        return logits, sampled  # None when no row is sampled and no prompt logprob is asked for

    def shutdown(self) -> None:
        """Tell every rank to stop, wait for them (then terminate stragglers), leave the process group."""
        if self._closed:
            self._finalizer()
            return
        self._closed = True
        try:
            if not self._dead_ranks():
                self.channel.send(None)
            self._leave()
        except RuntimeError:
            traceback.print_exc()
        _stop_processes(self._processes)
        self._finalizer()

    def __enter__(self) -> TensorParallelExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def build_executor(model: torch.nn.Module, config: EngineConfig) -> Worker | TensorParallelExecutor:
    """What the engine core runs steps on: the plain ``Worker`` for one process, else a tensor- or
    pipeline-parallel executor (``minipaged.worker.pipeline``).

    ``config`` must be resolved (``num_kv_blocks`` set); ``model`` is the full ``CausalLM`` (or, for a
    pipeline, a ``CheckpointSource`` each stage reads its own weights from).
    """
    if config.pipeline_parallel_size > 1:
        from minipaged.worker.pipeline import PipelineParallelExecutor  # it builds on this module

        return PipelineParallelExecutor(model, config)
    if config.tensor_parallel_size == 1:
        return Worker(model, config, config.num_kv_blocks)
    return TensorParallelExecutor(model, config)
