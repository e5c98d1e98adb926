"""Paged attention in plain PyTorch: the default backend without CUDA.

Same cache layout as the Triton kernels (``[num_blocks, block_size, num_kv_heads,
head_dim]``), vectorised across the batch so that a CPU decode step costs a few large
tensor operations per layer instead of a Python loop per sequence:

- new K/V go into the cache with one ``index_copy_`` on the flattened slot view;
- one-token (decode) sequences on CPU go, when numba is installed, to the fused
  paged decode kernel ``minipaged_kernels.cpu.decode_attention`` (one call per layer for all of
  them; it reads each K/V row once, in place, and dequantizes int8/fp8 rows as it reads
  them). Otherwise (no numba, off CPU, or ``decode_kernel="gather"``) they attend in
  batched SDPA calls over their gathered blocks, with a key mask for the ragged ends:
  on CPU a few chunks of similar lengths sized to stay in the CPU's cache
  (``chunk_by_blocks``), elsewhere one call unless lengths are so ragged that padding
  everything to the longest costs more (``bucket_by_blocks``). The gather path is the
  reference the fused one is tested against; ``decode_kernel="gather"`` selects it;
- multi-token (prefill / chunked-prefill) sequences attend causally over their paged
  prefix with ``scaled_dot_product_attention``, one call each (they are few per step).

Everything derived from the metadata (gather indices, masks) is computed once per step
by ``prepare`` and shared by all layers.

A quantized cache (``minipaged.attention.kv_quant.QuantizedCache``) is written through
``kv_quant.write_slots`` and, outside the fused decode kernel, read through
``kv_quant.gather_blocks``, which gathers the 1-byte blocks and dequantizes after the
gather; prefills then always read their keys back
from the cache, so attention sees the rounded values the kernels see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from minipaged.attention import kv_quant
from minipaged.attention.metadata import AttentionMetadata
from minipaged_kernels import cpu as cpu_kernels

# Cost model for splitting a step's decodes into length buckets, in "key rows" (one
# sequence attending over one key): each bucket costs its padded keys plus a fixed
# per-call overhead (gather + SDPA + scatter launches), so only long, ragged batches split.
BUCKET_OVERHEAD_KEY_ROWS = 2048
# On CPU, decodes are instead sorted by length and cut into chunks whose gathered K and
# V fit in this many bytes, so SDPA reads them back from the CPU's cache instead of DRAM
# (the size matters most where the last-level cache is small; CPUs with large per-core
# L2 are flat over 1-32 MB), and each chunk pads its sequences only to the longest of
# similar lengths. A chunk's fixed cost (two gathers, one SDPA call, Python) is counted
# as this many blocks of padding when choosing the cuts (flat over 8-32). Re-measure with
# ``python -m minipaged.benchmarks.step --decode-kernel gather --batch 64 --context 350 --ragged``.
CPU_GATHER_CHUNK_BYTES = 3 << 20
CPU_CHUNK_OVERHEAD_BLOCKS = 16
# How CPU decodes attend: "fused" (minipaged_kernels.cpu.decode_attention, needs numba),
# "gather" (block gather + SDPA), or "auto" (fused when numba imports).
DECODE_KERNELS = ("auto", "fused", "gather")
# Compute dtypes the fused kernel handles (a quantized cache's is the model dtype); others gather.
FUSED_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_decode_available() -> bool:
    """Whether the numba CPU decode kernel can run here (numba imports)."""
    return cpu_kernels.load("decode_attention") is not None


@dataclass(frozen=True)
class DecodeBatch:
    """Some one-new-token sequences of a step, padded to their longest one's number of blocks."""

    rows: slice | torch.Tensor  # which query rows are these decode tokens (a slice when contiguous)
    block_ids: torch.Tensor  # int64 [num_seqs * max_blocks], each sequence's blocks in logical order
    max_blocks: int
    max_context_len: int  # keys attended: the gathered blocks cut to the longest context
    key_bias: (
        torch.Tensor | None
    )  # [num_seqs, 1, 1, max_context_len] 0 for real keys, -inf past a shorter context; None if all equal


@dataclass(frozen=True)
class PrefillSeq:
    """One multi-token sequence: query rows ``start:end`` attending over ``context_len`` keys."""

    start: int
    end: int
    context_len: int
    block_ids: torch.Tensor  # int64 [ceil(context_len / block_size)]
    causal_mask: torch.Tensor | None  # bool [end - start, context_len]; None without a cached prefix


@dataclass(frozen=True)
class FusedDecode:
    """All one-new-token sequences of a step, for one call of the fused CPU kernel per layer."""

    rows: slice | torch.Tensor  # which query rows are these decode tokens
    block_tables: np.ndarray  # int32 [num_seqs, max_blocks], each sequence's blocks in logical order
    context_lens: np.ndarray  # int32 [num_seqs]


