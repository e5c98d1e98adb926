"""Bad input raises a typed error naming the field, before any work, leaving other requests alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from minipaged import LLM, SamplingParams
from minipaged.errors import (
    InvalidEngineConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestTooLargeError,
    UnknownRequestError,
)
from minipaged.models import build_model_from_hf


@pytest.fixture(scope="module")
def hf_model():
    return tiny_llama(200, seed=3)


def make_llm(hf_model, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 16)
    kwargs.setdefault("block_size", 4)
    return LLM(build_model_from_hf(hf_model), **kwargs)


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def ids(*tokens):
    return {"prompt_token_ids": list(tokens)}


@pytest.mark.parametrize(
    "prompt, error, field",
    [
        ("", InvalidPromptError, "prompt"),
        (ids(), InvalidPromptError, "prompt"),
        (ids(5, 200), InvalidPromptError, "prompt_token_ids"),
        (ids(5, -1), InvalidPromptError, "prompt_token_ids"),
        ({"prompt_token_ids": "abc"}, InvalidPromptError, "prompt_token_ids"),
        (42, InvalidPromptError, "prompt"),
        (ids(*range(1, 41)), PromptTooLongError, "prompt"),
    ],
)
def test_bad_prompt_rejected_before_any_work(hf_model, prompt, error, field):
    llm = make_llm(hf_model, max_model_len=32, num_kv_blocks=64)
    with pytest.raises(error) as info:
        llm.generate([ids(1, 2, 3), prompt], GREEDY, use_tqdm=False)
    assert info.value.field == field and field in str(info.value)
    assert not llm.has_unfinished_requests() and llm.trace == []  # the good prompt was not started either
    assert llm.block_manager.stats().used_blocks == 0


def test_request_that_can_never_fit_the_cache(hf_model):
    llm = make_llm(hf_model, num_kv_blocks=4, block_size=4)  # 16 token slots
    with pytest.raises(RequestTooLargeError) as info:
        llm.generate(ids(*range(1, 18)), GREEDY, use_tqdm=False)
    assert info.value.field == "prompt"
    with pytest.raises(RequestTooLargeError) as info:  # 12 + 6 tokens, the last never stored: 17 slots
        llm.generate(ids(*range(1, 13)), SamplingParams(max_tokens=6), use_tqdm=False)
    assert info.value.field == "max_tokens"
    # 11 + 6 = 17 tokens fit in 16 slots: the last sampled token never needs a KV slot.
    out = llm.generate(ids(*range(1, 12)), GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    assert llm.block_manager.stats().used_blocks == 0


def test_explicit_max_model_len_beyond_the_cache_is_refused(hf_model):
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, num_kv_blocks=4, block_size=4, max_model_len=17)
    assert info.value.field == "max_model_len" and "16 tokens" in str(info.value)


def test_bad_request_leaves_running_requests_unaffected(hf_model):
    reference = make_llm(hf_model).generate([ids(1, 2, 3), ids(9, 8)], GREEDY, use_tqdm=False)
    llm = make_llm(hf_model)
    first = llm.add_request(ids(1, 2, 3), GREEDY)
    llm.step()
    with pytest.raises(InvalidPromptError):
        llm.add_request(ids(), GREEDY)
    with pytest.raises(InvalidSamplingParamsError) as info:
        llm.add_request(ids(1), SamplingParams(top_p=0))
    assert info.value.field == "top_p"
    second = llm.add_request(ids(9, 8), GREEDY)
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step()})
    assert done[first].outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert done[second].outputs[0].token_ids == reference[1].outputs[0].token_ids
    assert llm.block_manager.stats().used_blocks == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params_are_typed(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_engine_arguments(hf_model):
    with pytest.raises(TypeError, match="block_sz"):
        make_llm(hf_model, block_sz=8)
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, max_model_len=129)  # the model has 128 positions
    assert info.value.field == "max_model_len"
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, attention_backend="triton")  # the prebuilt model runs the torch backend
    assert info.value.field == "attention_backend"
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, dtype="float16")  # ... in float32: its KV cache must match
    assert info.value.field == "dtype"
    llm = make_llm(hf_model, dtype=torch.float32)
    with pytest.raises(InvalidPromptError) as info:
        llm.generate([ids(1), ids(2)], GREEDY, use_tqdm=False, priority=[0, "high"])
    assert info.value.field == "priority" and not llm.has_unfinished_requests()
    with pytest.raises(UnknownRequestError):
        llm.abort("no-such-request")
    with pytest.raises(InvalidPromptError) as info:
        llm.generate([ids(1), ids(2)], [GREEDY], use_tqdm=False)
    assert info.value.field == "sampling_params"
    with pytest.raises(InvalidPromptError) as info:
        llm.generate(["text needs a tokenizer"], GREEDY, use_tqdm=False)
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gpu_memory_utilization": "x"}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": True}, "gpu_memory_utilization"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_engine_config_values_are_typed_errors(hf_model, kwargs, field):
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, **kwargs)
    assert info.value.field == field


def test_largest_engine_seed_runs(hf_model):
    llm = make_llm(hf_model, seed=2**64 - 1)
    out = llm.generate(ids(1, 2), SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_kv_blocks": 10**9}, "num_kv_blocks"),
        ({"num_kv_blocks": None, "kv_cache_memory": 2**60}, "kv_cache_memory"),
    ],
)
def test_kv_cache_larger_than_memory_is_refused_before_allocating(hf_model, kwargs, field):
    with pytest.raises(InvalidEngineConfigError) as info:
        make_llm(hf_model, **kwargs)
    message = str(info.value)
    assert info.value.field == field and "bytes are available" in message and "needs" in message


def test_kv_cache_memory_check_boundary(hf_model, monkeypatch):
    import minipaged.worker.worker
    from minipaged.attention import kv_cache_bytes_per_block
    from minipaged.config import EngineConfig

    model = build_model_from_hf(hf_model)
    per_block = kv_cache_bytes_per_block(model.config, 4, torch.float32)
    monkeypatch.setattr(minipaged.worker.worker, "available_memory_bytes", lambda device: 16 * per_block)
    config = EngineConfig(num_kv_blocks=16, block_size=4)
    assert minipaged.worker.worker.num_kv_blocks_for(config, model.config) == 16  # exactly fits
    with pytest.raises(InvalidEngineConfigError) as info:
        minipaged.worker.worker.num_kv_blocks_for(EngineConfig(num_kv_blocks=17, block_size=4), model.config)
    assert f"{17 * per_block:,} bytes" in str(info.value) and f"{16 * per_block:,} bytes" in str(info.value)
