"""Bad arguments to kv_append and paged_decode_attention raise ValueError naming the argument.

Each case starts from a valid call, breaks one thing, and checks both the kernel
wrapper and the reference refuse it (they share the checks, so a call one accepts the
other accepts too).
"""

from collections.abc import Callable

import pytest
import torch

import minipaged_kernels
from minipaged_kernels import reference


def _append_args() -> dict:
    return {
        "key": torch.randn(4, 2, 80, dtype=torch.float16),
        "value": torch.randn(4, 2, 80, dtype=torch.float16),
        "k_cache": torch.zeros(3, 8, 2, 80, dtype=torch.float16),
        "v_cache": torch.zeros(3, 8, 2, 80, dtype=torch.float16),
        "slot_mapping": torch.tensor([0, 9, -1, 23], dtype=torch.int32),
    }


def _decode_args() -> dict:
    return {
        "q": torch.randn(2, 6, 64),
        "k_cache": torch.randn(5, 4, 2, 64),
        "v_cache": torch.randn(5, 4, 2, 64),
        "block_tables": torch.tensor([[3, 1, -1], [0, 4, 2]], dtype=torch.int32),
        "context_lens": torch.tensor([6, 12], dtype=torch.int32),
    }


def _set(name: str, value) -> Callable[[dict], None]:
    return lambda args: args.__setitem__(name, value(args) if callable(value) else value)


APPEND_CASES = {
    "key not a tensor": (_set("key", [[0.0]]), "key"),
    "key 2-d": (_set("key", lambda a: a["key"][:, 0]), "key"),
    "key dtype differs from cache": (_set("key", lambda a: a["key"].float()), "key"),
    "key head_dim": (_set("key", lambda a: a["key"][..., :64]), "key"),
    "key kv heads": (_set("key", lambda a: a["key"][:, :1]), "key"),
    "value shape": (_set("value", lambda a: a["value"][:3]), "value"),
    "value dtype": (_set("value", lambda a: a["value"].bfloat16()), "value"),
    "cache int dtype": (_set("k_cache", lambda a: a["k_cache"].int()), "k_cache"),
    "caches differ": (_set("v_cache", lambda a: a["v_cache"][:2]), "v_cache"),
    "cache dtypes differ": (_set("v_cache", lambda a: a["v_cache"].bfloat16()), "v_cache"),
    "cache not contiguous in head_dim": (
        _set("k_cache", lambda a: a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
        "k_cache",
    ),
    "slot float": (_set("slot_mapping", lambda a: a["slot_mapping"].float()), "slot_mapping"),
    "slot count": (_set("slot_mapping", lambda a: a["slot_mapping"][:3]), "slot_mapping"),
    "slot past cache": (_set("slot_mapping", torch.tensor([0, 9, -1, 24])), "slot_mapping"),
    "slot twice": (_set("slot_mapping", torch.tensor([5, 9, -1, 5])), "slot_mapping"),
    "key on another device": (_set("key", lambda a: a["key"].to("meta")), "key"),
}

DECODE_CASES = {
    "q 2-d": (_set("q", lambda a: a["q"][:, 0]), "q"),
    "q dtype differs from cache": (_set("q", lambda a: a["q"].half()), "q"),
    "q head_dim": (_set("q", lambda a: a["q"][..., :32]), "q"),
    "q heads not a multiple": (_set("q", lambda a: a["q"][:, :5]), "heads"),
    "q sequences": (_set("q", lambda a: a["q"][:1]), "block_tables"),
    "q not contiguous in head_dim": (_set("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "q"),
    "cache float64 in kernel": (None, "k_cache"),
    "block id too large": (
        _set("block_tables", torch.tensor([[3, 5, -1], [0, 4, 2]], dtype=torch.int32)),
        "block_tables",
    ),
    "negative block id in use": (
        _set("block_tables", torch.tensor([[3, -1, 0], [0, 4, 2]], dtype=torch.int32)),
        "block_tables",
    ),
    "context longer than table": (_set("context_lens", torch.tensor([6, 13], dtype=torch.int32)), "context_lens"),
    "zero context": (_set("context_lens", torch.tensor([0, 12], dtype=torch.int32)), "context_lens"),
    "context_lens count": (_set("context_lens", torch.tensor([6], dtype=torch.int32)), "context_lens"),
    "block_tables float": (_set("block_tables", lambda a: a["block_tables"].float()), "block_tables"),
    "block_tables 1-d": (_set("block_tables", lambda a: a["block_tables"][0]), "block_tables"),
    "out wrong shape": (_set("out", torch.empty(2, 6, 32)), "out"),
    "out wrong dtype": (_set("out", torch.empty(2, 6, 64, dtype=torch.float16)), "out"),
    "scale negative": (_set("scale", -1.0), "scale"),
    "scale nan": (_set("scale", float("nan")), "scale"),
    "q on another device": (_set("q", lambda a: a["q"].to("meta")), "q"),
}


@pytest.mark.parametrize("case", list(APPEND_CASES), ids=list(APPEND_CASES))
@pytest.mark.parametrize("fn", [minipaged_kernels.kv_append, reference.kv_append], ids=["kernel", "reference"])
def test_kv_append_rejects(fn, case):
    args = _append_args()
    mutate, name = APPEND_CASES[case]
    mutate(args)
    k_before = args["k_cache"].clone() if args["k_cache"].dtype.is_floating_point else None
    with pytest.raises(ValueError, match=name):
        fn(**args)
    if k_before is not None and args["k_cache"].device.type == "cpu":
        assert torch.equal(args["k_cache"], k_before), "a rejected call wrote into the cache"


def test_kv_append_accepts_the_valid_call():
    args = _append_args()
    minipaged_kernels.kv_append(**args)
    assert torch.equal(args["k_cache"].flatten(0, 1)[[0, 9, 23]], args["key"][[0, 1, 3]])


@pytest.mark.parametrize("case", list(DECODE_CASES), ids=list(DECODE_CASES))
@pytest.mark.parametrize(
    "fn", [minipaged_kernels.paged_decode_attention, reference.paged_decode_attention], ids=["kernel", "reference"]
)
def test_decode_rejects(fn, case):
    args = _decode_args()
    mutate, name = DECODE_CASES[case]
    if mutate is None:  # float64 is reference-only
        if fn is reference.paged_decode_attention:
            pytest.skip("the reference takes float64 by design")
        args = {k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}
    else:
        mutate(args)
    with pytest.raises(ValueError, match=name):
        fn(**args)


@pytest.mark.parametrize("num_splits", [0, -2, 2.0, "4", True])
def test_decode_rejects_bad_num_splits(num_splits):
    with pytest.raises(ValueError, match="num_splits"):
        minipaged_kernels.paged_decode_attention(**_decode_args(), num_splits=num_splits)


def test_decode_rejects_out_strided_in_head_dim():
    out = torch.empty(2, 64, 6).transpose(1, 2)
    with pytest.raises(ValueError, match="out"):
        minipaged_kernels.paged_decode_attention(**_decode_args(), out=out)


def test_decode_rejects_head_dim_over_256():
    args = _decode_args()
    args["q"] = torch.randn(2, 2, 320)
    args["k_cache"] = torch.randn(5, 4, 2, 320)
    args["v_cache"] = torch.randn(5, 4, 2, 320)
    with pytest.raises(ValueError, match="head_dim"):
        minipaged_kernels.paged_decode_attention(**args)


def test_decode_accepts_the_valid_call():
    args = _decode_args()
    out = minipaged_kernels.paged_decode_attention(**args)
    ref = reference.paged_decode_attention(**args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