@dataclass(frozen=True)
class TorchAttentionPlan:
    block_size: int
    decodes: tuple[DecodeBatch, ...]  # length buckets of the one-token sequences (gather path)
    prefills: tuple[PrefillSeq, ...]
    fused_decode: FusedDecode | None = None  # set instead of ``decodes`` on the fused path


class TorchAttentionBackend:
    """Pure-PyTorch paged attention (see module docstring)."""

    name = "torch"

    def __init__(
        self,
        bucket_overhead_key_rows: int = BUCKET_OVERHEAD_KEY_ROWS,
        cpu_gather_chunk_bytes: int | None = CPU_GATHER_CHUNK_BYTES,
        cpu_chunk_overhead_blocks: int = CPU_CHUNK_OVERHEAD_BLOCKS,
        decode_kernel: str = "auto",
    ) -> None:
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}")
        if decode_kernel == "fused" and not fused_decode_available():
            raise ValueError("decode_kernel='fused' needs numba: pip install 'minipaged[cpu]'")
        self.bucket_overhead_key_rows = bucket_overhead_key_rows
        self.cpu_gather_chunk_bytes = cpu_gather_chunk_bytes
        self.cpu_chunk_overhead_blocks = cpu_chunk_overhead_blocks
        self.decode_kernel = decode_kernel

    def uses_fused_decode(self, k_cache: kv_quant.KVCache) -> bool:
        """The dispatch point: whether decodes over ``k_cache`` go to the fused CPU kernel.

        Quantized caches qualify too: the kernel widens their 1-byte rows and applies the
        scales itself, as the Triton kernel does.
        """
        if (
            self.decode_kernel == "gather"
            or k_cache.device.type != "cpu"
            or kv_quant.compute_dtype(k_cache) not in FUSED_CACHE_DTYPES
        ):
            return False
        return self.decode_kernel == "fused" or fused_decode_available()

    def prepare(self, meta: AttentionMetadata, k_cache: kv_quant.KVCache) -> AttentionMetadata:
        """Return ``meta`` with a ``TorchAttentionPlan`` for caches shaped like ``k_cache`` (once per step)."""
        block_size = k_cache.shape[1]
        if isinstance(meta.backend_plan, TorchAttentionPlan) and meta.backend_plan.block_size == block_size:
            return meta
        chunk_bytes = self.cpu_gather_chunk_bytes if k_cache.device.type == "cpu" else None
        dtype = kv_quant.compute_dtype(k_cache)
        # One block of K and of V as gathered for SDPA (after dequantization).
        block_bytes = 2 * k_cache.shape[1:].numel() * torch.empty((), dtype=dtype).element_size()
        plan = make_plan(
            meta,
            block_size,
            dtype,
            self.bucket_overhead_key_rows,
            block_bytes,
            chunk_bytes,
            self.cpu_chunk_overhead_blocks,
            fused=self.uses_fused_decode(k_cache),
        )
        return replace(meta, backend_plan=plan)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: kv_quant.KVCache,
        v_cache: kv_quant.KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write ``k``, ``v`` ``[T, Hkv, D]`` at ``meta.slot_mapping``, then attend; returns ``[T, Hq, D]``.

        ``q`` is ``[T, Hq, D]``; the caches are ``[num_blocks, block_size, Hkv, D]`` and must
        hold finite values in unused slots (``allocate_kv_cache`` zero-fills them). Every
        slot must be a real one: unlike ``minipaged_kernels.kv_append``, negative (padding) slots
        are an error here, since the engine never pads.
        """
        plan = self.prepare(meta, k_cache).backend_plan
        kv_quant.write_slots(k_cache, meta.slot_mapping, k)
        kv_quant.write_slots(v_cache, meta.slot_mapping, v)
        out = q.new_empty(q.shape)  # contiguous even though q is a strided view
        if plan.fused_decode is not None:
            fused_decode_attention(q, k_cache, v_cache, plan.fused_decode, scale, out)
        for batch in plan.decodes:
            out[batch.rows] = decode_attention(q[batch.rows], k_cache, v_cache, batch, scale)
        for seq in plan.prefills:
            rows = slice(seq.start, seq.end)
            out[rows] = prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, seq, scale)
        return out


def make_plan(
    meta: AttentionMetadata,
    block_size: int,
    dtype: torch.dtype,
    bucket_overhead: int = BUCKET_OVERHEAD_KEY_ROWS,
    block_bytes: int = 0,
    chunk_bytes: int | None = None,
    chunk_overhead_blocks: int = CPU_CHUNK_OVERHEAD_BLOCKS,
    fused: bool = False,
) -> TorchAttentionPlan:
    """Split a step into decode batches and prefill sequences, building gather indices and masks.

    With ``fused``, all decodes form one ``FusedDecode`` for the CPU kernel. Otherwise
    they go into length buckets (``bucket_by_blocks``) or, when ``chunk_bytes`` is
    given, into sorted chunks of at most that many bytes of gathered K/V
    (``chunk_by_blocks``; ``block_bytes`` is one block of K plus one of V).
    """
    if chunk_bytes is not None and block_bytes < 1:
        raise ValueError(
            f"chunk_bytes={chunk_bytes} needs the bytes of one K and V block, got block_bytes={block_bytes}"
        )
    query_lens, context_lens = meta.host_lengths()
    device = meta.block_tables.device
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode_seqs = [i for i, n in enumerate(query_lens) if n == 1]
    blocks = [-(-context_lens[i] // block_size) for i in decode_seqs]
    fused_decode = None
    if fused and decode_seqs:
        fused_decode = _make_fused_decode(meta, decode_seqs, starts, context_lens, max(blocks))
        groups = []
    elif chunk_bytes is None:
        groups = bucket_by_blocks(blocks, block_size, bucket_overhead)
    else:
        groups = chunk_by_blocks(blocks, max(1, chunk_bytes // block_bytes), chunk_overhead_blocks)
    # Row order inside a batch is free; ascending order makes consecutive rows a slice (a view).
    decodes = [
        _make_decode_batch(meta, sorted(decode_seqs[j] for j in group), starts, context_lens, block_size, dtype)
        for group in groups
    ]
    prefills = []
    for i, n in enumerate(query_lens):
        if n == 1:
            continue
        ctx = context_lens[i]
        mask = None
        if ctx > n:
            key_pos = torch.arange(ctx, device=device)
            query_pos = torch.arange(ctx - n, ctx, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        block_ids = meta.block_tables[i, : -(-ctx // block_size)].to(torch.int64)
        prefills.append(PrefillSeq(starts[i], starts[i + 1], ctx, block_ids, mask))
    return TorchAttentionPlan(block_size, tuple(decodes), tuple(prefills), fused_decode)


def bucket_by_blocks(
    num_blocks: list[int], block_size: int, overhead: int = BUCKET_OVERHEAD_KEY_ROWS
) -> list[list[int]]:
    """Group sequence indices into length buckets minimising padded key rows plus a per-bucket overhead.

    Buckets are contiguous ranges of the distinct block counts in sorted order, chosen by
    an exact dynamic program over those (few) distinct counts. One bucket when
    everything is about the same length; the original order when it is a single bucket.
    """
    if not num_blocks:
        return []
    counts: dict[int, int] = {}
    for n in num_blocks:
        counts[n] = counts.get(n, 0) + 1
    values = sorted(counts)
    best = [0.0] + [float("inf")] * len(values)  # best[j]: cost of covering values[:j]
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        seqs = 0
        for i in range(j - 1, -1, -1):
            seqs += counts[values[i]]
            cost = best[i] + seqs * values[j - 1] * block_size + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    if cut[len(values)] == 0:
        return [list(range(len(num_blocks)))]
    edges, j = [], len(values)
    while j > 0:
        edges.append((values[cut[j]], values[j - 1]))
        j = cut[j]
    return [[s for s, n in enumerate(num_blocks) if lo <= n <= hi] for lo, hi in reversed(edges)]


def chunk_by_blocks(num_blocks: list[int], max_chunk_blocks: int, overhead_blocks: int) -> list[list[int]]:
    """Group sequence indices into chunks of at most ``max_chunk_blocks`` padded blocks,
    minimising padded blocks plus ``overhead_blocks`` per chunk.

    Chunks are runs of the sequences sorted longest first (so each chunk's sequences are
    close in length and padding them to its longest gathers few blocks that attention
    then masks away), cut where an exact dynamic program over the sorted order says.
    A chunk holds at least one sequence, however long.
    """
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    lengths = [num_blocks[i] for i in order]
    best = [0] + [None] * len(order)  # best[j]: cheapest cover of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j - 1, -1, -1):
            padded = (j - i) * lengths[i]  # lengths[i] is the longest of order[i:j]
            if padded > max_chunk_blocks and i < j - 1:
                break
            cost = best[i] + padded + overhead_blocks
            if best[j] is None or cost <= best[j]:  # on a tie, the longer chunk
                best[j], cut[j] = cost, i
    chunks, j = [], len(order)
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def _as_index(ids: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice when ``ids`` are consecutive (indexing then makes views, not copies), else a tensor."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, device=device)


def _make_fused_decode(
    meta: AttentionMetadata, seqs: list[int], starts: list[int], context_lens: tuple[int, ...], max_blocks: int
) -> FusedDecode:
    index = _as_index(seqs, meta.block_tables.device)
    tables = meta.block_tables[index, :max_blocks].to(device="cpu", dtype=torch.int32).contiguous().numpy()
    lens = np.array([context_lens[i] for i in seqs], dtype=np.int32)
    return FusedDecode(_as_index([starts[i] for i in seqs], meta.block_tables.device), tables, lens)


def _make_decode_batch(
    meta: AttentionMetadata,
    seqs: list[int],
    starts: list[int],
    context_lens: tuple[int, ...],
    block_size: int,
    dtype: torch.dtype,
) -> DecodeBatch:
    device = meta.block_tables.device
    lens = [context_lens[i] for i in seqs]
    max_blocks = -(-max(lens) // block_size)
    block_ids = meta.block_tables[_as_index(seqs, device), :max_blocks].to(torch.int64).reshape(-1)
    bias = None
    if min(lens) != max(lens):
        past_end = torch.arange(max(lens), device=device)[None, :] >= torch.tensor(lens, device=device)[:, None]
        bias = torch.zeros((len(seqs), 1, 1, max(lens)), dtype=dtype, device=device)
        bias.masked_fill_(past_end[:, None, None, :], float("-inf"))
    return DecodeBatch(_as_index([starts[i] for i in seqs], device), block_ids, max_blocks, max(lens), bias)


def decode_attention(
    q: torch.Tensor, k_cache: kv_quant.KVCache, v_cache: kv_quant.KVCache, batch: DecodeBatch, scale: float
) -> torch.Tensor:
    """One query token per sequence: ``q [B, Hq, D]`` -> ``[B, Hq, D]`` over each sequence's paged keys.

    Each sequence's blocks are gathered whole (``[B, max_blocks * block_size, Hkv, D]``)
    and read head-major, cut to the longest context, through a transposed view with no
    further copy.
    The ``group`` query heads sharing a KV head play the role of SDPA's query length, so
    no KV head is repeated; keys past a sequence's length get a ``-inf`` bias.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    shape = (num_seqs, batch.max_blocks * block_size, num_kv_heads, head_dim)
    k = kv_quant.gather_blocks(k_cache, batch.block_ids).view(shape)[:, : batch.max_context_len].transpose(1, 2)
    v = kv_quant.gather_blocks(v_cache, batch.block_ids).view(shape)[:, : batch.max_context_len].transpose(1, 2)
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=batch.key_bias, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def fused_decode_attention(
    q: torch.Tensor,
    k_cache: kv_quant.KVCache,
    v_cache: kv_quant.KVCache,
    fused: FusedDecode,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write ``out[fused.rows]`` (``[B, Hq, D]``) with the numba kernel, in place when the rows are a slice."""
    (k_data, k_scale), (v_data, v_scale) = kv_quant.data_and_scale(k_cache), kv_quant.data_and_scale(v_cache)
    target = (
        out[fused.rows] if isinstance(fused.rows, slice) else q.new_empty((fused.context_lens.shape[0], *q.shape[1:]))
    )
    cpu_kernels.load("decode_attention").decode_unchecked(
        q[fused.rows], k_data, v_data, fused.block_tables, fused.context_lens, scale, target, k_scale, v_scale
    )
    if not isinstance(fused.rows, slice):
        out[fused.rows] = target


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: kv_quant.KVCache,
    v_cache: kv_quant.KVCache,
    seq: PrefillSeq,
    scale: float,
) -> torch.Tensor:
    """Several new tokens of one sequence, ``q [n, Hq, D]``, attending causally over its paged prefix.

    Without a cached prefix the keys of an unquantized cache are exactly this step's
    ``k``, ``v`` ``[n, Hkv, D]``, so the cache is not read back; a quantized cache is,
    so the prefill attends to the rounded values later steps will see.
    """
    if seq.causal_mask is not None or isinstance(k_cache, kv_quant.QuantizedCache):
        _, _, num_kv_heads, head_dim = k_cache.shape
        k = kv_quant.gather_blocks(k_cache, seq.block_ids).view(-1, num_kv_heads, head_dim)[: seq.context_len]
        v = kv_quant.gather_blocks(v_cache, seq.block_ids).view(-1, num_kv_heads, head_dim)[: seq.context_len]
    # A leading batch dimension of 1: PyTorch's CPU flash kernel takes only 4-D inputs, and
    # 3-D ones fall back to the unfused math path (2-2.5x slower for SmolLM2's prompts).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=seq.causal_mask,
        is_causal=seq.causal_mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
