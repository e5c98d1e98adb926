"""The weight-only quantization scheme of a checkpoint, read from ``quantization_config`` in config.json.

Three producers write integer weights with floating-point activations (W4A16 / W8A16):

- **compressed-tensors** ``pack-quantized`` (llm-compressor): ``config_groups`` with one
  ``weights`` entry ``{num_bits, type: "int", symmetric, strategy: "group"|"channel",
  group_size, actorder}``, no ``input_activations``; ``ignore`` names the layers left dense
  (exact module names, or ``re:``-prefixed regular expressions);
- **GPTQ** (AutoGPTQ / GPTQModel): ``bits``, ``group_size`` (-1 for per-channel),
  ``desc_act``, ``sym``, ``checkpoint_format: "gptq"`` (v1: stored zeros are one less than
  the real ones);
- **AWQ** (AutoAWQ): ``bits``, ``group_size``, ``zero_point``, ``version: "gemm"``;
  ``modules_to_not_convert`` names layers left dense (by substring, as AutoAWQ matches them).

Anything else (activation quantization, float weights, 3 bits, another packing) raises
``UnsupportedQuantizationError`` naming the field, before a tensor is read: a scheme this
code does not understand is never loaded wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from minipaged.errors import UnsupportedQuantizationError

SUPPORTED_BITS = (4, 8)
METHODS = ("compressed-tensors", "gptq", "awq")


@dataclass(frozen=True)
class WeightQuantScheme:
    """One checkpoint's weight quantization, the same for every converted linear layer.

    ``group_size`` is ``None`` for one scale per output channel (the whole input row is one group);
    ``actorder``: the checkpoint stores a ``g_idx`` per input feature (GPTQ's ``desc_act``),
    which may be any permutation of group indices; ``ignore``: patterns of HF module names
    (``model.layers.0.mlp.down_proj``) left dense, matched as ``ignore_match`` says.
    """

    method: str  # one of METHODS
    bits: int
    group_size: int | None
    symmetric: bool
    actorder: bool
    ignore: tuple[str, ...] = ()
    ignore_match: str = "exact"  # "exact" (compressed-tensors: names and re: patterns) or "substring" (AWQ)

    def is_quantized(self, module_name: str) -> bool:
        """Whether the HF linear layer ``module_name`` (no ``.weight`` suffix) is stored quantized."""
        for pattern in self.ignore:
            if self.ignore_match == "substring":
                if pattern in module_name:
                    return False
            elif pattern.startswith("re:"):
                if re.match(pattern[3:], module_name):
                    return False
            elif pattern == module_name:
                return False
        return True

    def describe(self) -> str:
        """A short name such as ``W4A16 g128 (gptq, asymmetric)``."""
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        sym = "symmetric" if self.symmetric else "asymmetric"
        order = ", actorder" if self.actorder else ""
        return f"W{self.bits}A16 {group} ({self.method}, {sym}{order})"


@dataclass(frozen=True)
class QuantSpec:
    """How one fused linear of our model (``model.layers.0.self_attn.qkv_proj``) is quantized."""

    bits: int
    group_size: int  # per-channel: the layer's full in_features
    has_g_idx: bool


@dataclass(frozen=True)
class QuantLayout:
    """The quantized linears of a model by our module name; every other linear is dense."""

    scheme_name: str  # WeightQuantScheme.describe(), for logs and benchmarks
    layers: tuple[tuple[str, QuantSpec], ...]


def parse_quantization_config(config: Mapping[str, Any] | None) -> WeightQuantScheme | None:
    """The scheme of a config.json's ``quantization_config`` dict (``None`` for a dense checkpoint).

    Raises ``UnsupportedQuantizationError`` naming the first field minipaged cannot honour.
    """
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise UnsupportedQuantizationError("quantization_config", f"must be a JSON object, got {type(config).__name__}")
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _parse_compressed_tensors(config)
    if method == "gptq":
        return _parse_gptq(config)
    if method == "awq":
        return _parse_awq(config)
    raise UnsupportedQuantizationError(
        "quantization_config.quant_method", f"{method!r} is not supported; minipaged loads {list(METHODS)}"
    )


def _refuse(field: str, value: Any, why: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(f"quantization_config.{field}", f"{value!r}: {why}")


def _bits(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in SUPPORTED_BITS:
        raise _refuse(field, value, f"only {SUPPORTED_BITS}-bit integer weights are supported")
    return value


def _group_size(value: Any, field: str) -> int | None:
    """``None`` for per-channel (-1 in GPTQ/AWQ configs), else a positive group size."""
    if value is None or value == -1:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _refuse(field, value, "group_size must be a positive integer or -1 (per-channel)")
    return value


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _refuse(key, value, "must be true or false")
    return value


def _parse_compressed_tensors(config: Mapping[str, Any]) -> WeightQuantScheme:
    fmt = config.get("format")
    if fmt != "pack-quantized":
        raise _refuse("format", fmt, "only 'pack-quantized' (integer weights packed into int32) is supported")
    if config.get("sparsity_config"):
        raise _refuse("sparsity_config", config["sparsity_config"], "sparse checkpoints are not supported")
    if config.get("kv_cache_scheme"):
        raise _refuse("kv_cache_scheme", config["kv_cache_scheme"], "a quantized KV cache is not supported")
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise _refuse(
            "config_groups", groups, "exactly one config group is supported (one scheme for every converted layer)"
        )
    ((name, group),) = groups.items()
    where = f"config_groups.{name}"
    if not isinstance(group, Mapping):
        raise _refuse(where, group, "must be a JSON object")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise _refuse(f"{where}.{key}", group[key], "activation quantization is not supported (weight-only)")
    if group.get("format") not in (None, "pack-quantized"):
        raise _refuse(f"{where}.format", group["format"], "only 'pack-quantized' is supported")
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise _refuse(f"{where}.targets", targets, "only targets ['Linear'] is supported")
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise _refuse(f"{where}.weights", weights, "weight quantization arguments are required")
    w = f"{where}.weights"
    if weights.get("type", "int") != "int":
        raise _refuse(f"{w}.type", weights.get("type"), "only integer weights are supported")
    if weights.get("dynamic"):
        raise _refuse(f"{w}.dynamic", weights["dynamic"], "dynamic weight quantization is not supported")
    if weights.get("block_structure") is not None:
        raise _refuse(f"{w}.block_structure", weights["block_structure"], "block quantization is not supported")
    bits = _bits(weights.get("num_bits"), f"{w}.num_bits")
    strategy = weights.get("strategy")
    if strategy == "channel":
        group_size = None
    elif strategy == "group":
        group_size = _group_size(weights.get("group_size"), f"{w}.group_size")
        if group_size is None:
            raise _refuse(f"{w}.group_size", weights.get("group_size"), "strategy 'group' needs a positive group_size")
    else:
        raise _refuse(f"{w}.strategy", strategy, "only 'group' and 'channel' are supported")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "group", "dynamic", "weight", "static"):
        raise _refuse(f"{w}.actorder", actorder, "unknown activation ordering")
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _refuse(f"{w}.symmetric", symmetric, "must be true or false")
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _refuse("ignore", ignore, "must be a list of module names or 're:' patterns")
    return WeightQuantScheme(
        method="compressed-tensors",
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        # "group" (alias "dynamic", which older llm-compressor writes) stores a weight_g_idx; "weight"
        # (alias "static") only reorders calibration and keeps contiguous groups.
        actorder=actorder in ("group", "dynamic"),
        ignore=tuple(ignore),
    )


def _parse_gptq(config: Mapping[str, Any]) -> WeightQuantScheme:
    fmt = config.get("checkpoint_format", config.get("format", "gptq"))
    if fmt not in (None, "gptq"):
        raise _refuse("checkpoint_format", fmt, "only the GPTQ v1 layout ('gptq') is supported")
    if config.get("dynamic"):
        raise _refuse("dynamic", config["dynamic"], "per-module overrides are not supported")
    if config.get("lm_head"):
        raise _refuse("lm_head", config["lm_head"], "a quantized LM head is not supported (the head stays dense)")
    bits = _bits(config.get("bits"), "bits")
    group_size = _group_size(config.get("group_size", -1), "group_size")
    return WeightQuantScheme(
        method="gptq",
        bits=bits,
        group_size=group_size,
        symmetric=_flag(config, "sym", True),
        actorder=_flag(config, "desc_act", False),
    )


def _parse_awq(config: Mapping[str, Any]) -> WeightQuantScheme:
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("version", config.get("version"), "only AutoAWQ's 'gemm' layout is supported")
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise _refuse("bits", bits, "AWQ's GEMM layout is 4-bit only")
    group_size = _group_size(config.get("group_size", config.get("q_group_size")), "group_size")
    if not _flag(config, "zero_point", True):
        raise _refuse("zero_point", False, "AWQ without zero points is not supported")
    ignore = config.get("modules_to_not_convert") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _refuse("modules_to_not_convert", ignore, "must be a list of module names")
    return WeightQuantScheme(
        method="awq",
        bits=bits,
        group_size=group_size,
        symmetric=False,
        actorder=False,
        ignore=tuple(ignore),
        ignore_match="substring",
    )
