"""Pipeline parallelism: ``P`` stages of ``T`` tensor-parallel ranks each, one process per rank.

Rank ``stage * T + tp_rank`` holds stage ``stage``'s decoder layers (see
``minipaged.models.pipeline``), ``1/T`` of their heads, and the KV cache of those layers
only. The engine process is rank 0 (stage 0, TP rank 0): it keeps the scheduler, block
manager and sampler. One batch travels like this:

1. rank 0 packs the step (``StepBatch``: token ids, lengths, block tables, copies) and, with
   ``T > 1``, broadcasts it to stage 0's other TP ranks (``StepChannel``);
2. every rank of stage ``s`` runs its layers and sends ``[tag, batch id, length]``, the
   packed batch, ``hidden_states`` and ``residual`` to the same TP rank of stage ``s + 1``
   (point-to-point). With TP the residual stream is whole on every TP rank after the
   all-reduce, so each sends only its ``1/T`` slice and the ranks of stage ``s + 1``
   all-gather the slices (``stage_chunk``): the link between stages carries one copy, not ``T``;
3. the last stage's TP rank 0 computes the logits of the sampled rows and sends them, with
   the batch's per-stage timings, to rank 0.

Every stage thus sees the same block tables, and each handles batches in the order rank 0
sent them, which is what lets rank 0 keep several batches in flight (``submit`` /
``collect``; the engine core's batch queue): a later batch reads KV that an earlier one
wrote at the same stage only after that stage is done with the earlier one.

``execute`` (submit then collect) is the one-batch-at-a-time interface of the other
executors. Failures end the engine as tensor parallelism does: rank 0 waits on its
messages while polling its child processes, so a rank that dies turns into a
``WorkerDiedError`` at once, and a rank that hangs into one after ``collective_timeout_s``.
Under ``torchrun`` (``WORLD_SIZE == P * T``, any number of nodes) nothing is spawned: the
process with ``RANK == 0`` is the engine and every other one serves it, then exits. There
rank 0 has no child processes to poll, and a node can vanish without closing a connection,
so every rank also beats a heartbeat in the rendezvous store and watches the others'
(``minipaged.distributed.LivenessWatch``): a rank that does not join, or stops beating, for
``peer_timeout_s`` ends every other rank with a message naming it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from minipaged.config import EngineConfig
from minipaged.core.block_manager import BlockCopy, BlockManager
from minipaged.core.scheduler import ScheduledSequence
from minipaged.distributed import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    PipelineGroups,
    Rendezvous,
    StageLink,
    TensorParallelGroup,
    check_no_running_engine,
    check_tensor_parallel_size,
    destroy_process_groups,
    init_pipeline_groups,
    torchrun_rank,
    wait_until_ready,
)
from minipaged.errors import InvalidEngineConfigError
from minipaged.models.pipeline import CheckpointSource, IntermediateTensors, StageLayout, layer_partition
from minipaged.worker.executor import (
    StepChannel,
    WorkerDiedError,
    _plain_state_dict,
    _release,
    _SpawnedRanks,
    _stop_processes,
    ctrl_c_after_step,
    rank_device,
    run_spawned_rank,
)
from minipaged.worker.worker import StepBatch, Worker

_STEP, _SHUTDOWN = 1, 2
# How long a shutdown waits for the stages to finish the batches in flight and take its message; a
# stage stuck longer is stopped instead (or, under torchrun, left to see rank 0 leave).
_SHUTDOWN_WAIT = datetime.timedelta(seconds=30)
# Per stage and batch: forward start, forward end (time.perf_counter: one clock for all processes of a host),
# and the seconds spent receiving the residual stream from the stage before.
_SPAN_FIELDS = 3


@dataclass(frozen=True)
class StageSpan:
    """Stage ``stage`` ran batch ``batch`` from ``start`` to ``end`` (perf_counter seconds); ``comm_s``:
    the seconds it spent receiving the batch's residual stream."""

    batch: int
    stage: int
    start: float
    end: float
    comm_s: float


class StageWorker(Worker):
    """A ``Worker`` over one stage's model: takes and returns the residual stream between stages."""

    @torch.inference_mode()
    def run_stage(
        self, batch: StepBatch, intermediate: IntermediateTensors | None
    ) -> IntermediateTensors | torch.Tensor | None:
        """This stage's forward: ``IntermediateTensors`` for the next stage, or on the last stage the logits
        ``[num_sampled, vocab]`` fp32 (TP rank 0 only; ``None`` elsewhere or when nothing is sampled)."""
        self.copy_blocks(batch.copies)
        inputs = self.prepare_inputs(batch)
        out = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, intermediate)
        if isinstance(out, IntermediateTensors):
            return out
        if not batch.sample_rows or not self.is_driver:
            return None
        return self.model.compute_logits(out[inputs.sample_indices]).float()


