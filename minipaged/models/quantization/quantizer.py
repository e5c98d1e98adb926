"""Quantize a Hugging Face safetensors model and write a weight-only quantized checkpoint.

Every ``nn.Linear`` inside the decoder layers (q/k/v/o, gate/up/down) is quantized, by
round-to-nearest or by GPTQ on calibration text; embeddings, the LM head and the norms stay as
they are. The checkpoint is written in one of the standard formats, so transformers, vLLM and
this project's loader read it alike:

- ``compressed-tensors`` (``pack-quantized``, as llmcompressor writes it): per module
  ``weight_packed``, ``weight_scale``, ``weight_shape``, and ``weight_zero_point`` (asymmetric) /
  ``weight_g_idx`` (``desc_act``); ``config.json`` carries ``quantization_config`` with
  ``config_groups``, ``ignore`` and ``format``.
- ``gptq`` (AutoGPTQ / GPTQModel v1): ``qweight``, ``qzeros``, ``scales``, ``g_idx``; the config has
  ``quant_method: gptq``, ``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minipaged.errors import InputError
from minipaged.models.quantization.calibration import layer_by_layer, observe_linears, tokenize_calibration
from minipaged.models.quantization.gptq import HessianAccumulator, gptq_quantize
from minipaged.models.quantization.rtn import SUPPORTED_BITS, QuantizedWeight, rtn_quantize
from minipaged_kernels.quant_formats import to_compressed_tensors, to_gptq

METHODS = ("rtn", "gptq")
FORMATS = ("compressed-tensors", "gptq")
# The compressed-tensors release whose ``pack-quantized`` layout and config fields this writes.
COMPRESSED_TENSORS_VERSION = "0.19.0"
# Files of the source directory that the quantized checkpoint replaces rather than copies.
REPLACED_FILES = ("config.json", "model.safetensors.index.json", "minipaged_source.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InvalidQuantizeOptionError(InputError):
    """A ``minipaged quantize`` option is invalid for this model (``field`` names the option)."""


@dataclass
class QuantizeOptions:
    """How to quantize: ``bits`` 4 or 8; ``group_size`` columns per scale (``None``: per output
    channel); ``method`` ``rtn`` or ``gptq``; ``symmetric`` zero points; ``desc_act`` (GPTQ's act
    order, written as ``g_idx``); the output ``format``; GPTQ's calibration text (``None``: the shipped
    one), its windows (``num_calibration_samples`` of ``calibration_seq_len`` tokens), ``damp`` and
    ``block_size``; ``dtype`` of the scales and dense tensors (``None``: the source's)."""

    bits: int = 4
    group_size: int | None = 128
    method: str = "rtn"
    symmetric: bool = True
    desc_act: bool = False
    format: str = "compressed-tensors"
    calibration: Path | None = None
    num_calibration_samples: int = 128
    calibration_seq_len: int = 256
    damp: float = 0.01
    block_size: int = 128
    dtype: str | None = None

    def validate(self) -> None:
        """Checks that need no model; ``InvalidQuantizeOptionError`` naming the option."""
        if self.bits not in SUPPORTED_BITS:
            raise InvalidQuantizeOptionError("bits", f"must be one of {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise InvalidQuantizeOptionError(
                "group_size", f"must be a positive number of columns, got {self.group_size}"
            )
        if self.method not in METHODS:
            raise InvalidQuantizeOptionError("method", f"must be one of {list(METHODS)}, got {self.method!r}")
        if self.format not in FORMATS:
            raise InvalidQuantizeOptionError("format", f"must be one of {list(FORMATS)}, got {self.format!r}")
        if self.desc_act and self.method != "gptq":
            raise InvalidQuantizeOptionError("desc_act", "activation order needs calibration: use --method gptq")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise InvalidQuantizeOptionError("calibration", f"{self.calibration} is not a file")
        for name in ("num_calibration_samples", "calibration_seq_len", "block_size"):
            if getattr(self, name) < 1:
                raise InvalidQuantizeOptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 < self.damp < 1:
            raise InvalidQuantizeOptionError("damp", f"must be in (0, 1), got {self.damp}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidQuantizeOptionError("dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules inside the decoder layers, by full name (``model.layers.0.self_attn.q_proj``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


def check_shapes(linears: dict[str, torch.nn.Linear], options: QuantizeOptions) -> None:
    """Every layer must fit the output format: GPTQ's layout packs whole words along K and N; a group
    size that leaves a short last group is written in GPTQ's layout only.

    GPTQ's layout sizes ``scales``/``qzeros`` as ``ceil(K / group_size)`` and gives every input row
    its group in ``g_idx``, so a short last group is the same as any other there (SmolLM2's K = 576
    in groups of 128). compressed-tensors decompresses groups by reshaping K into whole groups and
    raises for any other K, and transformers loads these checkpoints through it, so such a
    checkpoint would load here and nowhere else: refused, naming the way out.
    """
    pack = 32 // options.bits
    for name, linear in linears.items():
        k, n = linear.in_features, linear.out_features
        if options.group_size is not None and k % options.group_size and options.format != "gptq":
            raise InvalidQuantizeOptionError(
                "group_size",
                f"{options.group_size} does not divide {name}'s in_features {k}: compressed-tensors (and "
                "transformers through it) cannot read a short last group; use --format gptq, or a group size "
                f"that divides {k}",
            )
        if options.format == "gptq" and (k % pack or n % pack):
            raise InvalidQuantizeOptionError(
                "format", f"gptq packs {pack} values per int32: {name} is {n}x{k}, not a multiple of {pack}"
            )


def quantize_model(
    model: torch.nn.Module,
    options: QuantizeOptions,
    tokenizer: Any = None,
    scale_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize every decoder linear of a transformers causal LM; returns them by module name.

    GPTQ runs the model layer by layer on the calibration windows (see ``calibration``) and
    leaves each quantized layer's weights dequantized in ``model``, so the next layer is
    calibrated on what the quantized model computes; RTN leaves ``model`` unchanged.
    """
    from tqdm.auto import tqdm

    options.validate()
    linears = decoder_linears(model)
    check_shapes(linears, options)
    out: dict[str, QuantizedWeight] = {}
    min_zero = 1 if options.format == "gptq" else 0  # v1 stores z - 1
    layers = model.model.layers
    bar = tqdm(total=len(layers), desc=f"quantizing ({options.method})", unit="layer", disable=not progress)
    if options.method == "rtn":
        for i in range(len(layers)):
            prefix = f"model.layers.{i}."
            for name, linear in linears.items():
                if name.startswith(prefix):
                    out[name] = rtn_quantize(
                        linear.weight.data, options.bits, options.group_size, options.symmetric, scale_dtype, min_zero
                    )
            bar.update()
        bar.close()
        return out

    if tokenizer is None:
        raise InvalidQuantizeOptionError("method", "gptq tokenizes calibration text: the model has no tokenizer")
    windows = tokenize_calibration(
        tokenizer, options.calibration, options.calibration_seq_len, options.num_calibration_samples
    )
    with torch.no_grad():
        for i, layer, inputs in layer_by_layer(model, windows):
            prefix = f"model.layers.{i}."
            mine = {name.removeprefix(prefix): m for name, m in linears.items() if name.startswith(prefix)}
            hessians = {name: HessianAccumulator(m.in_features) for name, m in mine.items()}
            observe_linears(layer, inputs, lambda name, x, hessians=hessians: hessians[name].add(x))
            for name, linear in mine.items():
                qw = gptq_quantize(
                    linear.weight.data,
                    hessians[name].hessian(),
                    options.bits,
                    options.group_size,
                    options.symmetric,
                    act_order=options.desc_act,
                    damp=options.damp,
                    block_size=options.block_size,
                    scale_dtype=scale_dtype,
                    min_zero=min_zero,
                )
                linear.weight.data = qw.dequantize(linear.weight.dtype)
                out[prefix + name] = qw
            bar.update()
    bar.close()
    return out


def quantization_config(options: QuantizeOptions) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``options``' format."""
    if options.format == "gptq":
        return {
            "quant_method": "gptq",
            "bits": options.bits,
            "group_size": -1 if options.group_size is None else options.group_size,
            "desc_act": options.desc_act,
            "sym": options.symmetric,
            "damp_percent": options.damp,
            "static_groups": False,
            "true_sequential": False,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
    weights = {
        "num_bits": options.bits,
        "type": "int",
        "symmetric": options.symmetric,
        "strategy": "channel" if options.group_size is None else "group",
        "group_size": options.group_size,
        "dynamic": False,
        "actorder": "group" if options.desc_act else None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "zp_dtype": None if options.symmetric else "torch.int8",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def packed_tensors(qw: QuantizedWeight, options: QuantizeOptions) -> dict[str, torch.Tensor]:
    """One module's checkpoint tensors (names without the module prefix) in ``options.format``."""
    packed = qw.to_packed()
    if options.format == "gptq":
        return to_gptq(packed)
    return to_compressed_tensors(packed, symmetric=options.symmetric)


def _source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def quantize_checkpoint(
    model_dir: str | os.PathLike | None, out_dir: str | os.PathLike, options: QuantizeOptions, progress: bool = True
) -> Path:
    """Quantize the Hugging Face model at ``model_dir`` (``None``: the embedded SmolLM2) into ``out_dir``.

    ``out_dir`` gets ``config.json`` with ``quantization_config``, one ``model.safetensors`` and every
    other file of the source (tokenizer, chat template, generation config). It is written under a
    temporary name and renamed at the end, so a failure leaves no half checkpoint; an existing
    non-empty ``out_dir`` is refused.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from minipaged.models.loader import ModelNotFoundError, ensure_default_model, has_tokenizer_files

    options.validate()
    src = ensure_default_model() if model_dir is None else Path(model_dir).expanduser()
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise ModelNotFoundError(f"{src} is not a Hugging Face directory with config.json and *.safetensors weights")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidQuantizeOptionError("out", f"{out} already exists and is not an empty directory")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise InvalidQuantizeOptionError("model", f"{src} is already quantized ({config['quantization_config']})")
    dtype = DTYPES[options.dtype] if options.dtype else _source_dtype(config)
    with torch.device("meta"):  # shapes only: a bad group size fails before any weight is read
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)))
    check_shapes(decoder_linears(skeleton), options)

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src)) if has_tokenizer_files(src) else None
    quantized = quantize_model(model, options, tokenizer, scale_dtype=dtype, progress=progress)

    state: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(file)))
    for name, qw in quantized.items():
        if f"{name}.weight" not in state:
            raise ValueError(f"{src} has no tensor {name}.weight for the module transformers calls {name}")
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": t.contiguous() for key, t in packed_tensors(qw, options).items()})
    state = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in state.items()}

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for file in src.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name not in REPLACED_FILES:
                shutil.copy(file, tmp / file.name)
        config["quantization_config"] = quantization_config(options)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
