"""Random packed weights for the weight-only quantization tests (formats, Triton kernels, CPU kernel)."""

from __future__ import annotations

import random

import torch

from minipaged_kernels.quant_formats import PackedWeight


def seeded_generator() -> torch.Generator:
    """A generator with a fresh seed, printed so that a failing test shows it."""
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def random_packed(
    k: int,
    n: int,
    bits: int,
    group_size: int | None,
    *,
    shuffled: bool = False,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    gen: torch.Generator | None = None,
) -> PackedWeight:
    """A random :class:`PackedWeight` ``[K, N]``; ``group_size`` ``None`` is per-channel; ``shuffled``: a
    permuted (desc_act) ``g_idx``; asymmetric zeros avoid 0 (GPTQ v1 cannot store it)."""
    from minipaged_kernels.quant_formats import pack_int32

    gen = gen or seeded_generator()
    gs = k if group_size is None else group_size
    groups = k // gs
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    if symmetric:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = ((torch.rand(groups, n, generator=gen) + 0.05) * 0.02).to(scale_dtype)
    g_idx = None
    if shuffled:
        g_idx = (torch.arange(k, dtype=torch.int32) // gs)[torch.randperm(k, generator=gen)].contiguous()
    return PackedWeight(pack_int32(q, bits), scales, zeros, g_idx, bits, gs, k, n)


def assert_same_packed(a: PackedWeight, b: PackedWeight) -> None:
    """Field-by-field equality of two packed weights (bit-exact tensors, the same group of every row)."""
    assert (a.bits, a.group_size, a.in_features, a.out_features) == (
        b.bits,
        b.group_size,
        b.in_features,
        b.out_features,
    )
    assert torch.equal(a.qweight, b.qweight)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.group_index(), b.group_index())  # a g_idx equal to k // group_size may be dropped
