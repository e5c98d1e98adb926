"""SamplingParams / EngineConfig validation: typed errors naming the field."""

import dataclasses

import pytest
import torch

from minipaged.config import EngineConfig
from minipaged.errors import InputError, InvalidEngineConfigError, InvalidSamplingParamsError
from minipaged.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-2]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: -100.5}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: "x"}}, "logit_bias"),
        ({"logit_bias": [(5, 1.0)]}, "logit_bias"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": 1.0}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"seed": 2**64 - 1, "n": 2}, "seed"),
        ({"seed": 2**64 - 4, "n": 5}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)


def test_sampling_params_normalise_stop_lists():
    words = ["x", "yz"]
    p = SamplingParams(stop=words, stop_token_ids=[5, 7], temperature=0)
    words.append("late edit")
    assert p.stop == ("x", "yz") and p.stop_token_ids == (5, 7) and p.greedy
    assert SamplingParams(stop="END").stop == ("END",)
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"dtype": "int8"}, "dtype"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"kv_cache_memory": 0}, "kv_cache_memory"),
    ],
)
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(InvalidEngineConfigError) as info:
        EngineConfig(**kwargs)
    assert info.value.field == field


def test_unknown_engine_kwarg_is_a_type_error():
    with pytest.raises(TypeError, match="max_num_sequences"):
        EngineConfig.from_kwargs(max_num_sequences=4)
    cfg = EngineConfig.from_kwargs(block_size=8, dtype="fp16")
    assert cfg.block_size == 8 and str(cfg.torch_dtype) == "torch.float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 4  # frozen: never mutated after construction


@pytest.mark.parametrize("n", [1, 2, 7])
def test_largest_seed_fits_every_sample_generator(n):
    """seed + i for each sample i must be accepted by torch.Generator.manual_seed: [0, 2**64 - n] is."""
    top = 2**64 - n
    p = SamplingParams(seed=top, n=n)
    for i in range(n):
        assert torch.Generator().manual_seed(p.seed + i).initial_seed() == p.seed + i
    with pytest.raises(ValueError):  # the bound is torch's, not an arbitrary one
        torch.Generator().manual_seed(top + n)
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(seed=top + 1, n=n)
    assert SamplingParams(seed=0, n=n).seed == 0


def test_new_fields_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is None and p.logprobs is None and p.min_tokens == 0 and not p.has_penalties
    bias = {3: 1, 9: -2.5}
    q = SamplingParams(logit_bias=bias, logprobs=0, min_tokens=16, repetition_penalty=1.1)
    bias[4] = 7.0  # a later edit of the caller's dict does not reach the params
    assert dict(q.logit_bias) == {3: 1.0, 9: -2.5} and isinstance(q.logit_bias[3], float)
    assert q.logit_bias == {3: 1.0, 9: -2.5} and q.has_penalties
    with pytest.raises(TypeError):
        q.logit_bias[3] = 0.0  # immutable
    assert hash(q) == hash(
        SamplingParams(logit_bias={9: -2.5, 3: 1.0}, logprobs=0, min_tokens=16, repetition_penalty=1.1)
    )
    assert SamplingParams(logit_bias={}) == SamplingParams()
    assert SamplingParams(logprobs=20).logprobs == 20
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).has_penalties


def test_logit_bias_takes_numpy_scalars_as_plain_numbers():
    import numpy as np

    p = SamplingParams(logit_bias={np.int64(4): np.float32(-1.5)})
    assert p.logit_bias == {4: -1.5} and type(next(iter(p.logit_bias))) is int
