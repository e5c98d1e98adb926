"""Worker (model runner): one scheduler step -> flat tensors -> model -> logits.

The packed batch lays the scheduled sequences end to end: sequence i contributes
``num_new_tokens`` query tokens at ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``. Each token
gets its position and the cache slot its K/V goes to; each sequence its block table
and total context length. Copy-on-write block copies are done before the forward, so
a forked sequence writes its new token into its private copy of a shared block.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from minipaged.attention import allocate_kv_cache, kv_cache_bytes_per_block
from minipaged.attention.metadata import AttentionMetadata, build_metadata, build_positions
from minipaged.block_manager import BlockCopy, BlockManager
from minipaged.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from minipaged.errors import InvalidEngineConfigError
from minipaged.scheduler import ScheduledRequest


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [num_sampled]: rows of the packed batch whose logits are needed
    sampled: list[ScheduledRequest]  # the sequences those rows belong to, same order


def num_kv_blocks_for(config: EngineConfig, model_config) -> int:
    """KV cache size in blocks: explicit, else from a byte budget (CPU) or free memory (CUDA).

    Checked against the memory the device has free now (the model already loaded), so an
    impossible size is an ``InvalidEngineConfigError`` naming the bytes, not a failed allocation.
    """
    per_block = kv_cache_bytes_per_block(model_config, config.block_size, config.torch_dtype)
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
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise InvalidEngineConfigError(field, f"{budget} bytes hold no KV block of {per_block} bytes")
    needed = num_blocks * per_block
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise InvalidEngineConfigError(
            field, f"a KV cache of {num_blocks} blocks x {per_block} bytes needs {needed:,} bytes but only "
                   f"{available:,} bytes are available on {device}; ask for fewer blocks (num_kv_blocks) or bytes "
                   "(kv_cache_memory)")
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
    """Holds the model and its paged KV cache; runs one step at a time."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig, num_blocks: int) -> None:
        self.model = model
        self.config = config
        self.device = config.torch_device
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, config.block_size, config.torch_dtype, self.device)

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy-on-write: ``cache[dst] = cache[src]`` in every layer's K and V."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([c.dst for c in copies], dtype=torch.long, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare_inputs(self, scheduled: list[ScheduledRequest], bm: BlockManager) -> ModelInputs:
        """Pack the step's tokens into flat tensors (one host->device copy per tensor)."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledRequest] = []
        num_tokens = 0
        for s in scheduled:
            req = s.request
            input_ids.extend(req.all_token_ids[s.start:s.end])
            query_lens.append(s.num_new_tokens)
            context_lens.append(s.end)
            tables.append(bm.block_table(req.seq_id))
            num_tokens += s.num_new_tokens
            if s.completes_sequence:
                sample_rows.append(num_tokens - 1)
                sampled.append(s)
        positions = build_positions(query_lens, context_lens)
        meta = build_metadata(query_lens, context_lens, tables, self.config.block_size, self.device, positions)
        return ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            positions=positions.to(self.device),
            meta=meta,
            sample_indices=torch.tensor(sample_rows, dtype=torch.int64, device=self.device),
            sampled=sampled,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest], copies: list[BlockCopy], bm: BlockManager):
        """Run one step. Returns ``(logits [num_sampled, vocab] float32, sampled requests)``."""
        self.copy_blocks(copies)
        inputs = self.prepare_inputs(scheduled, bm)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if not inputs.sampled:
            return None, []
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        return logits.float(), inputs.sampled
