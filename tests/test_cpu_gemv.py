"""The numba few-row linear (kernels.cpu_gemv) against F.linear in float64.

Fresh random operands each run, SmolLM2's shapes and odd ones, one and two threads,
with and without bias; and the refusals that send a product back to the packed path.
"""
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from kernels import cpu_gemv  # noqa: E402


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize("in_features, out_features", [(576, 960), (1536, 576), (7, 3), (64, 1)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(in_features, out_features, rows, with_bias, threads):
    scale = random.uniform(0.1, 10.0)
    x = torch.randn(rows, in_features) * scale
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    bias = torch.randn(out_features) if with_bias else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_gemv.linear(x, weight, bias)
    finally:
        torch.set_num_threads(previous)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
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
    }
    for why, (x, w) in refused.items():
        assert not cpu_gemv.applies_to(x, w), why
        with pytest.raises(ValueError, match="cpu_gemv.linear takes"):
            cpu_gemv.linear(x, w)
    with pytest.raises(ValueError, match="bias must be"):
        cpu_gemv.linear(torch.randn(2, 16), weight, torch.randn(9))
    grad_weight = weight.clone().requires_grad_(True)
    assert not cpu_gemv.applies_to(torch.randn(2, 16), grad_weight)
    with torch.no_grad():
        assert cpu_gemv.applies_to(torch.randn(2, 16), grad_weight)
