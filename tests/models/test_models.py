"""Our Llama-family model against transformers' own, on tiny random-weight models.

Each case builds a transformers model with random weights, copies them into our
CausalLM, and compares logits: a plain prefill, decode steps over a paged cache whose
physical blocks are shuffled (against transformers with its own KV cache), a prefill
split into chunks, and one step mixing prefill chunks with decodes.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from minipaged.attention import allocate_kv_cache, build_metadata, build_positions
from minipaged.models import ModelConfig, build_model_from_hf

TOL = dict(rtol=1e-4, atol=1e-4)
BLOCK_SIZE = 4
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128)


def llama_gqa_untied():
    return LlamaConfig(
        **COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, rope_theta=500.0
    )


def qwen2_bias_tied():
    return Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000.0
    )


def llama3_rope_scaling():
    scaling = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 10000.0,
    }
    return LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, rope_parameters=scaling, tie_word_embeddings=False
    )


def mistral_gqa():
    return MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False
    )


CONFIGS = [llama_gqa_untied, qwen2_bias_tied, llama3_rope_scaling, mistral_gqa]


def random_hf_model(make_config, seed: int = 0):
    """A transformers model whose every weight is random (norm weights around 1, biases non-zero)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return hf


class PagedRunner:
    """Drives our model over a paged cache whose blocks are handed out in shuffled order."""

    def __init__(self, model, num_blocks: int = 64, seed: int = 0):
        self.model = model
        self.caches = allocate_kv_cache(model.config, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
        for k, v in self.caches:  # stale finite garbage: attention must never read unwritten slots
            k.normal_()
            v.normal_()
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    def table(self, name: str, length: int) -> list[int]:
        table = self.tables.setdefault(name, [])
        while len(table) * BLOCK_SIZE < length:
            table.append(self.free.pop())
        return table

    def step(self, chunks: list[tuple[str, list[int], int]]) -> torch.Tensor:
        """Run ``(name, new_tokens, context_len_after)`` chunks in one step; logits ``[T, vocab]``."""
        query_lens = [len(toks) for _, toks, _ in chunks]
        context_lens = [ctx for _, _, ctx in chunks]
        tables = [self.table(name, ctx) for name, _, ctx in chunks]
        meta = build_metadata(query_lens, context_lens, tables, BLOCK_SIZE)
        ids = torch.tensor([t for _, toks, _ in chunks for t in toks])
        hidden = self.model(ids, build_positions(query_lens, context_lens), self.caches, meta)
        return self.model.compute_logits(hidden)


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("make_config", CONFIGS, ids=lambda f: f.__name__)
def test_prefill_logits_match_transformers(make_config):
    hf = random_hf_model(make_config)
    ours = build_model_from_hf(hf)
    prompt = torch.randint(0, 97, (37,)).tolist()
    logits = PagedRunner(ours).step([("a", prompt, len(prompt))])
    expected = hf_logits(hf, prompt)
    assert expected.std() > 0.5  # random weights give non-trivial logits, so agreement means something
    torch.testing.assert_close(logits, expected, **TOL)


@pytest.mark.parametrize("make_config", CONFIGS, ids=lambda f: f.__name__)
def test_decode_steps_match_transformers_kv_cache(make_config):
    hf = random_hf_model(make_config, seed=1)
    ours = build_model_from_hf(hf)
    runner = PagedRunner(ours, seed=1)
    tokens = torch.randint(0, 97, (11,)).tolist()
    ours_logits = runner.step([("a", tokens, len(tokens))])[-1]
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), use_cache=True)
    for _ in range(9):
        torch.testing.assert_close(ours_logits, out.logits[0, -1], **TOL)
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        ours_logits = runner.step([("a", [nxt], len(tokens))])[-1]
        with torch.no_grad():
            out = hf(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(ours_logits, out.logits[0, -1], **TOL)


@pytest.mark.parametrize("make_config", CONFIGS[:2], ids=lambda f: f.__name__)
def test_chunked_prefill_equals_unchunked(make_config):
    hf = random_hf_model(make_config, seed=2)
    ours = build_model_from_hf(hf)
    prompt = torch.randint(0, 97, (41,)).tolist()
    whole = PagedRunner(ours).step([("a", prompt, len(prompt))])
    runner = PagedRunner(ours, seed=5)
    pieces, done = [], 0
    for size in (13, 4, 1, 23):  # chunk edges inside blocks, on block edges, and a one-token chunk
        pieces.append(runner.step([("a", prompt[done : done + size], done + size)]))
        done += size
    torch.testing.assert_close(torch.cat(pieces), whole, **TOL)
    torch.testing.assert_close(whole, hf_logits(hf, prompt), **TOL)


@pytest.mark.parametrize(
    "make_config, decodes_first, backend",
    [
        (llama_gqa_untied, True, "torch"),
        (llama_gqa_untied, False, "torch"),
        (qwen2_bias_tied, True, "torch"),
        (qwen2_bias_tied, False, "torch"),
        (qwen2_bias_tied, False, "triton"),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_mixed_prefill_and_decode_step_matches_per_sequence(make_config, decodes_first, backend):
    hf = random_hf_model(make_config, seed=3)
    ours = build_model_from_hf(hf, attention_backend=backend)
    gen = torch.Generator().manual_seed(3)
    # name -> (tokens already in the cache, tokens computed in the mixed step)
    plan = {
        "decode_a": (20, 1),
        "decode_b": (3, 1),
        "decode_c": (8, 1),
        "fresh_prompt": (0, 15),
        "second_chunk": (9, 7),
        "one_token_prompt": (0, 1),
    }
    tokens = {name: torch.randint(0, 97, (done + new,), generator=gen).tolist() for name, (done, new) in plan.items()}
    runner = PagedRunner(ours, num_blocks=96, seed=3)
    for name, (done, _) in plan.items():
        if done:
            runner.step([(name, tokens[name][:done], done)])
    order = sorted(plan, key=lambda n: (plan[n][1] > 1) != decodes_first)
    chunks = [(n, tokens[n][plan[n][0] :], len(tokens[n])) for n in order]
    logits = runner.step(chunks)
    row = 0
    for name, new, _ in chunks:
        expected = hf_logits(hf, tokens[name])[-len(new) :]
        torch.testing.assert_close(
            logits[row : row + len(new)], expected, **TOL, msg=lambda m, name=name: f"{name}: {m}"
        )
        row += len(new)


def test_model_config_reads_transformers_configs():
    qwen = ModelConfig.from_hf(qwen2_bias_tied())
    assert (qwen.architecture, qwen.attention_bias, qwen.o_proj_bias, qwen.tie_word_embeddings) == (
        "qwen2",
        True,
        False,
        True,
    )
    llama3 = ModelConfig.from_hf(llama3_rope_scaling())
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.rope_theta == 10000.0
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(type("Cfg", (), {"model_type": "gpt2"})())
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_hf(
            LlamaConfig(
                **COMMON, num_attention_heads=4, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
            )
        )


def test_forward_rejects_mismatched_inputs():
    ours = build_model_from_hf(random_hf_model(llama_gqa_untied))
    caches = allocate_kv_cache(ours.config, 8, BLOCK_SIZE, torch.float32, "cpu")
    meta = build_metadata([3], [3], [[0]], BLOCK_SIZE)
    with pytest.raises(ValueError, match="positions"):
        ours(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), caches, meta)
    with pytest.raises(ValueError, match="kv_caches"):
        ours(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), caches[:1], meta)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 500]), caches, meta)
