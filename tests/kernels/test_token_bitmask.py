"""Token-bitmask kernel and its torch path against the bit-by-bit Python reference.

Random masks over vocabularies that are and are not multiples of 32; the logits live
inside a larger poisoned buffer (a strided view), so a write outside the view's columns,
or past the ragged vocabulary edge, shows up as a changed poison value.
"""

import zlib

import pytest
import torch

import minipaged_kernels  # noqa: F401 - turns on the interpreter without a GPU
from minipaged_kernels.token_bitmask import (
    apply_token_bitmask,
    apply_token_bitmask_torch,
    reference_apply_token_bitmask,
    unpack_bitmask,
)

POISON = 12345.0


def _case(rows: int, vocab: int, density: float, dtype: torch.dtype):
    """(buffer, logits view into it, bitmask): the view skips a poisoned column on each side."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rows, vocab, density, dtype)).encode()))
    words = (vocab + 31) // 32
    allowed = torch.rand(rows, words * 32, generator=gen) < density
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    packed = (allowed.view(rows, words, 32).long() * weights).sum(-1)
    bitmask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    buffer = torch.full((rows, vocab + 2), POISON, dtype=dtype)
    buffer[:, 1:-1] = torch.randn(rows, vocab, generator=gen).to(dtype)
    return buffer, buffer[:, 1:-1], bitmask


CASES = [(1, 31, 0.5), (3, 32, 0.3), (2, 100, 0.9), (4, 1030, 0.5), (2, 2100, 0.02), (1, 64, 0.0), (2, 33, 1.0)]


@pytest.mark.parametrize("rows, vocab, density", CASES)
@pytest.mark.parametrize("impl", [apply_token_bitmask, apply_token_bitmask_torch])
def test_matches_reference_and_writes_nothing_else(rows, vocab, density, impl):
    buffer, logits, bitmask = _case(rows, vocab, density, torch.float32)
    expected = reference_apply_token_bitmask(logits, bitmask)
    out = impl(logits, bitmask)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert bool((buffer[:, 0] == POISON).all()) and bool((buffer[:, -1] == POISON).all())


def test_reference_is_independent_of_the_unpack():
    # One hand-made row: only tokens 0, 5 and 33 (word 1, bit 1) and 31 (the sign bit) allowed.
    bitmask = torch.tensor([[(1 << 0) | (1 << 5) | -(1 << 31), 1 << 1]], dtype=torch.int32)
    logits = torch.zeros(1, 40)
    out = reference_apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 5, 31, 33]
    assert unpack_bitmask(bitmask, 40)[0].nonzero().flatten().tolist() == [0, 5, 31, 33]


def test_half_precision_logits():
    _buffer, logits, bitmask = _case(2, 77, 0.4, torch.float16)
    expected = reference_apply_token_bitmask(logits, bitmask)
    apply_token_bitmask(logits, bitmask)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "logits, bitmask",
    [
        (torch.zeros(2, 64), torch.zeros(2, 3, dtype=torch.int32)),
        (torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64)),
        (torch.zeros(2, 64), torch.zeros(3, 2, dtype=torch.int32)),
        (torch.zeros(64), torch.zeros(2, dtype=torch.int32)),
    ],
)
def test_bad_shapes_are_value_errors(logits, bitmask):
    for impl in (apply_token_bitmask, apply_token_bitmask_torch):
        with pytest.raises(ValueError):
            impl(logits, bitmask)
