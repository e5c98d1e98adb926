"""SamplingParams.prompt_logprobs against transformers' own logits on a tiny random model.

Prompt token ``i`` (``i >= 1``) must get ``log_softmax`` of transformers' logits at position
``i - 1``, with the top-k alternatives and ranks, whether its prompt ran in one step, in chunks
of a small token budget, after its prefix was cached by an earlier request, or across a
preemption; every KV block is free afterwards.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import tiny_llama

from minipaged import LLM, SamplingParams
from minipaged.errors import InvalidSamplingParamsError
from minipaged.models import build_model_from_hf

VOCAB = 160


@pytest.fixture(scope="module")
def hf_model():
    return tiny_llama(VOCAB, seed=33, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_llm(hf_model, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 64)
    kwargs.setdefault("block_size", 4)
    return LLM(build_model_from_hf(hf_model), **kwargs)


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def assert_matches_transformers(hf_model, prompt: list[int], got, k: int) -> None:
    """``got``: a RequestOutput.prompt_logprobs list, checked entry by entry against transformers."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].double()
    reference = torch.log_softmax(logits, dim=-1)  # [len(prompt), vocab]
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for i in range(1, len(prompt)):
        ref = reference[i - 1]
        order = torch.argsort(ref, descending=True).tolist()
        entry = got[i]
        assert set(entry) == set(order[:k]) | {prompt[i]}, i
        for token, lp in entry.items():
            assert lp.rank == order.index(token) + 1
            assert abs(lp.logprob - float(ref[token])) < 1e-4, (i, token)


def assert_all_free(llm: LLM) -> None:
    stats = llm.block_manager.stats()
    assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks, stats


def test_prompt_logprobs_equal_transformers_log_softmax(hf_model):
    prompts = random_prompts(1, [1, 2, 7, 13, 30])
    llm = make_llm(hf_model)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert_matches_transformers(hf_model, prompt, out.prompt_logprobs, k=2)
        assert len(out.outputs[0].logprobs) == len(out.outputs[0].token_ids)
    # Without the option nothing is computed or returned.
    plain = llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    assert_all_free(llm)


def test_prompt_logprobs_zero_alternatives_and_n_samples(hf_model):
    prompt = random_prompts(2, [11])[0]
    llm = make_llm(hf_model)
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(n=3, max_tokens=4, prompt_logprobs=0, seed=5), use_tqdm=False
    )[0]
    assert len(out.outputs) == 3
    assert all(len(d) == 1 for d in out.prompt_logprobs[1:])  # the prompt token alone
    assert_matches_transformers(hf_model, prompt, out.prompt_logprobs, k=0)
    assert_all_free(llm)


def test_prompt_logprobs_under_chunked_prefill(hf_model):
    prompts = random_prompts(3, [29, 17, 40, 5])
    llm = make_llm(hf_model, max_num_batched_tokens=6)
    params = [SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3 if i % 2 == 0 else None) for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert max(r.num_prefill_tokens + r.num_decode_tokens for r in llm.trace) <= 6
    assert any(r.num_scheduled > 1 for r in llm.trace)  # prompts really were computed beside each other
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2 == 0:
            assert_matches_transformers(hf_model, prompt, out.prompt_logprobs, k=3)
        else:
            assert out.prompt_logprobs is None
    assert_all_free(llm)


def test_prompt_logprobs_with_a_prefix_cache_warm_prompt(hf_model):
    prompt = random_prompts(4, [26])[0]
    llm = make_llm(hf_model, enable_prefix_caching=True)
    warm = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert warm.num_cached_tokens == 0
    again = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # the cache holds the prompt
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # every prompt position was computed, none served from the cache
    assert_matches_transformers(hf_model, prompt, out.prompt_logprobs, k=1)
    assert_all_free(llm)


def test_prompt_logprobs_survive_preemption(hf_model):
    # 12 blocks of 4 slots; a short prompt decodes while a 30-token one is prefilled 3 tokens a step
    # beside it. When the decoding one needs its 5th block the long one (the later arrival) is
    # preempted mid-prompt, and recomputed from scratch once blocks are free again.
    prompts = random_prompts(5, [8, 30])
    llm = make_llm(hf_model, num_kv_blocks=12, max_num_batched_tokens=4)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, prompt_logprobs=2) for m in (30, 4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.num_preemptions > 0
    long_steps = [n for r in llm.trace for rid, _, n in r.scheduled if rid == outs[1].request_id]
    # Without preemption: 30 prompt tokens + 3 fed-back ones; the excess is the recomputed part, which
    # is shorter than the prompt, so the preemption came mid-prompt.
    assert 30 + 3 < sum(long_steps) < 30 + 3 + 30
    for prompt, out in zip(prompts, outs):
        assert_matches_transformers(hf_model, prompt, out.prompt_logprobs, k=2)
    assert_all_free(llm)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_prompt_logprobs_out_of_range_is_a_typed_error(value):
    with pytest.raises(InvalidSamplingParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
