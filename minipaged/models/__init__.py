"""Llama-family models over a paged KV cache, and how to load them.

``load_model(None)`` gives the embedded SmolLM2-135M-Instruct; ``load_model(path)``
takes a Hugging Face safetensors directory or a ``.gguf`` file. ``build_model_from_hf``
copies a transformers model's weights into ours (tests use it with tiny random models).
"""

from minipaged.models.config import ModelConfig
from minipaged.models.llama import CausalLM
from minipaged.models.loader import (
    DEFAULT_MODEL_NAME,
    LoadedModel,
    ModelNotFoundError,
    build_model_from_hf,
    default_model_dir,
    load_model,
    resolve_dtype,
)

__all__ = [
    "CausalLM",
    "DEFAULT_MODEL_NAME",
    "LoadedModel",
    "ModelConfig",
    "ModelNotFoundError",
    "build_model_from_hf",
    "default_model_dir",
    "load_model",
    "resolve_dtype",
]
