"""SamplingParams / EngineConfig validation: typed errors naming the field."""
import pytest

from minipaged.config import EngineConfig
from minipaged.errors import InputError, InvalidEngineConfigError, InvalidSamplingParamsError
from minipaged.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
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
])
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


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 0}, "block_size"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
    ({"max_model_len": 0}, "max_model_len"),
    ({"dtype": "int8"}, "dtype"),
    ({"attention_backend": "flash"}, "attention_backend"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"kv_cache_memory": 0}, "kv_cache_memory"),
])
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(InvalidEngineConfigError) as info:
        EngineConfig(**kwargs)
    assert info.value.field == field


def test_unknown_engine_kwarg_is_a_type_error():
    with pytest.raises(TypeError, match="max_num_sequences"):
        EngineConfig.from_kwargs(max_num_sequences=4)
    cfg = EngineConfig.from_kwargs(block_size=8, dtype="fp16")
    assert cfg.block_size == 8 and str(cfg.torch_dtype) == "torch.float16"
    with pytest.raises(Exception):
        cfg.block_size = 4  # frozen: never mutated after construction
