"""Attention backends over the paged cache: the torch backend against the naive kernel
references and a per-token float64 softmax, the Triton backend (interpreted) against
the torch backend, and the cache helpers."""

from __future__ import annotations

import random

import pytest
import torch

import minipaged_kernels
from minipaged.attention import (
    allocate_kv_cache,
    build_metadata,
    build_positions,
    get_attention_backend,
    kv_cache_bytes_per_block,
)
from minipaged.models.config import ModelConfig


def random_paged_step(query_lens, context_lens, block_size, num_kv_heads, group, head_dim, dtype, seed=0):
    """Random caches (stale garbage everywhere), shuffled block tables, and this step's q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables = []
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(ids[:n])
        ids = ids[n:]
    meta = build_metadata(query_lens, context_lens, tables, block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, dtype=dtype)
    tokens = sum(query_lens)
    q = torch.randn(tokens, num_kv_heads * group, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v, k_cache, v_cache, meta


def per_token_reference(q, k_cache, v_cache, meta, scale):
    """Float64 softmax attention, one query token at a time, each over positions <= its own."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    cu = meta.cu_seqlens_q.tolist()
    for seq, ctx in enumerate(meta.context_lens.tolist()):
        blocks = meta.block_tables[seq, : -(-ctx // block_size)].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[3])[:ctx].double()
        values = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[3])[:ctx].double()
        num_new = cu[seq + 1] - cu[seq]
        for i in range(num_new):
            visible = ctx - num_new + i + 1
            for h in range(q.shape[1]):
                scores = keys[:visible, h // group] @ q[cu[seq] + i, h].double() * scale
                out[cu[seq] + i, h] = torch.softmax(scores, 0) @ values[:visible, h // group]
    return out


MIXED = [  # (query_lens, context_lens): decodes, fresh prompts, chunks after a prefix, block-edge lengths
    ([1, 1, 1], [1, 4, 9]),
    ([5, 1, 4, 1, 9], [5, 17, 12, 4, 9]),
    ([1, 3, 1, 8, 1], [40, 3, 16, 8, 33]),
]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("lens", MIXED)
def test_torch_backend_matches_per_token_softmax(block_size, group, lens):
    q, k, v, k_cache, v_cache, meta = random_paged_step(
        *lens, block_size, 2, group, 16, torch.float64, seed=block_size + group
    )
    out = get_attention_backend("torch", "cpu").forward(q, k, v, k_cache, v_cache, meta, 0.3)
    slots = meta.slot_mapping
    torch.testing.assert_close(k_cache.view(-1, 2, 16)[slots], k)
    torch.testing.assert_close(v_cache.view(-1, 2, 16)[slots], v)
    torch.testing.assert_close(out, per_token_reference(q, k_cache, v_cache, meta, 0.3), rtol=1e-10, atol=1e-10)


def test_ragged_decodes_split_into_length_buckets_and_chunks():
    from minipaged.attention.torch_backend import TorchAttentionBackend, bucket_by_blocks, chunk_by_blocks

    assert bucket_by_blocks([13] * 64, 16) == [list(range(64))]
    assert sorted(map(sorted, bucket_by_blocks([1, 9, 1, 9, 30], 16, overhead=0))) == [[0, 2], [1, 3], [4]]
    # Sorted longest first; cut where padding outweighs a chunk's overhead, never above the cap.
    assert chunk_by_blocks([1, 9, 1, 9, 30], max_chunk_blocks=100, overhead_blocks=0) == [[4], [1, 3], [0, 2]]
    assert chunk_by_blocks([1, 9, 1, 9, 30], max_chunk_blocks=100, overhead_blocks=1000) == [[4], [1, 3, 0, 2]]
    chunks = chunk_by_blocks([5] * 7, max_chunk_blocks=10, overhead_blocks=1000)
    assert sorted(map(len, chunks)) == [1, 2, 2, 2] and sorted(sum(chunks, [])) == list(range(7))
    assert chunk_by_blocks([50, 2], max_chunk_blocks=10, overhead_blocks=0) == [
        [0],
        [1],
    ]  # too long for any chunk: alone
    query_lens = [1, 1, 6, 1, 1, 1, 2, 1]
    context_lens = [70, 2, 6, 65, 3, 33, 40, 1]
    q, k, v, k_cache, v_cache, meta = random_paged_step(query_lens, context_lens, 4, 2, 3, 16, torch.float64, seed=4)
    on_gpu = TorchAttentionBackend(
        bucket_overhead_key_rows=0, cpu_gather_chunk_bytes=None
    )  # the bucket path, as on CUDA
    expected = None
    for backend, at_least in [
        (on_gpu, 3),
        (TorchAttentionBackend(cpu_chunk_overhead_blocks=0), 4),  # one chunk per distinct length
        (TorchAttentionBackend(cpu_gather_chunk_bytes=1), 6),
    ]:  # one sequence per chunk
        assert len(backend.prepare(meta, k_cache).backend_plan.decodes) >= at_least
        out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.2)
        expected = per_token_reference(q, k_cache, v_cache, meta, 0.2) if expected is None else expected
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def _reference_step(q, k, v, k_cache, v_cache, meta, scale):
    minipaged_kernels.reference.kv_append(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.max_query_len == 1:
        return minipaged_kernels.reference.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale=scale
        )
    if not hasattr(minipaged_kernels.reference, "paged_prefill_attention"):
        pytest.skip("minipaged_kernels.reference.paged_prefill_attention has not landed yet")
    return minipaged_kernels.reference.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale=scale
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens", MIXED + [([1] * 24, list(range(3, 99, 4)))])
def test_torch_backend_matches_kernel_reference(dtype, lens):
    q, k, v, k_cache, v_cache, meta = random_paged_step(*lens, 8, 3, 3, 64, dtype, seed=7)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = _reference_step(q, k, v, ref_k, ref_v, meta, 0.125)
    out = get_attention_backend("torch", "cpu").forward(q, k, v, k_cache, v_cache, meta, 0.125)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, expected, **tol)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def _kernels_available() -> bool:
    q, k, v, k_cache, v_cache, meta = random_paged_step([1], [3], 4, 1, 1, 16, torch.float32)
    try:
        minipaged_kernels.kv_append(k, v, k_cache, v_cache, meta.slot_mapping)
        minipaged_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens)
        minipaged_kernels.paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens
        )
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("lens", [MIXED[0], MIXED[1]])
def test_triton_backend_matches_torch_backend(lens):
    if not _kernels_available():
        pytest.skip("kernels still raise NotImplementedError")
    q, k, v, k_cache, v_cache, meta = random_paged_step(*lens, 4, 2, 2, 16, torch.float32, seed=11)
    tri_k, tri_v = k_cache.clone(), v_cache.clone()
    expected = get_attention_backend("torch", "cpu").forward(q, k, v, k_cache, v_cache, meta, 0.25)
    out = get_attention_backend("triton", "cpu").forward(q, k, v, tri_k, tri_v, meta, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tri_k, k_cache) and torch.equal(tri_v, v_cache)


