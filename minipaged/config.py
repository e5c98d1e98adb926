"""EngineConfig: everything ``LLM(...)`` accepts, validated once, never mutated.

The one config object flows from the entry point (``LLM`` or the CLI) to the
scheduler and the worker. Values that depend on the loaded model (the effective
``max_model_len``, the number of KV blocks) are resolved into a *new* config with
``dataclasses.replace`` rather than written into this one.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from minipaged.attention import BACKENDS, kv_quant
from minipaged.errors import InvalidEngineConfigError
from minipaged.sampling_params import MAX_SEED

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# On CPU the KV cache is plain host memory; 1 GiB holds ~22k tokens of SmolLM2-135M in fp32.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of a ``DTYPES`` name or torch dtype: ``"bf16"`` and ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(DTYPES[dtype] if isinstance(dtype, str) else dtype).removeprefix("torch.")


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidEngineConfigError(name, f"must be a positive integer, got {value!r}")


SPECULATIVE_METHODS = ("ngram", "draft_model")
# Running sequences from which speculation stops proposing: the smallest batch at which n-gram
# speculation (k = 4) no longer pays even on text that copies well (``--workload copy``), because a
# step of k + 1 rows per sequence costs about 3x a decode step there. Re-measure with the batch
# sweep under "Speculative decoding" in minipaged/benchmarks/README.md.
DEFAULT_DISABLE_BY_BATCH_SIZE = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's names): propose ``num_speculative_tokens`` tokens per step cheaply,
    verify them in one forward pass of the model (``minipaged.spec_decode``).

    method: ``"ngram"`` (prompt lookup: copy what followed the longest earlier match of the sequence's
    last ``prompt_lookup_min..prompt_lookup_max`` tokens) or ``"draft_model"`` (a small model at ``model``,
    a Hugging Face directory or .gguf file with the target's vocabulary, loaded with the target's dtype and device).

    Back-off (``minipaged.spec_decode.controller``): after ``backoff_after`` verification steps in a row
    that accepted no draft, a sequence stops proposing for ``backoff_min_steps`` steps, then probes
    again; each failed probe doubles the pause up to ``backoff_max_steps``, one accepted draft ends it.
    ``backoff_after=None`` keeps every sequence speculating.

    Batch switch-off (vLLM's ``disable_by_batch_size``): while ``disable_by_batch_size`` or more
    sequences are running (the scheduler's running queue, n > 1 forks included, waiting requests not),
    no drafts are proposed for the next step. A large batch keeps the CPU busy computing one token per
    sequence, so verifying ``k + 1`` rows per sequence costs several decode steps and no longer pays
    for itself. ``None`` speculates at every batch size.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None
    backoff_after: int | None = 3
    backoff_min_steps: int = 4
    backoff_max_steps: int = 64
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidEngineConfigError(
                "speculative_config.method", f"must be one of {SPECULATIVE_METHODS}, got {self.method!r}"
            )
        _positive_int("speculative_config.num_speculative_tokens", self.num_speculative_tokens)
        _positive_int("speculative_config.prompt_lookup_min", self.prompt_lookup_min)
        _positive_int("speculative_config.prompt_lookup_max", self.prompt_lookup_max)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidEngineConfigError(
                "speculative_config.prompt_lookup_min",
                f"{self.prompt_lookup_min} exceeds prompt_lookup_max={self.prompt_lookup_max}",
            )
        _positive_int("speculative_config.backoff_after", self.backoff_after, allow_none=True)
        _positive_int("speculative_config.backoff_min_steps", self.backoff_min_steps)
        _positive_int("speculative_config.backoff_max_steps", self.backoff_max_steps)
        if self.backoff_min_steps > self.backoff_max_steps:
            raise InvalidEngineConfigError(
                "speculative_config.backoff_min_steps",
                f"{self.backoff_min_steps} exceeds backoff_max_steps={self.backoff_max_steps}",
            )
        _positive_int("speculative_config.disable_by_batch_size", self.disable_by_batch_size, allow_none=True)
        if self.method == "draft_model" and not isinstance(self.model, str):
            raise InvalidEngineConfigError("speculative_config.model", "the draft_model method needs a model path")
        if self.method == "ngram" and self.model is not None:
            raise InvalidEngineConfigError("speculative_config.model", "the ngram method takes no model")

    @classmethod
    def from_value(cls, value: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
        """A config from ``LLM(speculative_config=...)``'s dict (vLLM's keys); an unknown key is an error."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidEngineConfigError(
                "speculative_config", f"must be a dict or SpeculativeConfig, got {type(value).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidEngineConfigError("speculative_config", f"unknown key(s) {unknown}; accepted: {sorted(known)}")
        return cls(**value)


