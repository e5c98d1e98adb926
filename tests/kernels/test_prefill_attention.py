"""Paged prefill/extend attention against the naive reference, torch SDPA and decode.

Caches are filled through shuffled physical blocks; every slot no sequence owns holds
NaN, and outputs are NaN before the call, so a read past a context or an unwritten
output row fails the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import minipaged_kernels
from minipaged_kernels import reference
from minipaged_kernels.prefill_attention import (
    PrefillConfig,
    all_configs,
    aot_specs,
    choose_config,
    paged_prefill_attention,
    plan_query_tiles,
    tile_reads,
)

# Max |kernel - reference| relative to max |reference|. fp16 rounds P to fp16 before
# P @ V and the output to fp16; bf16 (fp32 upcast under the interpreter) rounds the
# output to bf16's 8-bit mantissa.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    q: torch.Tensor  # [total_new_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    context_lens: torch.Tensor  # int32 [num_seqs]
    keys: list[torch.Tensor]  # per sequence, contiguous [context_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]


def make_case(
    prefix_lens: list[int],
    new_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    spare_blocks: int = 3,
) -> Case:
    """Random sequences scattered over shuffled physical blocks; unowned slots are NaN."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    physical = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(context_lens), max(blocks_per_seq)), num_blocks + 7, dtype=torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    keys, values, used = [], [], 0
    for s, (ctx, nblk) in enumerate(zip(context_lens, blocks_per_seq)):
        tables[s, :nblk] = physical[used : used + nblk].to(torch.int32)
        used += nblk
        pos = torch.arange(ctx)
        slots = tables[s, pos // block_size].long() * block_size + pos % block_size
        keys.append(torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype))
        # As in the engine: the cache is written by the KV-append kernel.
        minipaged_kernels.kv_append(keys[-1].to(device), values[-1].to(device), k_cache, v_cache, slots.to(device))
    q = torch.randn(sum(new_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32)
    return Case(
        q.to(device),
        k_cache,
        v_cache,
        tables.to(device),
        cu.to(device),
        torch.tensor(context_lens, dtype=torch.int32, device=device),
        keys,
        values,
    )


def run_kernel(case: Case, config: PrefillConfig | None = None) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))
    result = paged_prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.cu_seqlens_q,
        case.context_lens,
        out=out,
        config=config,
    )
    assert result is out
    return out