def test_get_attention_backend_picks_and_rejects():
    assert get_attention_backend(None, "cpu").name == "torch"
    assert get_attention_backend("torch", torch.device("cpu")).name == "torch"
    assert get_attention_backend("triton", "cpu").name == "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        get_attention_backend("flash", "cpu")


def test_build_metadata_slots_and_positions():
    meta = build_metadata([2, 1], [5, 3], [[7, 2], [4]], block_size=4)
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 4 * 4 + 2]  # positions 3, 4 | 2
    assert build_positions([2, 1], [5, 3]).tolist() == [3, 4, 2]
    assert meta.cu_seqlens_q.tolist() == [0, 2, 3] and meta.cu_seqlens_q.dtype == torch.int32
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.tolist() == [[7, 2], [4, 0]]
    assert (meta.max_query_len, meta.max_context_len) == (2, 5)
    with pytest.raises(ValueError, match="block_tables\\[0\\]"):
        build_metadata([2], [9], [[1, 2]], block_size=4)
    with pytest.raises(ValueError, match="context_lens\\[0\\]"):
        build_metadata([4], [3], [[1]], block_size=4)


def test_kv_cache_allocation_and_size():
    config = ModelConfig("llama", 10, 12, 20, 3, 4, 2, 6, 1e-6, 1e4, None, 64, False, False, (2,), 1)
    caches = allocate_kv_cache(config, 5, 8, torch.float16, "cpu")
    assert len(caches) == 3
    for k, v in caches:
        assert k.shape == v.shape == (5, 8, 2, 6) and k.dtype == torch.float16
        assert not k.any() and not v.any() and k.data_ptr() != v.data_ptr()
    total = sum(k.nbytes + v.nbytes for k, v in caches)
    assert kv_cache_bytes_per_block(config, 8, torch.float16) * 5 == total
    with pytest.raises(ValueError, match="num_blocks"):
        allocate_kv_cache(config, 0, 8, torch.float32, "cpu")