# ---- messages between stages ------------------------------------------------------------------------------
def stage_chunk(t: torch.Tensor, tp: TensorParallelGroup | None) -> torch.Tensor:
    """The part of ``t`` this rank sends to its peer on the next stage: its ``1/T`` of the flattened tensor
    (``[numel / T]``, contiguous), or all of ``t`` without tensor parallelism or when ``T`` does not divide it.

    After a stage's last all-reduce every TP rank holds the whole residual stream; sending it
    whole from each rank would move ``T`` copies between the stages. Each sends its own slice
    and the next stage's ranks put the slices back together (``_receive_chunked``).
    """
    t = t.contiguous()
    if tp is None or t.numel() % tp.world_size:
        return t
    return t.view(tp.world_size, -1)[tp.rank]


def _receive_chunked(full: torch.Tensor, link: StageLink, tp: TensorParallelGroup | None) -> None:
    """Fill ``full`` (contiguous) from the previous stage: this rank's slice from its peer there, the
    other slices from this stage's other TP ranks (one all-gather); see ``stage_chunk``."""
    if tp is None or full.numel() % tp.world_size:
        dist.recv(full, link.peer, group=link.data)
        return
    slices = list(full.view(tp.world_size, -1).unbind(0))
    mine = torch.empty_like(slices[tp.rank])
    dist.recv(mine, link.peer, group=link.data)
    dist.all_gather(slices, mine, group=tp.device_group)


def _send_stage(
    link: StageLink,
    batch_id: int,
    batch: StepBatch | None,
    out: IntermediateTensors | None,
    spans: torch.Tensor,
    tp: TensorParallelGroup | None,
) -> None:
    """Send one batch (``None``: shut down) down ``link``: header, packed batch, spans, residual stream."""
    if batch is None:
        dist.send(torch.tensor([_SHUTDOWN, batch_id, 0]), link.peer, group=link.control)
        return
    payload = batch.pack()
    dist.send(torch.tensor([_STEP, batch_id, payload.numel()]), link.peer, group=link.control)
    dist.send(payload, link.peer, group=link.control)
    dist.send(spans.to(out.hidden_states.device), link.peer, group=link.data)
    dist.send(stage_chunk(out.hidden_states, tp), link.peer, group=link.data)
    dist.send(stage_chunk(out.residual, tp), link.peer, group=link.data)


def _receive_stage(
    link: StageLink,
    tp: TensorParallelGroup | None,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_stages: int,
) -> tuple[int, StepBatch, IntermediateTensors, torch.Tensor, float] | None:
    """The next batch from the previous stage, or ``None`` when it shut down."""
    header = torch.zeros(3, dtype=torch.int64)
    dist.recv(header, link.peer, group=link.control)  # waits while the engine is idle
    tag, batch_id, length = header.tolist()
    if tag == _SHUTDOWN:
        return None
    payload = torch.zeros(length, dtype=torch.int64)
    dist.recv(payload, link.peer, group=link.control)
    batch = StepBatch.unpack(payload)
    start = time.perf_counter()
    spans = torch.zeros(num_stages, _SPAN_FIELDS, dtype=torch.float64, device=device)
    dist.recv(spans, link.peer, group=link.data)
    spans = spans.cpu()
    hidden = torch.empty(len(batch.input_ids), hidden_size, dtype=dtype, device=device)
    residual = torch.empty_like(hidden)
    _receive_chunked(hidden, link, tp)
    _receive_chunked(residual, link, tp)
    return batch_id, batch, IntermediateTensors(hidden, residual), spans, time.perf_counter() - start


