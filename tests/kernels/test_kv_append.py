"""KV-append kernel against the Python-loop reference: bit-exact, padding slots untouched."""

import zlib

import pytest
import torch
from pairwise import pairwise

import minipaged_kernels
from minipaged_kernels import reference

BLOCK_SIZES = (1, 8, 16, 32)
HEAD_DIMS = (8, 64, 80, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def _case(block_size, head_dim, dtype, slot_dtype, device, num_kv_heads=2, num_tokens=23, num_blocks=None):
    """Random old cache contents, new tokens, and a shuffled slot mapping with padding."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((block_size, head_dim, dtype, slot_dtype)).encode()))
    num_blocks = num_blocks or max(3, 2 * num_tokens // block_size + 2)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    padding = torch.rand(num_tokens, generator=gen) < 0.25
    slots[padding] = -torch.randint(1, 9, (int(padding.sum()),), generator=gen)
    return key, value, k_cache, v_cache, slots.to(slot_dtype).to(device)


@pytest.mark.parametrize(
    "block_size,head_dim,dtype,slot_dtype",
    pairwise([BLOCK_SIZES, HEAD_DIMS, DTYPES, SLOT_DTYPES]),
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_kv_append_matches_reference_bit_exact(block_size, head_dim, dtype, slot_dtype, device):
    key, value, k_cache, v_cache, slots = _case(block_size, head_dim, dtype, slot_dtype, device)
    k_old, v_old = k_cache.clone(), v_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    minipaged_kernels.kv_append(key, value, k_cache, v_cache, slots)
    reference.kv_append(key, value, k_ref, v_ref, slots)

    assert torch.equal(_bits(k_cache), _bits(k_ref))
    assert torch.equal(_bits(v_cache), _bits(v_ref))
    # Independently of the reference: written slots hold the tokens, every other slot
    # keeps its old bits (padding tokens wrote nothing).
    flat_k, flat_v = _bits(k_cache).flatten(0, 1), _bits(v_cache).flatten(0, 1)
    real = slots >= 0
    assert torch.equal(flat_k[slots[real].long()], _bits(key)[real])
    assert torch.equal(flat_v[slots[real].long()], _bits(value)[real])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[real].long().cpu()] = False
    assert torch.equal(flat_k[untouched], _bits(k_old).flatten(0, 1)[untouched])
    assert torch.equal(flat_v[untouched], _bits(v_old).flatten(0, 1)[untouched])


@pytest.mark.parametrize("head_dim", [8, 80, 200])
def test_kv_append_strided_key_value(head_dim, device):
    """Keys and values sliced out of a fused QKV projection (row stride > heads x head_dim)."""
    num_tokens, num_kv_heads, block_size = 9, 3, 4
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=torch.float16, device=device)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    shape = (5, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
    slots = torch.tensor([19, 0, -1, 7, 4, 13, -3, 2, 11], dtype=torch.int32, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    minipaged_kernels.kv_append(key, value, k_cache, v_cache, slots)
    reference.kv_append(key, value, k_ref, v_ref, slots)

    assert torch.equal(_bits(k_cache), _bits(k_ref))
    assert torch.equal(_bits(v_cache), _bits(v_ref))
    assert int(torch.isnan(k_cache).any(-1).any(-1).sum()) == 5 * block_size - 7


def test_kv_append_all_padding_and_empty(device):
    key, value, k_cache, v_cache, slots = _case(8, 64, torch.float32, torch.int64, device)
    k_old = k_cache.clone()
    minipaged_kernels.kv_append(key, value, k_cache, v_cache, torch.full_like(slots, -1))
    minipaged_kernels.kv_append(key[:0], value[:0], k_cache, v_cache, slots[:0])
    assert torch.equal(_bits(k_cache), _bits(k_old))
