"""The server on the real SmolLM2-135M-Instruct (its default model): chat and completions equal offline LLM's."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_smollm2_server_matches_offline(smollm2_client):
    from minipaged import LLM, SamplingParams

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = ["The three primary colours are", "def add(a, b):"]
    llm = LLM(kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=24)
    chat_ref = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    text_ref = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm

    client = smollm2_client
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
    assert chat.choices[0].message.content == chat_ref.text
    assert chat.choices[0].finish_reason == chat_ref.finish_reason
    assert "Paris" in chat.choices[0].message.content
    streamed = client.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=24, stream=True)
    texts = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(len(prompts))] == text_ref