def _torchrun_nodes() -> int:
    """Nodes of a torchrun launch (``WORLD_SIZE / LOCAL_WORLD_SIZE``); 1 when not under torchrun.

    Across nodes each node holds only its share of the ranks' GPUs, so the count is checked per node.
    """
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if world is None or local is None or int(local) < 1:
        return 1
    return max(1, int(world) // int(local))


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (the keyword arguments of ``LLM``).

    Each field's ``metadata["help"]`` says what it means; the command line's engine options
    (``minipaged.entrypoints.engine_args``) are generated from these fields, their help texts,
    defaults and (where a field has them) ``metadata["choices"]``. A new field needs a help text:
    ``tests/entrypoints/test_engine_args.py`` fails without one.
    """

    model: str | None = field(
        default=None,
        metadata={"help": "HF model directory or .gguf file; unset: the embedded SmolLM2-135M-Instruct"},
    )
    dtype: str | torch.dtype = field(
        default="float32",
        metadata={"help": f"dtype of weights, activations and KV cache: one of {', '.join(DTYPES)}"},
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_kv_blocks: int | None = field(
        default=None,
        metadata={
            "help": "KV cache size in blocks; unset: sized from kv_cache_memory (CPU) or gpu_memory_utilization (CUDA)"
        },
    )
    kv_cache_memory: int | None = field(
        default=None,
        metadata={
            "help": f"KV cache size in bytes on CPU, e.g. 512M or 2G; unset: {DEFAULT_CPU_KV_CACHE_BYTES >> 30} GiB"
        },
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "fraction of the CUDA memory left free by the loaded weights that the KV cache takes, in (0, 1]"
        },
    )
    max_num_seqs: int = field(default=128, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "longest prompt + output; unset: the model's max_position_embeddings"},
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={"help": "reuse the full KV blocks of identical prompt prefixes across requests"},
    )
    attention_backend: str | None = field(
        default=None,
        metadata={"help": "attention kernels; unset: triton on CUDA, torch otherwise", "choices": BACKENDS},
    )
    seed: int = field(
        default=0,
        metadata={"help": "seeds the per-request generators of requests that give no seed, in [0, 2**64 - 1]"},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N; unset: CUDA when available"})
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "KV cache storage: auto (the model dtype), int8 or fp8_e4m3 (see minipaged.attention.kv_quant)",
            "choices": kv_quant.KV_CACHE_DTYPES,
        },
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "processes (one per GPU on CUDA) that each hold 1/N of every layer's heads, MLP features and "
            "KV cache; 1 runs everything in this process (see minipaged.worker.executor)"
        },
    )
    pipeline_parallel_size: int = field(
        default=1,
        metadata={
            "help": "pipeline stages, each holding a contiguous run of the decoder layers and their KV cache; "
            "P x T processes in all, one GPU each on CUDA (see minipaged.worker.pipeline)"
        },
    )
    pipeline_layer_partition: tuple[int, ...] | str | None = field(
        default=None,
        metadata={
            "help": "decoder layers per pipeline stage, e.g. 10,12,10 (one entry per stage, summing to the "
            "model's layers); unset: an even split, the remainder to the middle stages"
        },
    )
    max_concurrent_batches: int | None = field(
        default=None,
        metadata={
            "help": "batches in flight at once through the pipeline stages (the batch queue's depth); "
            "unset: pipeline_parallel_size, which keeps every stage busy; 1 runs one batch at a time"
        },
    )
    max_trace_steps: int | None = field(
        default=None,
        metadata={
            "help": "keep only about the newest N step records in the engine's trace, so a long-running "
            "engine's memory stays flat; unset: every step (minipaged serve keeps 10000)"
        },
    )
    peer_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "seconds a multi-process engine started by torchrun waits for a rank that has not joined, or "
            "whose heartbeat stopped (a node gone), before every rank ends with an error naming it"
        },
    )

    speculative_config: SpeculativeConfig | dict | None = field(
        default=None,
        metadata={
            "help": "speculative decoding as JSON, e.g. "
            '\'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' '
            'or \'{"method": "draft_model", "model": "path/to/draft", "num_speculative_tokens": 3}\' '
            "(see SpeculativeConfig); unset: off"
        },
    )

    def __post_init__(self) -> None:
        # A dict (vLLM's form, and the command line's JSON) becomes the typed config once, here.
        object.__setattr__(self, "speculative_config", SpeculativeConfig.from_value(self.speculative_config))
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidEngineConfigError("model", f"must be a path string or None, got {type(self.model).__name__}")
        if not isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPES:
            raise InvalidEngineConfigError("dtype", f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if self.torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidEngineConfigError("dtype", f"must be a floating dtype, got {self.dtype!r}")
        _positive_int("block_size", self.block_size)
        _positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _positive_int("kv_cache_memory", self.kv_cache_memory, allow_none=True)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
            raise InvalidEngineConfigError("gpu_memory_utilization", f"must be a number in (0, 1], got {util!r}")
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise InvalidEngineConfigError(
                "attention_backend", f"must be one of {BACKENDS} or None, got {self.attention_backend!r}"
            )
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InvalidEngineConfigError("device", f"must be 'cpu', 'cuda', 'cuda:N' or None, got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidEngineConfigError(
                "seed", f"must be an integer in [0, 2**64 - 1] (torch.Generator's range), got {self.seed!r}"
            )
        kv_quant.check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.enable_prefix_caching, bool):
            raise InvalidEngineConfigError(
                "enable_prefix_caching", f"must be a bool, got {self.enable_prefix_caching!r}"
            )
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("pipeline_parallel_size", self.pipeline_parallel_size)
        _positive_int("max_concurrent_batches", self.max_concurrent_batches, allow_none=True)
        _positive_int("max_trace_steps", self.max_trace_steps, allow_none=True)
        peer = self.peer_timeout_s
        if isinstance(peer, bool) or not isinstance(peer, (int, float)) or not peer > 0:
            raise InvalidEngineConfigError("peer_timeout_s", f"must be a positive number of seconds, got {peer!r}")
        self._check_layer_partition()
        self._check_tensor_parallel_devices()

    def _check_layer_partition(self) -> None:
        # Normalised to a tuple here; its length and sum are checked against the stages and the model's layers
        # once the model is known (minipaged.models.pipeline.layer_partition).
        value = self.pipeline_layer_partition
        if value is None:
            return
        if isinstance(value, str):
            try:
                value = tuple(int(part) for part in value.split(","))
            except ValueError:
                raise InvalidEngineConfigError(
                    "pipeline_layer_partition", f"must be comma-separated layer counts such as 2,3; got {value!r}"
                ) from None
        if not isinstance(value, (tuple, list)) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value
        ):
            raise InvalidEngineConfigError(
                "pipeline_layer_partition", f"must list a positive layer count per stage, got {value!r}"
            )
        object.__setattr__(self, "pipeline_layer_partition", tuple(value))

    @property
    def world_size(self) -> int:
        """Processes of one engine: pipeline stages x tensor-parallel ranks per stage."""
        return self.pipeline_parallel_size * self.tensor_parallel_size

    @property
    def batch_queue_depth(self) -> int:
        """Batches the engine keeps in flight: ``max_concurrent_batches``, else one per pipeline stage."""
        return self.max_concurrent_batches or self.pipeline_parallel_size

    def _check_tensor_parallel_devices(self) -> None:
        # One GPU per rank is required; on CPU more ranks than cores only oversubscribe them.
        tp, world = self.tensor_parallel_size, self.world_size
        if world == 1:
            return
        name = "tensor_parallel_size" if self.pipeline_parallel_size == 1 else "pipeline_parallel_size"
        if self.torch_device.type == "cuda":
            available = torch.cuda.device_count()
            if world > available and _torchrun_nodes() == 1:
                what = f"{world} ranks" if tp == world else f"{self.pipeline_parallel_size} x {tp} ranks"
                raise InvalidEngineConfigError(name, f"{what} need {world} GPUs; {available} visible")
        elif world > (os.cpu_count() or 1):
            warnings.warn(
                f"{name}={getattr(self, name)} ({world} ranks) exceeds the {os.cpu_count()} CPU cores: the ranks "
                "will share cores and wait on each other at every all-reduce",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype if isinstance(self.dtype, torch.dtype) else DTYPES[self.dtype]

    def model_kwargs(self) -> dict[str, Any]:
        """The ``load_model`` keywords this engine's model is built with: dtype, device, attention backend."""
        return {"dtype": self.torch_dtype, "device": self.torch_device, "attention_backend": self.attention_backend}

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from ``LLM(...)`` keyword arguments; an unknown name is a TypeError, never dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM got unexpected keyword argument(s) {unknown}; accepted: {sorted(known)}")
        return cls(**kwargs)
