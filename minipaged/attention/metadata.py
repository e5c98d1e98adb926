"""What one forward step tells the attention layers: where each new token's K/V goes
and which cached blocks each sequence attends over.

The engine packs every scheduled sequence's new tokens into one flat batch ("varlen"
layout, as FlashAttention and vLLM do): sequence ``i`` owns query rows
``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``. A decode step is a sequence with one new
token; a prefill chunk has several; both can share a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One forward step's packed token batch: sequence i contributes query tokens cu_seqlens_q[i]:cu_seqlens_q[i+1].

    The last three fields are optional host-side copies. ``build_metadata`` fills
    ``query_lens_cpu`` and ``context_lens_cpu`` so the torch backend never has to read
    lengths back from the device; ``backend_plan`` is filled by
    ``AttentionBackend.prepare`` once per step with whatever index tensors that backend
    derives from the metadata, so the layers do not each re-derive them.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]  cache slot of each new token's K/V (written before attention)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor  # int32 [num_seqs]  total length after this step (prefix + new tokens)
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    max_query_len: int
    max_context_len: int
    query_lens_cpu: tuple[int, ...] | None = None
    context_lens_cpu: tuple[int, ...] | None = None
    backend_plan: Any = None

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def host_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(query_lens, context_lens)`` as Python tuples, read from the device if not given."""
        if self.query_lens_cpu is not None and self.context_lens_cpu is not None:
            return self.query_lens_cpu, self.context_lens_cpu
        cu = self.cu_seqlens_q.tolist()
        query_lens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
        return query_lens, tuple(self.context_lens.tolist())


def _check_lengths(
    query_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int
) -> None:
    if not (len(query_lens) == len(context_lens) == len(block_tables)):
        raise ValueError(
            f"query_lens, context_lens and block_tables must have one entry per sequence, got "
            f"{len(query_lens)}, {len(context_lens)}, {len(block_tables)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for i, (q, c, table) in enumerate(zip(query_lens, context_lens, block_tables)):
        if q < 1:
            raise ValueError(f"query_lens[{i}] must be >= 1, got {q}")
        if c < q:
            raise ValueError(f"context_lens[{i}]={c} is shorter than query_lens[{i}]={q}")
        if len(table) * block_size < c:
            raise ValueError(f"block_tables[{i}] has {len(table)} blocks, too few for context_lens[{i}]={c}")


def build_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    positions: torch.Tensor | None = None,
) -> AttentionMetadata:
    """Pack per-sequence lengths and block tables into an ``AttentionMetadata``.

    Sequence ``i`` computes its last ``query_lens[i]`` tokens, at positions
    ``context_lens[i] - query_lens[i] .. context_lens[i] - 1``; ``block_tables[i]`` lists
    its physical blocks in logical order (rows are padded with 0 to the longest table;
    padding is never read because ``context_lens`` bounds every read).
    ``positions`` (CPU int64 ``[num_tokens]``, from ``build_positions``) may be passed by a
    caller that also feeds them to the model, so they are computed once per step.
    """
    _check_lengths(query_lens, context_lens, block_tables, block_size)
    query_lens = tuple(int(q) for q in query_lens)
    context_lens = tuple(int(c) for c in context_lens)
    max_blocks = max((len(t) for t in block_tables), default=0)
    tables = torch.zeros((len(block_tables), max(max_blocks, 1)), dtype=torch.int64)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.as_tensor(list(table), dtype=torch.int64)
    if positions is None:
        positions = build_positions(query_lens, context_lens)
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens, dtype=torch.int64))
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
    return AttentionMetadata(
        slot_mapping=slots.to(device),
        block_tables=tables.to(device=device, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu.to(device),
        max_query_len=max(query_lens, default=0),
        max_context_len=max(context_lens, default=0),
        query_lens_cpu=query_lens,
        context_lens_cpu=context_lens,
    )


def build_positions(query_lens: Sequence[int], context_lens: Sequence[int]) -> torch.Tensor:
    """Positions ``[num_tokens]`` int64 of the packed new tokens: the last ``query_lens[i]`` of each context."""
    if not query_lens:
        return torch.zeros(0, dtype=torch.int64)
    q = torch.tensor(list(query_lens), dtype=torch.int64)
    c = torch.tensor(list(context_lens), dtype=torch.int64)
    starts = torch.repeat_interleave(c - q, q)
    token_index = torch.arange(int(q.sum()))
    first_token = torch.repeat_interleave(torch.cumsum(q, 0) - q, q)
    return starts + token_index - first_token