def serve_stage(groups: PipelineGroups, worker: StageWorker) -> None:
    """Every rank but 0: run each batch as it arrives (from rank 0's broadcast on stage 0, else from the
    previous stage), pass it on, until shut down; the shutdown is passed on too."""
    config = worker.model.full_config
    channel = StepChannel(groups.tp) if groups.stage == 0 else None
    next_id = 0
    while True:
        comm = 0.0
        if channel is not None:
            batch, intermediate = channel.receive(), None
            spans = torch.zeros(groups.num_stages, _SPAN_FIELDS, dtype=torch.float64)
            batch_id, next_id = next_id, next_id + 1
        else:
            message = _receive_stage(
                groups.prev, groups.tp, config.hidden_size, worker.config.torch_dtype, worker.device, groups.num_stages
            )
            batch = None if message is None else message[1]
            if message is not None:
                batch_id, batch, intermediate, spans, comm = message
        if batch is None:
            if groups.next is not None:
                _send_stage(groups.next, 0, None, None, spans, groups.tp)
            return
        start = time.perf_counter()
        out = worker.run_stage(batch, intermediate)
        spans[groups.stage] = torch.tensor([start, time.perf_counter(), comm], dtype=torch.float64)
        if groups.next is not None:
            _send_stage(groups.next, batch_id, batch, out, spans, groups.tp)
        elif groups.to_driver is not None and groups.to_driver is not None:
            dist.send(spans.to(worker.device), groups.to_driver.peer, group=groups.to_driver.data)
            if out is not None:
                dist.send(out, groups.to_driver.peer, group=groups.to_driver.data)


# ---- building a rank --------------------------------------------------------------------------------------
@dataclass
class _StageSpec:
    """What a rank needs to build its stage (pickled to spawned ranks)."""

    config: EngineConfig
    model_config: Any
    partition: tuple[int, ...]
    attention_backend: str
    source: dict[str, torch.Tensor] | CheckpointSource  # a full state dict (our names) or a checkpoint to read
    rendezvous: Rendezvous | None
    collective_timeout_s: float
    num_threads: int
    device_offset: int = 0


def _build_rank(spec: _StageSpec, rank: int, store) -> tuple[PipelineGroups, StageWorker]:
    """Join the world as ``rank``; build this rank's stage model (its TP slice of it) and its KV cache."""
    from minipaged.models.pipeline import build_stage_model

    config = spec.config
    device = rank_device(config, rank, spec.device_offset)
    groups = init_pipeline_groups(
        rank, config.pipeline_parallel_size, config.tensor_parallel_size, device, store, spec.collective_timeout_s
    )
    stage = StageLayout.of(groups.stage, spec.partition)
    model = build_stage_model(
        spec.model_config,
        stage,
        spec.source,
        groups.tp,
        dtype=config.torch_dtype,
        device=device,
        attention_backend=spec.attention_backend,
    )
    spec.source = {}  # this rank keeps its own tensors only
    return groups, StageWorker(model, config, config.num_kv_blocks, device=device)


def _rank_main(index: int, spec: _StageSpec) -> None:
    """Entry point of spawned rank ``index + 1``."""
    run_spawned_rank(index, spec, spec.config.world_size, _build_rank, serve_stage)


# ---- rank 0 -----------------------------------------------------------------------------------------------
@dataclass
class InFlightBatch:
    """A batch rank 0 submitted and has not collected: its sends and the receives of its results.

    The receives (the stage timings ``spans`` and, with rows to sample, the ``logits``) are posted at
    submission, in batch order: the last stage's send of them then completes whether or not rank 0 is
    in ``collect``, which is what lets ``shutdown`` finish the batches in flight after an interrupt.
    """

    batch_id: int
    sampled: list[ScheduledSequence]
    stage0: tuple[float, float, float]
    pending: list = field(default_factory=list)  # rank 0's unfinished sends, with the tensors they send
    spans: torch.Tensor | None = None  # [num_stages, 3] float64, filled by receives[0]
    logits: torch.Tensor | None = None  # [num_sampled, vocab] float32, filled by receives[1]
    receives: list = field(default_factory=list)


