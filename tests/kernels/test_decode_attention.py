"""Paged decode attention against the gather-then-softmax reference (float64).

Every case is a ragged batch whose context lengths are 1, block_size - 1, block_size,
block_size + 1 and several hundred, over physical blocks in shuffled order. Cache
blocks no sequence owns, cache rows past a sequence's context and unused block-table
entries are poisoned (NaN / -1), and so is ``out``: reading or skipping the wrong
thing shows up as NaN or a large error.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F
from pairwise import pairwise

import minipaged_kernels
from minipaged_kernels import decode_attention, reference

# Bound on max|out - ref| / max|ref| against the float64 reference. fp32 accumulates
# in fp32; fp16/bf16 round the output (and, for fp16, the probabilities fed to the
# P @ V dot) to 11 and 8 significant bits: 2^-11 ~ 5e-4, 2^-8 ~ 4e-3, with headroom.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

BLOCK_SIZES = (1, 8, 16, 32)
HEAD_DIMS = (40, 64, 80, 96, 128, 256)
GROUPS = (1, 3, 4, 7, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPLITS = (1, 4, None)
KV_HEADS = (1, 2)


def make_batch(context_lens, block_size, num_kv_heads, group, head_dim, dtype, device, seed):
    """Random q and a paged cache holding ``context_lens`` tokens per sequence in shuffled blocks.

    Returns ``q, k_cache, v_cache, block_tables, context_lens``.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 5
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    physical = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for seq, (n, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        ids = physical[used : used + nb]
        used += nb
        block_tables[seq, :nb] = ids.to(torch.int32)
        k = torch.randn(nb * block_size, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(nb * block_size, num_kv_heads, head_dim, generator=gen)
        k[n:] = float("nan")
        v[n:] = float("nan")
        k_cache[ids] = k.view(nb, block_size, num_kv_heads, head_dim)
        v_cache[ids] = v.view(nb, block_size, num_kv_heads, head_dim)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return tuple(
        t.to(dtype).to(device) if t.is_floating_point() else t.to(device)
        for t in (q, k_cache, v_cache, block_tables, lens)
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def check_against_reference(q, k_cache, v_cache, block_tables, lens, num_splits, scale=None):
    out = torch.full_like(q, float("nan"))
    result = minipaged_kernels.paged_decode_attention(
        q, k_cache, v_cache, block_tables, lens, scale=scale, out=out, num_splits=num_splits
    )
    assert result is out
    ref = reference.paged_decode_attention(
        q.double(), k_cache.double(), v_cache.double(), block_tables, lens, scale=scale
    )
    assert torch.isfinite(out).all(), "kernel left NaN in out or read a poisoned cache row"
    err = rel_error(out, ref)
    assert err < REL_TOL[q.dtype], f"relative error {err:.2e} above {REL_TOL[q.dtype]:.0e} for {q.dtype}"
    return out


class LaunchCounter:
    """Stands in for a Triton kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize(
    "block_size,head_dim,group,dtype,num_splits,num_kv_heads",
    pairwise([BLOCK_SIZES, HEAD_DIMS, GROUPS, DTYPES, SPLITS, KV_HEADS]),
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_decode_matches_reference(block_size, head_dim, group, dtype, num_splits, num_kv_heads, device):
    seed = zlib.crc32(repr((block_size, head_dim, group, dtype, num_splits, num_kv_heads)).encode())
    long_context = 300 + seed % 100
    lens = [1, max(block_size - 1, 1), block_size, block_size + 1, long_context]
    batch = make_batch(lens, block_size, num_kv_heads, group, head_dim, dtype, device, seed)
    check_against_reference(*batch, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_split_and_single_pass_agree(dtype, device, monkeypatch):
    """Both paths, forced, on one batch; 9 partitions of a 300-token context leave the
    short sequences with empty partitions (lse = -inf) that the merge must ignore."""
    merge = LaunchCounter(decode_attention._merge_kernel)
    monkeypatch.setattr(decode_attention, "_merge_kernel", merge)
    batch = make_batch([1, 15, 300, 40], 16, 2, 4, 96, dtype, device, seed=7)
    single = check_against_reference(*batch, num_splits=1)
    assert merge.launches == 0
    split = check_against_reference(*batch, num_splits=9)
    assert merge.launches == 1
    assert rel_error(split, single.double()) < REL_TOL[dtype]


def test_auto_rule_picks_split_for_one_long_sequence(device, monkeypatch):
    """One long sequence and one kv head: the automatic rule must take the split path,
    and a short batch must not."""
    merge = LaunchCounter(decode_attention._merge_kernel)
    monkeypatch.setattr(decode_attention, "_merge_kernel", merge)
    if device.type == "cuda":
        monkeypatch.setattr(decode_attention, "_num_sms", lambda _: decode_attention.NOMINAL_NUM_SMS)
    lens = [2 * decode_attention.SPLIT_MIN_TOKENS + 37]
    assert decode_attention.choose_num_splits(1, lens[0], decode_attention.NOMINAL_NUM_SMS) == 2
    check_against_reference(*make_batch(lens, 16, 1, 3, 64, torch.float32, device, seed=11), num_splits=None)
    assert merge.launches == 1
    check_against_reference(*make_batch([40, 7], 16, 1, 3, 64, torch.float32, device, seed=12), num_splits=None)
    assert merge.launches == 1


def test_choose_num_splits_rule():
    choose, min_tokens = decode_attention.choose_num_splits, decode_attention.SPLIT_MIN_TOKENS
    assert choose(num_programs=132, max_context_len=32768, num_sms=132) == 1  # grid already fills the GPU
    assert choose(num_programs=8, max_context_len=2 * min_tokens - 1, num_sms=132) == 1  # too short to split
    # Few programs: split towards WAVES programs per SM, capped by the tokens per partition.
    assert decode_attention.WAVES == 2 and min_tokens == 512
    assert choose(num_programs=32, max_context_len=32768, num_sms=132) == 9  # ceil(2 * 132 / 32)
    assert choose(num_programs=32, max_context_len=4096, num_sms=132) == 8  # 4096 // 512
    assert choose(num_programs=3, max_context_len=32768, num_sms=132) == 64  # 32768 // 512 < ceil(264 / 3)


def test_large_group_uses_several_head_tiles(device):
    """A group of 20 query heads spans two 16-row head tiles."""
    batch = make_batch([5, 70], 8, 1, 20, 64, torch.float32, device, seed=3)
    check_against_reference(*batch, num_splits=1)
    check_against_reference(*batch, num_splits=3)


def test_explicit_scale_and_int64_tables(device):
    q, k_cache, v_cache, block_tables, lens = make_batch([9, 33], 8, 2, 2, 80, torch.float32, device, seed=5)
    check_against_reference(q, k_cache, v_cache, block_tables.long(), lens.long(), num_splits=None, scale=0.3)


def test_strided_q_out_and_cache_views(device):
    """q sliced out of a fused QKV projection, out a slice of a wider buffer, and caches
    that are one layer's views of a [layers, 2, ...] allocation."""
    q, k_cache, v_cache, block_tables, lens = make_batch([3, 50], 8, 2, 4, 64, torch.float16, device, seed=13)
    qkv = torch.randn(2, 8 + 2 * 2, 64, dtype=torch.float16, device=device)
    qkv[:, :8] = q
    layers = torch.randn(3, 2, *k_cache.shape, dtype=torch.float16, device=device)
    layers[1, 0], layers[1, 1] = k_cache, v_cache
    wide = torch.full((2, 8, 3 * 64), float("nan"), dtype=torch.float16, device=device)
    out = wide[:, :, 64:128]
    minipaged_kernels.paged_decode_attention(qkv[:, :8], layers[1, 0], layers[1, 1], block_tables, lens, out=out)
    ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), block_tables, lens)
    assert rel_error(out, ref) < REL_TOL[torch.float16]
    assert torch.isnan(wide[:, :, :64]).all() and torch.isnan(wide[:, :, 128:]).all()


def test_reference_matches_sdpa_on_contiguous_cache(device):
    """Guard the reference itself: on one sequence it equals PyTorch SDPA with GQA."""
    q, k_cache, v_cache, block_tables, lens = make_batch([37], 8, 2, 3, 64, torch.float64, device, seed=9)
    ref = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, lens)
    order = block_tables[0, :5].long()
    k = k_cache[order].reshape(-1, 2, 64)[:37].transpose(0, 1)  # [kv_heads, n, d]
    v = v_cache[order].reshape(-1, 2, 64)[:37].transpose(0, 1)
    sdpa = F.scaled_dot_product_attention(q[0].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
    torch.testing.assert_close(ref[0], sdpa, rtol=1e-12, atol=1e-12)
