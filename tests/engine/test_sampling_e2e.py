"""repetition_penalty and min_tokens through the whole engine, against transformers' generate (greedy).

repetition_penalty must match transformers' ``repetition_penalty`` and min_tokens its
``min_new_tokens`` (EOS masked until then) token for token, batched, on a tiny random model.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import tiny_llama

from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf

VOCAB = 160


@pytest.fixture(scope="module")
def hf_model():
    return tiny_llama(VOCAB, seed=21, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def prompts(seed: int, count: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 20))] for _ in range(count)]


def hf_generate(hf_model, prompt, eos: int, max_new: int, min_new: int, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
        **kwargs,
    )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def llm_with_eos(hf_model, eos: int) -> LLM:
    hf_model.config.eos_token_id = eos
    try:
        return LLM(build_model_from_hf(hf_model), num_kv_blocks=64, block_size=4)
    finally:
        hf_model.config.eos_token_id = 2


@pytest.mark.parametrize("penalty", [0.7, 1.4])
def test_repetition_penalty_matches_transformers_generate(hf_model, penalty):
    batch = prompts(seed=int(penalty * 10))
    llm = llm_with_eos(hf_model, eos=2)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, repetition_penalty=penalty)
    got = [
        o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    ]
    want = [hf_generate(hf_model, p, 2, 12, 12, repetition_penalty=penalty) for p in batch]
    assert got == want
    plain = [hf_generate(hf_model, p, 2, 12, 12) for p in batch]
    assert got != plain  # the penalty changed something, so the comparison means something
    assert llm.block_manager.stats().used_blocks == 0


def test_min_tokens_masks_eos_like_min_new_tokens(hf_model):
    batch = prompts(seed=5)
    # Make the 2nd greedy token of the first prompt the EOS, so EOS comes early without min_tokens.
    eos = hf_generate(hf_model, batch[0], -1, 4, 0)[1]
    llm = llm_with_eos(hf_model, eos)
    early = llm.generate({"prompt_token_ids": batch[0]}, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[
        0
    ].outputs[0]
    assert early.token_ids[-1] == eos and len(early.token_ids) == 2 and early.finish_reason == "stop"
    for min_tokens in (3, 10):
        params = SamplingParams(temperature=0, max_tokens=10, min_tokens=min_tokens)
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        for prompt, out in zip(batch, outs):
            tokens = out.outputs[0].token_ids
            assert tokens == hf_generate(hf_model, prompt, eos, 10, min_tokens)
            assert eos not in tokens[:min_tokens]
    assert llm.block_manager.stats().used_blocks == 0


def test_logprobs_are_transformers_raw_log_softmax(hf_model):
    batch = prompts(seed=9, count=3)
    llm = llm_with_eos(hf_model, eos=2)
    params = SamplingParams(temperature=0, max_tokens=5, min_tokens=5, logprobs=3, repetition_penalty=1.5)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        completion = out.outputs[0]
        ids = torch.tensor([prompt])
        hf = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            repetition_penalty=1.5,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert completion.token_ids == hf.sequences[0, len(prompt) :].tolist()
        assert len(completion.logprobs) == 5
        for token, entry, raw in zip(completion.token_ids, completion.logprobs, hf.logits):
            reference = torch.log_softmax(raw[0].double(), dim=-1)  # raw: before the repetition penalty
            order = torch.argsort(reference, descending=True).tolist()
            assert set(entry) == set(order[:3]) | {token}
            for t, lp in entry.items():
                assert lp.rank == order.index(t) + 1
                assert abs(lp.logprob - float(reference[t])) < 1e-4
        assert (
            abs(
                completion.cumulative_logprob
                - sum(d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids))
            )
            < 1e-9
        )
    assert llm.block_manager.stats().used_blocks == 0
