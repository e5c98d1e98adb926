"""The architecture facts our model needs, read once from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minipaged.models.quantization.config import QuantLayout

# Hugging Face model_type -> the architecture family implemented in minipaged.models.llama
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, Mistral, SmolLM2, Qwen2)."""

    architecture: str  # "llama" (Llama / Mistral / SmolLM2) or "qwen2" (q/k/v bias)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain RoPE; else {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q/k/v projections
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    o_proj_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj; Qwen2's does not
    quantization: QuantLayout | None = None  # the weight-quantized linears; None: all dense

    def __post_init__(self) -> None:
        if self.architecture not in set(ARCHITECTURES.values()):
            raise ValueError(
                f"architecture must be one of {sorted(set(ARCHITECTURES.values()))}, got {self.architecture!r}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES[1:]:
            raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES[1:]}, got {self.rope_scaling!r}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Read a ``transformers`` config (LlamaConfig, MistralConfig, Qwen2Config, or one loaded from GGUF)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r}; minipaged implements {sorted(ARCHITECTURES)}")
        architecture = ARCHITECTURES[model_type]
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {hf_config.hidden_act!r}")
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_params(hf_config)
        max_positions = hf_config.max_position_embeddings
        # Mistral's sliding window only changes attention past the window, which we do not
        # implement, so contexts are capped at the window instead.
        window = getattr(hf_config, "sliding_window", None) if model_type == "mistral" else None
        if window is not None:
            max_positions = min(max_positions, window)
        attention_bias = architecture == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            eos_token_ids=_as_ids(getattr(hf_config, "eos_token_id", None)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            o_proj_bias=architecture == "llama" and attention_bias,
        )


def _rope_params(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 keeps theta and scaling together in `rope_parameters`;
    # older configs have `rope_theta` and `rope_scaling` attributes.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    theta = params.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    params["rope_type"] = rope_type
    return theta, params


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
