"""Test-wide setup: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, so this
runs before the test modules import ``minipaged_kernels``.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put tensors: CPU under the interpreter, else CUDA."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (stop strings, chat templates, detokenising), shared by the engine tests."""
    from transformers import AutoTokenizer

    from minipaged.models.loader import ensure_default_model

    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


@pytest.fixture(scope="session")
def hf():
    """A tiny random Llama over SmolLM2's vocabulary, so text prompts and stop strings are real.
    Tests build engines from copies of its weights and never change it."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
