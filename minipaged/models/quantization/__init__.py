"""Weight-only quantized checkpoints (W4A16 / W8A16): compressed-tensors, GPTQ and AWQ.

``parse_quantization_config`` reads the scheme from config.json, ``checkpoint`` turns each
format's tensors into the kernels' canonical packed layout, ``QuantLinear`` multiplies by
a packed weight, and ``layers`` puts such layers (tensor-parallel too) into a ``CausalLM``.
"""

from minipaged.models.quantization.config import (
    QuantLayout,
    QuantSpec,
    WeightQuantScheme,
    parse_quantization_config,
)
from minipaged.models.quantization.linear import QuantLinear, weight_bytes

__all__ = [
    "QuantLayout",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantScheme",
    "parse_quantization_config",
    "weight_bytes",
]