def run_reference(case: Case) -> torch.Tensor:
    return reference.paged_prefill_attention(
        case.q.double(),
        case.k_cache.double(),
        case.v_cache.double(),
        case.block_tables,
        case.cu_seqlens_q,
        case.context_lens,
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "kernel left NaN (unwritten or poisoned) outputs"
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max abs error {err:.3g} > {REL_TOL[dtype]} * {scale:.3g}"


def lengths(block_size: int) -> tuple[list[int], list[int]]:
    """(prefix, new) pairs covering 0, 1, bs-1, bs, bs+1 and ~100 on both sides."""
    bs = block_size
    prefixes = [0, 1, max(bs - 1, 1), bs, bs + 1, 0, 97]
    news = [bs + 1, bs - 1 if bs > 1 else 2, 1, bs, 0, 100, 35]
    return prefixes, news


@pytest.mark.parametrize("block_size", [1, 3, 8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_over_block_sizes(block_size, dtype, device):
    prefixes, news = lengths(block_size)
    case = make_case(
        prefixes,
        news,
        block_size=block_size,
        num_kv_heads=2,
        group=3,
        head_dim=64,
        dtype=dtype,
        device=device,
        seed=block_size,
    )
    assert_close(run_kernel(case), run_reference(case), dtype)


@pytest.mark.parametrize(
    "head_dim,group,num_kv_heads",
    [(20, 1, 2), (80, 4, 1), (96, 7, 1), (128, 8, 1), (200, 1, 1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_over_heads(head_dim, group, num_kv_heads, dtype, device):
    """Every block_d tile (32..256, ragged head_dim masked) and GQA groups 1-8."""
    case = make_case(
        [0, 16, 5],
        [17, 16, 40],
        block_size=16,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        seed=head_dim + group,
    )
    assert_close(run_kernel(case), run_reference(case), dtype)


def test_bf16_upcast_path(device):
    prefixes, news = lengths(16)
    case = make_case(
        prefixes, news, block_size=16, num_kv_heads=2, group=2, head_dim=64, dtype=torch.bfloat16, device=device, seed=5
    )
    out = run_kernel(case)
    assert out.dtype == torch.bfloat16
    assert_close(out, run_reference(case), torch.bfloat16)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64), (128, 16)])
def test_other_tile_shapes(block_m, block_n, device):
    """Many query tiles per sequence, key tiles narrower and wider than a block."""
    case = make_case(
        [3, 40, 0],
        [70, 9, 33],
        block_size=8,
        num_kv_heads=1,
        group=3,
        head_dim=48,
        dtype=torch.float32,
        device=device,
        seed=block_m + block_n,
    )
    cfg = PrefillConfig(block_m=block_m, block_n=block_n, block_d=64)
    assert_close(run_kernel(case, cfg), run_reference(case), torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_causal_early_exit_skips_future_keys(device):
    """Query tiles ending before position 32 must not read keys at 32 or later:
    those are NaN here, and even a masked-to-zero weight times NaN is NaN."""
    case = make_case(
        [0], [64], block_size=8, num_kv_heads=1, group=1, head_dim=32, dtype=torch.float32, device=device, seed=11
    )
    ref = run_reference(case)
    first_future = case.block_tables[0, 4:].long()  # logical blocks 4..7 hold positions 32..63
    case.k_cache[first_future] = float("nan")
    case.v_cache[first_future] = float("nan")
    out = run_kernel(case, PrefillConfig(block_m=16, block_n=16, block_d=32))
    assert_close(out[:32], ref[:32], torch.float32)
    assert out[32:].isnan().all(), "rows that do see the NaN keys should be NaN"


def test_plain_prefill_matches_sdpa(device):
    """Prefix 0: the same numbers as torch SDPA (causal) on contiguous K/V, an
    independent check of the reference's mask convention."""
    case = make_case(
        [0, 0, 0],
        [1, 50, 17],
        block_size=16,
        num_kv_heads=2,
        group=3,
        head_dim=64,
        dtype=torch.float32,
        device=device,
        seed=3,
    )
    out = run_kernel(case)
    cu = case.cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(zip(case.keys, case.values)):
        q = case.q[cu[s] : cu[s + 1]].transpose(0, 1).cpu()  # [heads, new, d]
        k = k.repeat_interleave(3, dim=1).transpose(0, 1)  # [heads, ctx, d]
        v = v.repeat_interleave(3, dim=1).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        assert_close(out[cu[s] : cu[s + 1]], expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_new_token_equals_decode(dtype, device):
    """A one-token extend is a decode step: both kernels must agree."""
    prefixes = [0, 7, 8, 9, 130]
    case = make_case(
        prefixes,
        [1] * len(prefixes),
        block_size=8,
        num_kv_heads=2,
        group=4,
        head_dim=80,
        dtype=dtype,
        device=device,
        seed=21,
    )
    out = run_kernel(case)
    decode = minipaged_kernels.paged_decode_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.context_lens,
        out=torch.full_like(case.q, float("nan")),
    )
    assert_close(out, decode, dtype)


def test_strided_views_int64_metadata_and_scale(device):
    """q and out as views into wider buffers (as a fused QKV projection yields),
    int64 metadata, and an explicit scale all reach the kernel."""
    case = make_case(
        [9, 0], [20, 13], block_size=8, num_kv_heads=2, group=2, head_dim=40, dtype=torch.float32, device=device, seed=8
    )
    num_tokens, num_heads, head_dim = case.q.shape
    q_buf = torch.randn(num_tokens, num_heads + 3, head_dim + 8, device=device)
    q = q_buf[:, 1 : 1 + num_heads, 4 : 4 + head_dim]
    q.copy_(case.q)
    out_buf = torch.full((num_tokens, num_heads * 2, head_dim), float("nan"), device=device)
    out = out_buf[:, ::2]
    index = dict(
        block_tables=case.block_tables.long(),
        cu_seqlens_q=case.cu_seqlens_q.long(),
        context_lens=case.context_lens.long(),
    )
    paged_prefill_attention(q, case.k_cache, case.v_cache, **index, scale=0.3, out=out)
    ref = reference.paged_prefill_attention(
        case.q.double(), case.k_cache.double(), case.v_cache.double(), **index, scale=0.3
    )
    assert_close(out, ref, torch.float32)
    assert out_buf[:, 1::2].isnan().all(), "kernel wrote outside the out view"


def test_plan_query_tiles():
    cu = torch.tensor([0, 5, 5, 70, 71], dtype=torch.int32)
    tile_seq, tile_start = plan_query_tiles(cu, 32)
    assert tile_seq.tolist() == [0, 2, 2, 2, 3]
    assert tile_start.tolist() == [0, 0, 32, 64, 0]
    tile_seq, tile_start = plan_query_tiles(cu, 16, include=torch.tensor([True, True, False, True]))
    assert tile_seq.tolist() == [0, 3] and tile_start.tolist() == [0, 0]


def test_choose_config_covers_head_dim():
    compiled = all_configs()  # what aot_specs() builds, once per cache kind (float, int8, fp8)
    assert len(aot_specs()) == 3 * len(compiled)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in range(1, 257):
            for short in (False, True):
                cfg = choose_config(head_dim, dtype, short)
                assert cfg.block_d >= head_dim and cfg.block_d & (cfg.block_d - 1) == 0
                assert min(cfg.block_m, cfg.block_n, cfg.block_d) >= 16  # tl.dot minimum
                assert (dtype, cfg) in compiled, f"{dtype} {cfg} is launched but not compiled ahead of time"


def test_no_new_tokens_returns_untouched_out(device):
    case = make_case(
        [5], [0], block_size=4, num_kv_heads=1, group=1, head_dim=32, dtype=torch.float32, device=device, seed=0
    )
    assert run_kernel(case).shape == (0, 1, 32)


def _valid_args(device):
    case = make_case(
        [4, 0], [3, 5], block_size=4, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float32, device=device, seed=1
    )
    return dict(
        q=case.q,
        k_cache=case.k_cache,
        v_cache=case.v_cache,
        block_tables=case.block_tables,
        cu_seqlens_q=case.cu_seqlens_q,
        context_lens=case.context_lens,
    )


BAD_INPUTS = {
    "q": lambda a: {"q": a["q"][0]},
    "q dtype": lambda a: {"q": a["q"].half()},
    "q head_dim": lambda a: {"q": a["q"][..., :16]},
    "q heads": lambda a: {"q": a["q"][:, :3]},
    "k_cache": lambda a: {"k_cache": a["k_cache"].int()},
    "v_cache": lambda a: {"v_cache": a["v_cache"][:, :2]},
    "cu_seqlens_q length": lambda a: {"cu_seqlens_q": a["cu_seqlens_q"][:2]},
    "cu_seqlens_q start": lambda a: {"cu_seqlens_q": a["cu_seqlens_q"] + 1},
    "cu_seqlens_q decreasing": lambda a: {"cu_seqlens_q": torch.tensor([0, 9, 8], dtype=torch.int32)},
    "cu_seqlens_q end": lambda a: {"cu_seqlens_q": torch.tensor([0, 3, 7], dtype=torch.int32)},
    "cu_seqlens_q dtype": lambda a: {"cu_seqlens_q": a["cu_seqlens_q"].float()},
    "new longer than context": lambda a: {"context_lens": torch.tensor([7, 4], dtype=torch.int32)},
    "context_lens vs table": lambda a: {"context_lens": torch.tensor([7, 100], dtype=torch.int32)},
    "block_tables id": lambda a: {"block_tables": a["block_tables"] * 0 + 10_000},
    "block_tables on meta": lambda a: {"block_tables": a["block_tables"].to("meta")},
    "q on meta": lambda a: {"q": a["q"].to("meta")},
}
EXPECTED_NAME = {
    "q": "q",
    "q dtype": "q",
    "q head_dim": "head_dim",
    "q heads": "heads",
    "k_cache": "k_cache",
    "v_cache": "v_cache",
    "cu_seqlens_q length": "cu_seqlens_q",
    "cu_seqlens_q start": "cu_seqlens_q",
    "cu_seqlens_q decreasing": "cu_seqlens_q",
    "cu_seqlens_q end": "cu_seqlens_q",
    "cu_seqlens_q dtype": "cu_seqlens_q",
    "new longer than context": "cu_seqlens_q",
    "context_lens vs table": "context_lens",
    "block_tables id": "block_tables",
    "block_tables on meta": "block_tables",
    "q on meta": "q is on meta",
}


@pytest.mark.parametrize(
    "fn", [paged_prefill_attention, reference.paged_prefill_attention], ids=["kernel", "reference"]
)
@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_raises_value_error(what, fn, device):
    args = _valid_args(device)
    args.update(BAD_INPUTS[what](args))
    with pytest.raises(ValueError, match=EXPECTED_NAME[what]):
        fn(**args)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scale": -1.0}, "scale"),
        ({"out": torch.empty(1, 4, 32)}, "out"),
        ({"config": PrefillConfig(block_m=16, block_n=16, block_d=16)}, "block_d"),
    ],
)
def test_bad_options_raise_value_error(kwargs, name, device):
    with pytest.raises(ValueError, match=name):
        paged_prefill_attention(**_valid_args(device), **kwargs)


def test_head_dim_over_256_rejected(device):
    case = make_case(
        [0], [2], block_size=4, num_kv_heads=1, group=1, head_dim=264, dtype=torch.float32, device=device, seed=0
    )
    with pytest.raises(ValueError, match="head_dim"):
        run_kernel(case)


def test_tile_reads_follow_causal_bounds():
    cu = torch.tensor([0, 40, 41], dtype=torch.int32)
    lens = torch.tensor([64, 9], dtype=torch.int32)
    reads = tile_reads(cu, lens, 16)
    assert [(r.seq, r.first_row, r.num_rows, r.prefix_len, r.key_end) for r in reads] == [
        (0, 0, 16, 24, 40),
        (0, 16, 16, 24, 56),
        (0, 32, 8, 24, 64),
        (1, 0, 1, 8, 9),
    ]
