"""PackedLinear (oneDNN pre-packed weights on CPU) against F.linear on the same dense weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minipaged.models.linear import (
    PackedLinear,
    PackedWeight,
    linear,
    onednn_bf16_packing_available,
    onednn_packing_available,
    pack_in_place,
    packed_gemm_disabled,
    uses_packed_gemm,
)

needs_onednn = pytest.mark.skipif(
    not onednn_packing_available(), reason="this PyTorch build has no oneDNN packed linear"
)


def fresh_layer(in_features: int, out_features: int, bias: bool) -> PackedLinear:
    layer = PackedLinear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    layer = fresh_layer(96, 160, bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        assert uses_packed_gemm(x, layer.weight)
        out = layer(x)
    assert out.shape == (rows, 160)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_repacks_after_in_place_edit_and_load_state_dict():
    layer = fresh_layer(32, 48, bias=False)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # same storage, new version
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), -2.0 * first, rtol=1e-5, atol=1e-4)
    replacement = torch.randn(48, 32)
    layer.load_state_dict({"weight": replacement}, assign=True)  # a different tensor
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, replacement), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not onednn_bf16_packing_available(), reason="oneDNN has no bf16 inner product on this CPU")
@pytest.mark.parametrize("rows", [1, 64])
def test_bf16_packed_matches_f_linear(rows):
    layer = fresh_layer(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert uses_packed_gemm(x, layer.weight)
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_take_the_plain_path(dtype):
    if dtype == torch.bfloat16 and onednn_bf16_packing_available():
        pytest.skip("bf16 is packed on this CPU (test_bf16_packed_matches_f_linear)")
    layer = fresh_layer(16, 24, bias=True).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    assert not uses_packed_gemm(x, layer.weight)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_autograd_takes_the_plain_path_and_gets_gradients():
    layer = fresh_layer(16, 24, bias=True)
    x = torch.randn(4, 16, requires_grad=True)
    assert not uses_packed_gemm(x, layer.weight)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


@needs_onednn
def test_tied_head_helper_tracks_the_shared_weight():
    embedding = torch.randn(50, 12)
    packed = PackedWeight()
    h = torch.randn(3, 12)
    with torch.inference_mode():
        torch.testing.assert_close(linear(h, embedding, None, packed), h @ embedding.T, rtol=1e-5, atol=1e-4)
    embedding[7].fill_(3.0)
    with torch.inference_mode():
        torch.testing.assert_close(linear(h, embedding, None, packed), h @ embedding.T, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_pack_in_place_replaces_dense_weights_and_keeps_the_products():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        fresh_layer(40, 72, bias=True), torch.nn.ReLU(), fresh_layer(72, 24, bias=False), torch.nn.Linear(24, 8)
    )  # a plain nn.Linear is not ours to repack
    trained = fresh_layer(24, 8, bias=False)  # a weight that trains keeps its dense form
    model.append(trained)
    model.requires_grad_(False)  # as the loader leaves a model
    trained.weight.requires_grad_(True)
    dense = {i: model[i].weight.detach().clone() for i in (0, 2)}
    x = torch.randn(9, 40)
    with torch.inference_mode():
        want = model[:4](x)
    assert pack_in_place(model) == (72 * 40 + 24 * 72) * 4
    assert model[0].weight.is_mkldnn and model[2].weight.is_mkldnn
    assert not model[3].weight.is_mkldnn and not trained.weight.is_mkldnn
    for i, w in dense.items():
        assert torch.equal(model[i].weight.to_dense(), w)  # the packed weight is the same numbers
    with torch.inference_mode():
        torch.testing.assert_close(model[:4](x), want, rtol=1e-5, atol=1e-5)
        with packed_gemm_disabled():  # the A/B path unpacks
            torch.testing.assert_close(model[:4](x), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="float32 CPU inputs only"):
            model[0](x.double())
    assert pack_in_place(model) == 0  # nothing dense is left to release


@needs_onednn
def test_pack_in_place_keeping_dense_sends_few_rows_to_the_gemv_kernel(monkeypatch):
    gemv = pytest.importorskip("minipaged_kernels.cpu.gemv")
    torch.manual_seed(4)
    layer = fresh_layer(48, 40, bias=True)
    layer.requires_grad_(False)
    dense = layer.weight.detach().clone()
    assert pack_in_place(layer, keep_dense=True) == 0  # nothing released: the dense weight stays
    assert layer.weight.is_mkldnn and torch.equal(layer.dense_weight, dense)
    few, many = torch.randn(gemv.MAX_ROWS, 48), torch.randn(gemv.MAX_ROWS + 5, 48)
    with torch.inference_mode():
        for x in (few, many):
            torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias), rtol=1e-5, atol=1e-5)
        # Which path served each: a poisoned dense weight shows in the few-row product only.
        layer.dense_weight = torch.full_like(dense, float("nan"))
        assert layer(few).isnan().all()
        assert not layer(many).isnan().any()
        # The A/B plain path multiplies by the kept dense weight with F.linear, not the kernel.
        layer.dense_weight = dense
        for name in ("linear", "linear_unchecked"):
            monkeypatch.setattr(gemv, name, lambda *args: pytest.fail("the plain path called cpu_gemv"))
        with packed_gemm_disabled():
            torch.testing.assert_close(layer(few), F.linear(few, dense, layer.bias), rtol=1e-5, atol=1e-5)
    # A weight assigned after packing retires the kept copy: few rows follow the new weight.
    monkeypatch.undo()
    fresh = torch.randn(40, 48)
    layer.load_state_dict({"weight": fresh, "bias": layer.bias.detach()}, assign=True)
    with torch.inference_mode():
        torch.testing.assert_close(layer(few), F.linear(few, fresh, layer.bias), rtol=1e-5, atol=1e-5)
