"""Paged attention in plain PyTorch: the default backend without CUDA.

Same cache layout as the Triton kernels (``[num_blocks, block_size, num_kv_heads,
head_dim]``), vectorised across the batch so that a CPU decode step costs a few large
tensor operations per layer instead of a Python loop per sequence:

- new K/V go into the cache with one ``index_copy_`` on the flattened slot view;
- all one-token (decode) sequences attend in one batched call over their gathered
  blocks, with a key mask for the ragged ends;
- multi-token (prefill / chunked-prefill) sequences attend causally over their paged
  prefix with ``scaled_dot_product_attention``, one call each (they are few per step).

Everything derived from the metadata (gather indices, masks) is computed once per step
by ``prepare`` and shared by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from minipaged.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class DecodeBatch:
    """The one-new-token sequences of a step, padded to a common number of blocks."""

    rows: slice | torch.Tensor  # which query rows are decode tokens (a slice when contiguous)
    block_ids: torch.Tensor  # int64 [num_decodes * max_blocks], each sequence's blocks in logical order
    max_blocks: int
    key_bias: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] 0 for real keys, -inf past context


@dataclass(frozen=True)
class PrefillSeq:
    """One multi-token sequence: query rows ``start:end`` attending over ``context_len`` keys."""

    start: int
    end: int
    context_len: int
    block_ids: torch.Tensor  # int64 [ceil(context_len / block_size)]
    causal_mask: torch.Tensor | None  # bool [end - start, context_len], None when there is no prefix (plain causal)


@dataclass(frozen=True)
class TorchAttentionPlan:
    block_size: int
    decode: DecodeBatch | None
    prefills: tuple[PrefillSeq, ...]


class TorchAttentionBackend:
    """Pure-PyTorch paged attention (see module docstring)."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata, block_size: int, dtype: torch.dtype = torch.float32) -> AttentionMetadata:
        """Return ``meta`` with a ``TorchAttentionPlan`` attached (computed once per step)."""
        if isinstance(meta.backend_plan, TorchAttentionPlan) and meta.backend_plan.block_size == block_size:
            return meta
        return replace(meta, backend_plan=make_plan(meta, block_size, dtype))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``, ``v`` ``[T, Hkv, D]`` at ``meta.slot_mapping``, then attend; returns ``[T, Hq, D]``.

        ``q`` is ``[T, Hq, D]``; the caches are ``[num_blocks, block_size, Hkv, D]`` and must
        hold finite values in unused slots (``allocate_kv_cache`` zero-fills them).
        """
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        plan = self.prepare(meta, block_size, q.dtype).backend_plan
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if plan.decode is not None:
            out[plan.decode.rows] = decode_attention(q[plan.decode.rows], k_cache, v_cache, plan.decode, scale)
        for seq in plan.prefills:
            out[seq.start : seq.end] = prefill_attention(q[seq.start : seq.end], k_cache, v_cache, seq, scale)
        return out


def make_plan(meta: AttentionMetadata, block_size: int, dtype: torch.dtype) -> TorchAttentionPlan:
    """Split a step into its decode batch and its prefill sequences, building gather indices and masks."""
    query_lens, context_lens = meta.host_lengths()
    device = meta.block_tables.device
    decode_seqs = [i for i, n in enumerate(query_lens) if n == 1]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode = None
    if decode_seqs:
        decode = _make_decode_batch(meta, decode_seqs, [starts[i] for i in decode_seqs], context_lens, block_size, dtype)
    prefills = []
    for i, n in enumerate(query_lens):
        if n == 1:
            continue
        ctx = context_lens[i]
        num_blocks = -(-ctx // block_size)
        mask = None
        if ctx > n:
            key_pos = torch.arange(ctx, device=device)
            query_pos = torch.arange(ctx - n, ctx, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        block_ids = meta.block_tables[i, :num_blocks].to(torch.int64)
        prefills.append(PrefillSeq(starts[i], starts[i + 1], ctx, block_ids, mask))
    return TorchAttentionPlan(block_size, decode, tuple(prefills))


def _make_decode_batch(
    meta: AttentionMetadata, seqs: list[int], rows: list[int], context_lens: tuple[int, ...], block_size: int, dtype: torch.dtype
) -> DecodeBatch:
    device = meta.block_tables.device
    lens = [context_lens[i] for i in seqs]
    max_blocks = -(-max(lens) // block_size)
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    row_index = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=device)
    seq_index = slice(seqs[0], seqs[0] + len(seqs)) if seqs == list(range(seqs[0], seqs[0] + len(seqs))) else torch.tensor(seqs, device=device)
    block_ids = meta.block_tables[seq_index, :max_blocks].to(torch.int64).reshape(-1)
    lens_t = torch.tensor(lens, device=device)
    key_pos = torch.arange(max_blocks * block_size, device=device)
    bias = torch.zeros((len(seqs), 1, 1, max_blocks * block_size), dtype=dtype, device=device)
    bias.masked_fill_((key_pos[None, :] >= lens_t[:, None])[:, None, None, :], float("-inf"))
    return DecodeBatch(row_index, block_ids, max_blocks, bias)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch, scale: float
) -> torch.Tensor:
    """One query token per sequence: ``q [B, Hq, D]`` -> ``[B, Hq, D]`` over each sequence's paged keys.

    Each sequence's blocks are gathered whole (``[B, S, Hkv, D]``, ``S = max_blocks *
    block_size``) and read head-major through a transposed view, with no further copy.
    The ``group`` query heads sharing a KV head play the role of SDPA's query length, so
    no KV head is repeated; keys past a sequence's length get a ``-inf`` bias.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    keys = batch.max_blocks * block_size
    k = k_cache.index_select(0, batch.block_ids).view(num_seqs, keys, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, batch.block_ids).view(num_seqs, keys, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=batch.key_bias, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq: PrefillSeq, scale: float
) -> torch.Tensor:
    """Several new tokens of one sequence, ``q [n, Hq, D]``, attending causally over its paged prefix."""
    _, _, num_kv_heads, head_dim = k_cache.shape
    k = k_cache.index_select(0, seq.block_ids).view(-1, num_kv_heads, head_dim)[: seq.context_len]
    v = v_cache.index_select(0, seq.block_ids).view(-1, num_kv_heads, head_dim)[: seq.context_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=seq.causal_mask,
        is_causal=seq.causal_mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
