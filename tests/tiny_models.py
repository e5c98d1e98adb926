"""Tiny random-weight models and engine helpers shared by tests in several layers.

Greedy tokens of these models are compared with transformers' own ``generate``; the
SmolLM2 tokenizer files come from ``make setup`` (``SMOL_DIR``).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.models import build_model_from_hf

VOCAB = 384
NEW_TOKENS = (5, 24)  # range of max_tokens per prompt


SMOL_DIR = Path.home() / ".cache/minipaged/models/SmolLM2-135M-Instruct"


def tiny_hf_model(arch: str):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed({"llama": 0, "qwen2": 1}[arch])
    model = cls(cfg).eval()
    if arch == "qwen2":
        with torch.no_grad():  # transformers initialises biases to 0; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def tiny_llama(vocab_size: int, seed: int, **overrides):
    """A 2-layer random Llama of hidden size 32 (4 query / 2 KV heads, 128 positions), in eval mode;
    ``overrides`` are further ``LlamaConfig`` fields."""
    import transformers

    torch.manual_seed(seed)
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, **{**shape, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def make_prompts(seed: int, count: int = 12, shared_prefix: int = 40):
    """Mixed lengths (1..~90 tokens); half share a prefix so the prefix cache has something to find."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(shared_prefix)]
    prompts = []
    for i in range(count):
        body = [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 3, 9, 17, 33, 50]))]
        prompts.append((prefix if i % 2 else []) + body)
    max_tokens = [rng.randint(*NEW_TOKENS) for _ in range(count)]
    return prompts, max_tokens


def make_llm(hf, backend="torch", **kwargs) -> LLM:
    model = build_model_from_hf(hf, attention_backend=backend)
    kwargs.setdefault("num_kv_blocks", 256)
    kwargs.setdefault("block_size", 8)
    return LLM(model, **kwargs)


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.block_manager.stats()
    assert stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks, stats
    assert not llm.has_unfinished_requests()


def greedy_outputs(llm: LLM, prompts: list[list[int]], max_tokens: list[int], **params) -> list:
    """``llm.generate`` of token-id ``prompts``, greedy, ``max_tokens[i]`` new tokens each (EOS ignored,
    other ``SamplingParams`` fields from ``params``); checks every KV block is free afterwards."""
    sp = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, **params) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert_all_blocks_free(llm)
    return outs


def max_greedy_z(a: torch.Tensor, b: torch.Tensor, greedy_path: list[int]) -> float:
    """Largest two-proportion z statistic over positions 1..3 of 'the token is the greedy one', between
    two equally many samples ``a`` and ``b`` ``[trials, >= 4]`` of the first tokens (position 0 is
    sampled before any draft exists)."""
    trials = a.shape[0]
    assert b.shape[0] == trials
    z = []
    for pos in range(1, 4):
        pa = (a[:, pos] == greedy_path[pos]).double().mean()
        pb = (b[:, pos] == greedy_path[pos]).double().mean()
        pooled = (pa + pb) / 2
        z.append(float(abs(pa - pb) / torch.sqrt(2 * pooled * (1 - pooled) / trials)))
    return max(z)


def greedy_token_ids(llm: LLM, prompts: list[list[int]], max_tokens: list[int], **params) -> list[list[int]]:
    """The first completion's token ids of each of ``greedy_outputs``."""
    return [o.outputs[0].token_ids for o in greedy_outputs(llm, prompts, max_tokens, **params)]


def make_tiny_model_dir(out: Path, max_model_len: int = 2048) -> Path:
    """A random-weight 2-layer Llama with SmolLM2's vocabulary and tokenizer files, as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOL_DIR / name).exists():
            shutil.copy(SMOL_DIR / name, out / name)
    torch.manual_seed(0)
    # A wide init gives peaked logits, so greedy argmax is far from ties (batching noise cannot flip it).
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_model_len,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: extra threads only add contention on the shared CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