class PipelineParallelExecutor(_SpawnedRanks):
    """Rank 0 of a pipeline-parallel engine (see the module docstring). ``submit`` / ``collect`` keep several
    batches in flight; ``execute`` runs one. ``timeline`` holds every collected batch's ``StageSpan`` s."""

    _KIND = "pipeline-parallel"
    _FAILED = "message or collective"

    def __init__(
        self,
        model: torch.nn.Module | CheckpointSource,
        config: EngineConfig,
        *,
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        num_threads_per_rank: int | None = None,
    ) -> None:
        model_config = model.config
        partition = layer_partition(
            model_config.num_layers, config.pipeline_parallel_size, config.pipeline_layer_partition
        )
        if config.tensor_parallel_size > 1:
            check_tensor_parallel_size(config.tensor_parallel_size, model_config)
        check_no_running_engine()
        if config.num_kv_blocks is None:
            raise ValueError("resolve config.num_kv_blocks (num_kv_blocks_for) before building the executor")
        self.config = config
        self.partition = partition
        self.world_size = config.world_size
        self.timeline: list[StageSpan] = []
        self._processes: list = []
        self._watches: list = []
        self._error_files: list[str] = []
        self._error: WorkerDiedError | None = None
        self._closed = False
        self._next_id = 0
        self._uncollected: dict[int, InFlightBatch] = {}  # submitted, by batch id: what shutdown finishes first
        launched = torchrun_rank()
        rank, device_offset = self._placement(config, launched)
        threads = num_threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
        backend = model.attention_backend.name if isinstance(model, torch.nn.Module) else config.attention_backend
        source = model if isinstance(model, CheckpointSource) else _plain_state_dict(model)
        spec = _StageSpec(
            config, model_config, partition, backend, source, None, collective_timeout_s, threads, device_offset
        )
        self._store = self._spawn(spec) if launched is None else None
        self._finalizer = weakref.finalize(self, _release, self._processes, self._watches)
        try:
            if self._store is not None:
                wait_until_ready(self._store, self.world_size, self._dead_ranks, collective_timeout_s)
                if self._dead_ranks():
                    raise self._fail(None, starting=True)
            else:
                self._join_launched(rank, config.peer_timeout_s)
            self.groups, self.worker = _build_rank(spec, rank, self._store)
        except BaseException:
            self._finalizer()
            raise
        if rank != 0:  # torchrun: this process serves rank 0 and then ends
            try:
                serve_stage(self.groups, self.worker)
                self._leave()
            except RuntimeError as exc:  # a peer's connection dropped: name it as the engine's failure
                raise self._fail(exc) from exc
            finally:
                destroy_process_groups()
            sys.exit(0)
        self.device = self.worker.device
        self.channel = StepChannel(self.groups.tp) if self.groups.tp is not None else None

    def _placement(self, config: EngineConfig, launched: tuple[int, int] | None) -> tuple[int, int]:
        """``(this process's rank, offset of rank 0's GPU on this node)``: rank 0 unless torchrun started us."""
        if launched is None:
            return 0, (config.torch_device.index or 0) if config.torch_device.type == "cuda" else 0
        rank, env_world = launched
        if env_world != self.world_size:
            raise InvalidEngineConfigError(
                "pipeline_parallel_size",
                f"{config.pipeline_parallel_size} x {config.tensor_parallel_size} ranks differ from torchrun's "
                f"WORLD_SIZE={env_world}",
            )
        return rank, int(os.environ.get("LOCAL_RANK", rank)) - rank

    def _spawn(self, spec: _StageSpec) -> dist.TCPStore:
        return self._spawn_ranks(_rank_main, spec)

    # ---- the interface the engine core drives ----
    @property
    def model(self) -> torch.nn.Module:
        """Rank 0's part of the model (stage 0, its TP slice)."""
        return self.worker.model

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned ranks (1..P*T-1)."""
        return [p.pid for p in self._processes]

    @property
    def max_concurrent_batches(self) -> int:
        """How many batches the engine may keep in flight (the configured batch-queue depth)."""
        return self.config.batch_queue_depth

    def submit(self, scheduled: list[ScheduledSequence], copies: list[BlockCopy], bm: BlockManager) -> InFlightBatch:
        """Run stage 0 of one batch and send it on; returns at once after that (``collect`` gets its logits)."""
        self._check_usable()
        batch, sampled = StepBatch.from_schedule(scheduled, copies, bm)
        batch_id, self._next_id = self._next_id, self._next_id + 1
        try:
            with ctrl_c_after_step():  # stage 0's TP ranks share its collectives; the stages, the whole batch
                if self.channel is not None:
                    self.channel.send(batch)
                start = time.perf_counter()
                out = self.worker.run_stage(batch, None)
                end = time.perf_counter()
                handle = InFlightBatch(batch_id, sampled, (start, end, 0.0), self._send_async(batch_id, batch, out))
                self._post_receives(handle)
        except RuntimeError as exc:
            raise self._fail(exc) from exc
        self._uncollected[batch_id] = handle
        return handle

    def _post_receives(self, handle: InFlightBatch) -> None:
        """Post the receives of ``handle``'s stage timings and logits from the last stage (see ``InFlightBatch``)."""
        link = self.groups.to_driver
        handle.spans = torch.zeros(
            self.config.pipeline_parallel_size, _SPAN_FIELDS, dtype=torch.float64, device=self.device
        )
        handle.receives.append(dist.irecv(handle.spans, link.peer, group=link.data))
        if handle.sampled:
            vocab = self.worker.model.full_config.vocab_size
            handle.logits = torch.empty(len(handle.sampled), vocab, dtype=torch.float32, device=self.device)
            handle.receives.append(dist.irecv(handle.logits, link.peer, group=link.data))

    def _send_async(self, batch_id: int, batch: StepBatch, out: IntermediateTensors) -> list:
        """Rank 0's half of ``_send_stage``, without waiting: the tensors stay referenced until ``collect``."""
        link = self.groups.next
        payload = batch.pack()
        header = torch.tensor([_STEP, batch_id, payload.numel()])
        spans = torch.zeros(self.config.pipeline_parallel_size, _SPAN_FIELDS, dtype=torch.float64, device=self.device)
        tensors = [
            (header, link.control),
            (payload, link.control),
            (spans, link.data),
            (stage_chunk(out.hidden_states, self.groups.tp), link.data),
            (stage_chunk(out.residual, self.groups.tp), link.data),
        ]
        return [(dist.isend(t, link.peer, group=g), t) for t, g in tensors]

    def collect(self, handle: InFlightBatch) -> tuple[torch.Tensor | None, list[ScheduledSequence]]:
        """Wait for a submitted batch's logits ``[num_sampled, vocab]`` fp32 (in submission order)."""
        try:
            for work in [work for work, _tensor in handle.pending] + handle.receives:
                self._wait(work)
        except RuntimeError as exc:
            raise self._fail(exc) from exc
        self._uncollected.pop(handle.batch_id, None)
        logits = handle.logits
        spans = handle.spans.cpu()
        spans[0] = torch.tensor(handle.stage0, dtype=torch.float64)
        for stage, (start, end, comm) in enumerate(spans.tolist()):
            self.timeline.append(StageSpan(handle.batch_id, stage, start, end, comm))
        return (logits, handle.sampled) if handle.sampled else (None, [])

    def execute(self, scheduled: list[ScheduledSequence], copies: list[BlockCopy], bm: BlockManager):
        """Run one batch through every stage. Returns ``(logits [num_sampled, vocab] float32 | None, sampled)``."""
        return self.collect(self.submit(scheduled, copies, bm))

    def _wait(self, work) -> None:
        """Wait for a send or receive. A rank that dies closes its connections, which fails the receives
        waiting on it (and, rank by rank, down the pipeline, the ones waiting on those); a rank that hangs
        fails them after ``collective_timeout_s`` (the data links' timeout). ``_fail`` then names the dead."""
        work.wait()

    # ---- shutdown (failures: _SpawnedRanks) ----
    def _finish_in_flight(self) -> None:
        """Let the batches still in flight (an interrupted ``generate`` leaves some) reach rank 0 and drop them,
        so that no stage is still sending when rank 0 leaves the groups (it would fail instead of stopping)."""
        for batch_id in sorted(self._uncollected):
            handle = self._uncollected.pop(batch_id)
            for work in [work for work, _tensor in handle.pending] + handle.receives:
                if not work.is_completed():  # a gloo receive waited on twice waits for a second message
                    work.wait(_SHUTDOWN_WAIT)

    def shutdown(self) -> None:
        """Tell every rank to stop (the shutdown travels down the stages), wait for them, leave the world."""
        if self._closed:
            self._finalizer()
            return
        self._closed = True
        try:
            if not self._dead_ranks():
                self._finish_in_flight()
                if self.channel is not None:
                    self.channel.send(None)
                link = self.groups.next
                dist.isend(torch.tensor([_SHUTDOWN, 0, 0]), link.peer, group=link.control).wait(_SHUTDOWN_WAIT)
            self._leave()
        except RuntimeError:
            pass  # a rank already gone or stuck: stopping the processes below is all that is left to do
        _stop_processes(self._processes)
        self._finalizer()

    def __enter__(self) -> PipelineParallelExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def stage_busy_seconds(timeline: list[StageSpan], num_stages: int) -> list[float]:
    """Seconds each stage spent in its forward over ``timeline`` (the benchmark's and notebook's measure)."""
    busy = [0.0] * num_stages
    for span in timeline:
        busy[span.stage] += span.end - span.start
    return busy


def overlapping_batches(timeline: list[StageSpan]) -> list[tuple[StageSpan, StageSpan]]:
    """Pairs of spans of different batches on different stages that ran at the same time."""
    pairs = []
    for a in timeline:
        for b in timeline:
            if a.stage < b.stage and a.batch != b.batch and a.start < b.end and b.start < a.end:
                pairs.append((a, b))
    return pairs
