"""Worker (model runner): one scheduler step -> flat tensors -> model -> logits.

The packed batch lays the scheduled sequences end to end: sequence i contributes
``num_new_tokens`` query tokens at ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``. Each token
gets its position and the cache slot its K/V goes to; each sequence its block table
and total context length. Copy-on-write block copies are done before the forward, so
a forked sequence writes its new token into its private copy of a shared block.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from minipaged.attention import allocate_kv_cache, kv_cache_bytes_per_block, kv_quant
from minipaged.attention.metadata import AttentionMetadata, build_metadata, build_positions
from minipaged.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from minipaged.core.block_manager import BlockCopy, BlockManager
from minipaged.core.scheduler import ScheduledSequence
from minipaged.distributed import check_tensor_parallel_size
from minipaged.errors import InvalidEngineConfigError
from minipaged.models.config import ModelConfig
from minipaged.models.linear import pack_in_place
from minipaged.models.quantization.linear import pack_int4_in_place
from minipaged_kernels import cpu as cpu_kernels


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [num_sampled]: rows of the packed batch whose logits are needed


@dataclass(frozen=True)
class StepBatch:
    """One step as plain host data: everything a rank needs to run it, nothing it needs to decide it.

    Built by the engine process from the scheduler's output; under tensor parallelism it is
    packed into one int64 tensor and broadcast, so the other ranks never see a sequence.
    """

    input_ids: tuple[int, ...]  # [num_tokens], the sequences' new tokens end to end
    query_lens: tuple[int, ...]  # [num_seqs]
    context_lens: tuple[int, ...]  # [num_seqs] total length after this step
    block_tables: tuple[tuple[int, ...], ...]  # [num_seqs][num_blocks_i]
    copies: tuple[BlockCopy, ...]  # copy-on-write, done before the forward
    sample_rows: tuple[int, ...]  # [num_sampled] rows whose logits are needed

    @classmethod
    def from_schedule(
        cls, scheduled: list[ScheduledSequence], copies: list[BlockCopy], bm: BlockManager
    ) -> tuple[StepBatch, list[ScheduledSequence]]:
        """The step's batch and the scheduled sequences its sample rows belong to (same order; a
        sequence with k draft tokens owns k + 1 consecutive rows).

        After those rows come the prompt-logprob rows: every ``s.prompt_logprob_positions`` of each
        scheduled sequence in order (``prompt_logprob_rows`` counts them per sequence).
        """
        input_ids: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        sampled: list[ScheduledSequence] = []
        for s in scheduled:
            offset = len(input_ids) - s.start  # packed row of the sequence's position ``start``
            prompt_rows.extend(offset + q for q in s.prompt_logprob_positions)
            input_ids.extend(s.seq.all_token_ids[s.start : s.verified_end])
            input_ids.extend(s.draft_token_ids)
            if s.completes_sequence:
                # With k drafts, the last k + 1 positions' logits verify them (and give the next token).
                sample_rows.extend(range(len(input_ids) - 1 - s.num_draft_tokens, len(input_ids)))
                sampled.append(s)
        sample_rows.extend(prompt_rows)
        batch = cls(
            input_ids=tuple(input_ids),
            query_lens=tuple(s.num_new_tokens for s in scheduled),
            context_lens=tuple(s.end for s in scheduled),
            block_tables=tuple(tuple(bm.block_table(s.seq.seq_id)) for s in scheduled),
            copies=tuple(copies),
            sample_rows=tuple(sample_rows),
        )
        return batch, sampled

    def pack(self) -> torch.Tensor:
        """One flat CPU int64 tensor: 4 counts, then ids, lengths, table lengths, tables, copies, sample rows."""
        flat_tables = [b for table in self.block_tables for b in table]
        values = [
            len(self.input_ids),
            len(self.query_lens),
            len(self.copies),
            len(self.sample_rows),
            *self.input_ids,
            *self.query_lens,
            *self.context_lens,
            *(len(t) for t in self.block_tables),
            *flat_tables,
            *(c.src for c in self.copies),
            *(c.dst for c in self.copies),
            *self.sample_rows,
        ]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> StepBatch:
        """Inverse of ``pack`` (trailing elements past the batch are ignored)."""
        values = packed.tolist()
        num_tokens, num_seqs, num_copies, num_sampled = values[:4]
        pos = 4

        def take(n: int) -> list[int]:
            nonlocal pos
            pos += n
            return values[pos - n : pos]

        input_ids, query_lens, context_lens, table_lens = (
            take(num_tokens),
            take(num_seqs),
            take(num_seqs),
            take(num_seqs),
        )
        tables = tuple(tuple(take(n)) for n in table_lens)
        src, dst = take(num_copies), take(num_copies)
        return cls(
            tuple(input_ids),
            tuple(query_lens),
            tuple(context_lens),
            tables,
            tuple(BlockCopy(a, b) for a, b in zip(src, dst)),
            tuple(take(num_sampled)),
        )


def rank_model_config(model_config: ModelConfig, tp_size: int) -> ModelConfig:
    """The shape one tensor-parallel rank computes: 1/N of the query and KV heads and of the MLP features."""
    if tp_size == 1:
        return model_config
    check_tensor_parallel_size(tp_size, model_config)
    return dataclasses.replace(
        model_config,
        num_heads=model_config.num_heads // tp_size,
        num_kv_heads=model_config.num_kv_heads // tp_size,
        intermediate_size=model_config.intermediate_size // tp_size,
    )


def num_kv_blocks_for(
    config: EngineConfig, model_config, *, extra_bytes_per_block: int = 0, reserved_bytes: int = 0
) -> int:
    """KV cache size in blocks: explicit, else from a byte budget (CPU) or free memory (CUDA).

    Bytes per block count the ``kv_cache_dtype``'s scales. Checked against the memory the
    device has free now (the model already loaded), so an impossible size is an
    ``InvalidEngineConfigError`` naming the bytes, not a failed allocation.
    Under tensor parallelism a block holds only one rank's KV heads and the budget is per
    rank (per GPU), so N ranks hold N times the blocks one process would in the same budget
    each; on CPU the ranks share the host's memory, so all N slices are checked against it.
    Under pipeline parallelism every stage holds the same number of blocks for its own layers:
    the budget is per stage, and a block is sized for the stage with the most layers.
    A draft model (speculative decoding) keeps ``extra_bytes_per_block`` of its own KV per block
    id in the engine process, plus ``reserved_bytes`` of scratch blocks; both come out of the budget.
    """
    rank_config = rank_model_config(model_config, config.tensor_parallel_size)
    if config.pipeline_parallel_size > 1:  # every stage holds the same blocks for its own layers
        from minipaged.models.pipeline import layer_partition

        partition = layer_partition(
            model_config.num_layers, config.pipeline_parallel_size, config.pipeline_layer_partition
        )
        rank_config = dataclasses.replace(rank_config, num_layers=max(partition))
    per_block = kv_cache_bytes_per_block(rank_config, config.block_size, config.torch_dtype, config.kv_cache_dtype)
    device = config.torch_device
    if config.num_kv_blocks is not None:
        num_blocks, field = config.num_kv_blocks, "num_kv_blocks"
    else:
        if config.kv_cache_memory is not None:
            budget, field = config.kv_cache_memory, "kv_cache_memory"
        elif device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budget, field = int(free * config.gpu_memory_utilization), "gpu_memory_utilization"
        else:
            budget, field = DEFAULT_CPU_KV_CACHE_BYTES, "kv_cache_memory"
        num_blocks = (budget - reserved_bytes) // (per_block + extra_bytes_per_block)
        if num_blocks < 1:
            raise InvalidEngineConfigError(
                field, f"{budget} bytes hold no KV block of {per_block + extra_bytes_per_block} bytes"
            )
    ranks = config.world_size if device.type == "cpu" else 1
    needed = num_blocks * (per_block * ranks + extra_bytes_per_block) + reserved_bytes
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise InvalidEngineConfigError(
            field,
            f"a KV cache of {num_blocks} blocks x {per_block + extra_bytes_per_block} bytes needs {needed:,} bytes "
            f"but only {available:,} bytes are available on {device}; ask for fewer blocks (num_kv_blocks) or bytes "
            "(kv_cache_memory)",
        )
    return num_blocks


def available_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now: CUDA's free memory, or the host's
    ``MemAvailable`` (``/proc/meminfo``; else free pages per ``sysconf``); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Worker:
    """Holds the model (or one tensor-parallel rank's slice of it) and its paged KV cache; runs one step at a time.

    On a tensor-parallel rank (``model.tp`` set) the cache holds this rank's KV heads only,
    ``[num_blocks, block_size, num_kv_heads / N, head_dim]`` per layer, and only rank 0
    computes logits.
    """

    def __init__(
        self, model: torch.nn.Module, config: EngineConfig, num_blocks: int, device: torch.device | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.device = device if device is not None else config.torch_device
        self.num_blocks = num_blocks
        tp = getattr(model, "tp", None)
        self.is_driver = tp is None or tp.is_driver
        self.rank_config = rank_model_config(model.config, 1 if tp is None else tp.world_size)
        backend = getattr(model, "attention_backend", None)
        kv_quant.check_backend_support(
            config.kv_cache_dtype, getattr(backend, "name", ""), self.device, model.config.head_dim
        )
        self.kv_caches = allocate_kv_cache(
            self.rank_config, num_blocks, config.block_size, config.torch_dtype, self.device, config.kv_cache_dtype
        )
        # On CPU every linear multiplies by a oneDNN-packed weight. The dense one is kept beside it
        # only where minipaged_kernels.cpu.gemv runs (numba installed): with 1-4 sequences it streams the
        # dense weights faster than the packed GEMM, for ~0.4 GiB more held (SmolLM2 fp32). Re-measure with
        # `python -m minipaged.benchmarks.step --batch 1 --few-row-linear on off --rounds 3 --skip-transformers`.
        self.dense_weight_bytes_released = 0
        if self.device.type == "cpu":
            self.dense_weight_bytes_released = pack_in_place(model, keep_dense=cpu_kernels.load("gemv") is not None)
            # A 16-bit model's 4-bit layers go to PyTorch's int4 CPU kernel, which streams them 2-3x faster
            # than the numba loop (`python -m minipaged_kernels.cpu.quant_bench`); fp32 rows keep numba's.
            if config.torch_dtype in (torch.bfloat16, torch.float16):
                pack_int4_in_place(model, config.torch_dtype)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of this worker's KV cache (keys and values, all layers, scales included)."""
        return sum(kv_quant.nbytes(k) + kv_quant.nbytes(v) for k, v in self.kv_caches)

    def copy_blocks(self, copies: tuple[BlockCopy, ...] | list[BlockCopy]) -> None:
        """Copy-on-write: ``cache[dst] = cache[src]`` in every layer's K and V (and their scales)."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([c.dst for c in copies], dtype=torch.long, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            kv_quant.copy_blocks(k_cache, src, dst)
            kv_quant.copy_blocks(v_cache, src, dst)

    def prepare_inputs(self, batch: StepBatch) -> ModelInputs:
        """Pack the step's tokens into flat tensors (one host->device copy per tensor)."""
        positions = build_positions(batch.query_lens, batch.context_lens)
        meta = build_metadata(
            batch.query_lens, batch.context_lens, batch.block_tables, self.config.block_size, self.device, positions
        )
        return ModelInputs(
            input_ids=torch.tensor(batch.input_ids, dtype=torch.int64, device=self.device),
            positions=positions.to(self.device),
            meta=meta,
            sample_indices=torch.tensor(batch.sample_rows, dtype=torch.int64, device=self.device),
        )

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """Run one step's forward.

        Returns logits ``[num_sampled, vocab]`` in fp32 on the driver if any row is sampled, else None.
        """
        self.copy_blocks(batch.copies)
        inputs = self.prepare_inputs(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if not batch.sample_rows or not self.is_driver:
            return None
        return self.model.compute_logits(hidden[inputs.sample_indices]).float()

    def execute(self, scheduled: list[ScheduledSequence], copies: list[BlockCopy], bm: BlockManager):
        """Run one step. Returns ``(logits [num_rows, vocab] float32 | None, sampled sequences)``: the sampled
        sequences' rows, then the prompt-logprob rows (``StepBatch.from_schedule``)."""
        batch, sampled = StepBatch.from_schedule(scheduled, copies, bm)
        return self.run(batch), sampled

    def shutdown(self) -> None:
        """Nothing to release in one process (the executor interface's teardown)."""
