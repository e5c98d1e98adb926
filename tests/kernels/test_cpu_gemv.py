"""The numba few-row linear (minipaged_kernels.cpu.gemv) against F.linear in float64.

Fresh random operands each run (the seed is in the test's output when it fails),
SmolLM2's shapes and odd ones, the serial and the parallel launcher, with and without
bias; and the refusals that send a product back to the packed path.
"""

import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from minipaged_kernels.cpu import gemv as cpu_gemv  # noqa: E402


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


def _operands(rows, in_features, out_features, with_bias):
    seed = random.randrange(2**31)
    print(f"seed {seed}")  # shown by pytest when the test fails
    gen = torch.Generator().manual_seed(seed)
    scale = 0.1 + 10.0 * torch.rand((), generator=gen).item()
    x = torch.randn(rows, in_features, generator=gen) * scale
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    return x, weight, bias, scale


@pytest.mark.parametrize("in_features, out_features", [(576, 960), (1536, 576), (7, 3), (64, 1)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(in_features, out_features, rows, with_bias, threads):
    x, weight, bias, scale = _operands(rows, in_features, out_features, with_bias)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_gemv.linear(x, weight, bias)
    finally:
        torch.set_num_threads(previous)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(x, weight, bias), rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("chunks", [1, 3, 8, 40])
def test_parallel_launcher_covers_every_row_once(chunks):
    # Called directly, so its row ranges are checked however many threads this machine
    # has (linear() runs the serial launcher with one thread); 40 chunks > 33 rows
    # leaves some chunks empty.
    x, weight, bias, scale = _operands(3, 128, 33, with_bias=True)
    out = torch.full((3, 33), float("nan"))
    cpu_gemv._rows_parallel(x.numpy(), weight.numpy(), bias.numpy(), out.numpy(), chunks)
    torch.testing.assert_close(out, _reference(x, weight, bias), rtol=2e-5, atol=2e-5 * scale)


def test_strided_input_rows():
    # A row slice of a wider activation (as the model's views are) is read as its values.
    wide = torch.randn(3, 200)
    x = wide[:, 10:138]
    weight = torch.randn(33, 128)
    torch.testing.assert_close(cpu_gemv.linear(x, weight), _reference(x, weight, None), rtol=2e-5, atol=2e-5)


def test_refuses_what_it_does_not_take():
    weight = torch.randn(8, 16)
    assert cpu_gemv.applies_to(torch.randn(cpu_gemv.MAX_ROWS, 16), weight)
    refused = {
        "too many rows": (torch.randn(cpu_gemv.MAX_ROWS + 1, 16), weight),
        "no rows": (torch.randn(0, 16), weight),
        "fp64 input": (torch.randn(2, 16, dtype=torch.float64), weight),
        "bf16 weight": (torch.randn(2, 16), weight.bfloat16()),
        "wrong in_features": (torch.randn(2, 15), weight),
        "1-d input": (torch.randn(16), weight),
        "oneDNN-packed weight": (torch.randn(2, 16), weight.to_mkldnn()),
        "meta weight": (torch.randn(2, 16), weight.to("meta")),
    }
    for why, (x, w) in refused.items():
        assert not cpu_gemv.applies_to(x, w), why
        with pytest.raises(ValueError, match="cpu_gemv.linear takes"):
            cpu_gemv.linear(x, w)
    x = torch.randn(2, 16)
    for bad_bias in (torch.randn(9), torch.randn(8, dtype=torch.float64)):
        assert not cpu_gemv.applies_to(x, weight, bad_bias)
        with pytest.raises(ValueError, match="bias"):
            cpu_gemv.linear(x, weight, bad_bias)
    grad_weight = weight.clone().requires_grad_(True)
    assert not cpu_gemv.applies_to(torch.randn(2, 16), grad_weight)
    with torch.no_grad():
        assert cpu_gemv.applies_to(torch.randn(2, 16), grad_weight)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_weight_matches_f_linear_and_sees_in_place_edits(rows, with_bias):
    x, weight, bias, scale = _operands(rows, 576, 960, with_bias)
    prepared = cpu_gemv.DenseWeight(weight)
    assert prepared.takes(x, bias)
    torch.testing.assert_close(prepared.linear(x, bias), _reference(x, weight, bias), rtol=2e-5, atol=2e-5 * scale)
    weight[5].fill_(float("nan"))  # the prepared weight is a view of the tensor, not a copy
    assert prepared.linear(x, bias)[:, 5].isnan().all()


def test_dense_weight_checks_what_applies_to_checks():
    weight = torch.randn(8, 16)
    prepared = cpu_gemv.DenseWeight(weight)
    inputs = [
        torch.randn(cpu_gemv.MAX_ROWS, 16),
        torch.randn(cpu_gemv.MAX_ROWS + 1, 16),
        torch.randn(0, 16),
        torch.randn(2, 16, dtype=torch.float64),
        torch.randn(2, 15),
        torch.randn(16),
        torch.randn(2, 16, device="meta"),
        torch.randn(2, 16).requires_grad_(True),
    ]
    biases = [None, torch.randn(8), torch.randn(9), torch.randn(8, dtype=torch.float64)]
    for x in inputs:
        for bias in biases:
            assert prepared.takes(x, bias) == cpu_gemv.applies_to(x, weight, bias), (tuple(x.shape), x.dtype, bias)
    for bad in (weight.bfloat16(), weight.to_mkldnn(), weight.to("meta"), weight.t(), torch.randn(8)):
        assert not cpu_gemv.weight_applies(bad)
        with pytest.raises(ValueError, match="DenseWeight takes"):
            cpu_gemv.DenseWeight(bad)
