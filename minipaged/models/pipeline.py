"""Pipeline stages of a Llama-family model: which layers each stage holds, the stage's model, its weights.

A pipeline of ``P`` stages splits the decoder layers into ``P`` contiguous runs. Stage 0
also holds the embedding, the last stage the final norm and the LM head (and, for tied
models, the embedding it multiplies by). A stage's model is an ordinary ``CausalLM``
with ``num_layers`` set to the stage's own count, so its layers are numbered from 0 and
the worker sizes its KV cache for those layers only; the global index of local layer
``i`` is ``stage.layers.start + i``.

Between stages travel the two tensors of the residual stream, ``hidden_states`` and
``residual`` (each ``[num_tokens, hidden_size]``): the stage after takes them where
its first layer would have taken the previous layer's output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minipaged.attention.metadata import AttentionMetadata
from minipaged.errors import InvalidEngineConfigError
from minipaged.models.config import ModelConfig
from minipaged.models.llama import CausalLM

if TYPE_CHECKING:
    from minipaged.attention import AttentionBackend
    from minipaged.distributed import TensorParallelGroup

EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def layer_partition(num_layers: int, num_stages: int, explicit: Sequence[int] | None = None) -> tuple[int, ...]:
    """Decoder layers per stage: ``explicit`` when given (checked), else an even split.

    The remainder of ``num_layers / num_stages`` goes one layer each to the stages just
    before the last, moving towards the first: the first stage also embeds and the last
    also runs the LM head, so the middle ones have room. ``InvalidEngineConfigError`` naming
    the field when a stage would have no layer or the counts do not add up.
    """
    if explicit is not None:
        if len(explicit) != num_stages or any(n < 1 for n in explicit):
            raise InvalidEngineConfigError(
                "pipeline_layer_partition", f"needs {num_stages} positive layer counts, got {list(explicit)}"
            )
        if sum(explicit) != num_layers:
            raise InvalidEngineConfigError(
                "pipeline_layer_partition",
                f"{list(explicit)} sums to {sum(explicit)} layers; the model has {num_layers}",
            )
        return tuple(explicit)
    if num_stages > num_layers:
        raise InvalidEngineConfigError(
            "pipeline_parallel_size", f"{num_stages} stages for a model of {num_layers} layers: a stage would be empty"
        )
    counts = [num_layers // num_stages] * num_stages
    for i in range(num_layers % num_stages):
        counts[num_stages - 2 - i] += 1
    return tuple(counts)


@dataclass(frozen=True)
class StageLayout:
    """What stage ``index`` of ``num_stages`` holds: ``layers`` (global indices) and the ends of the model."""

    index: int
    num_stages: int
    layers: range

    @classmethod
    def of(cls, index: int, partition: Sequence[int]) -> StageLayout:
        start = sum(partition[:index])
        return cls(index, len(partition), range(start, start + partition[index]))

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def holds_embedding(self, config: ModelConfig) -> bool:
        """The first stage looks tokens up; the last multiplies by the embedding when the head is tied to it."""
        return self.is_first or (self.is_last and config.tie_word_embeddings)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """``config`` with this stage's layer count (the shape its model and KV cache are built for)."""
        return dataclasses.replace(config, num_layers=len(self.layers))

    def local_name(self, name: str) -> str | None:
        """A layer's parameter ``name`` in the full model -> its name in this stage's model (None: another
        stage's layer); names outside the layers (embedding, norm, head) are returned as they are."""
        if match := _LAYER_NAME.match(name):
            index = int(match.group(1))
            return f"model.layers.{index - self.layers.start}.{match.group(2)}" if index in self.layers else None
        return name

    def top_level_parts(self, config: ModelConfig) -> set[str]:
        """Which of the embedding, final norm and LM head (our names) this stage holds."""
        parts = {EMBEDDING} if self.holds_embedding(config) else set()
        if self.is_last:
            parts.add(FINAL_NORM)
            if not config.tie_word_embeddings:
                parts.add(LM_HEAD)
        return parts


@dataclass(frozen=True)
class CheckpointSource:
    """A safetensors model directory each rank reads its own stage's tensors from (no full model anywhere)."""

    path: Path
    config: ModelConfig


@dataclass
class IntermediateTensors:
    """The residual stream between two stages: ``hidden_states`` and ``residual``, each ``[num_tokens, hidden]``."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


class StageCausalLM(CausalLM):
    """One pipeline stage's part of a ``CausalLM`` (and, with ``tp``, one tensor-parallel rank's slice of it).

    ``forward`` takes token ids on the first stage or the previous stage's
    ``IntermediateTensors`` on the others, and returns ``IntermediateTensors`` on every
    stage but the last, which returns the final hidden states ``[num_tokens, hidden]``.
    """

    def __init__(
        self,
        full_config: ModelConfig,
        stage: StageLayout,
        attention_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        super().__init__(stage.local_config(full_config), attention_backend, dtype, tp)
        self.full_config = full_config
        self.stage = stage
        # Parts of the model another stage runs: removed, so they hold no weights here.
        if not stage.holds_embedding(full_config):
            self.model.embed_tokens = None
        if not stage.is_last:
            self.model.norm = None
            self.lm_head = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Run this stage's layers; ``kv_caches`` holds this stage's layers only (see the class docstring)."""
        self._check_inputs(input_ids, positions, kv_caches, meta)
        if self.stage.is_first != (intermediate is None):
            raise ValueError("the first stage takes token ids only; every other stage takes the previous one's tensors")
        meta = self.attention_backend.prepare(meta, kv_caches[0][0])
        cos, sin = self.model.rotary_emb(positions)
        if intermediate is None:
            h, residual = self.model.embed_tokens(input_ids), None
        else:
            h, residual = intermediate.hidden_states, intermediate.residual
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        if not self.stage.is_last:
            return IntermediateTensors(h, residual)
        return self.model.norm(h, residual)[0]


def stage_state_dict(
    config: ModelConfig, stage: StageLayout, full_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of ``stage``'s model out of a full model's ``state_dict`` (our names), renamed to the stage's."""
    top = stage.top_level_parts(config)
    out = {}
    for name, tensor in full_state.items():
        local = stage.local_name(name)
        if local is not None and (local.startswith("model.layers.") or local in top):
            out[local] = tensor
    return out


def read_stage_checkpoint(path: Path, config: ModelConfig, stage: StageLayout, dtype: torch.dtype) -> dict:
    """``stage``'s weights from a safetensors model directory, fused and named as its model's parameters.

    Reads only the tensors this stage holds (``safe_open`` fetches them one by one), so a rank
    never has the whole checkpoint in memory.
    """
    from safetensors import safe_open

    from minipaged.models.loader import fuse_hf_weights

    top = stage.top_level_parts(config)
    wanted: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                # transformers names its layers as we do (model.layers.<i>.), so one renaming serves both.
                local = stage.local_name(name)
                if local is not None and (local.startswith("model.layers.") or local in top):
                    wanted[local] = f.get_tensor(name)
    skip = {EMBEDDING, FINAL_NORM, LM_HEAD} - top
    return fuse_hf_weights(stage.local_config(config), wanted, dtype, skip=skip)


def build_stage_model(
    config: ModelConfig,
    stage: StageLayout,
    source: Mapping[str, torch.Tensor] | object,
    tp: TensorParallelGroup | None,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str | None,
) -> StageCausalLM:
    """Stage ``stage``'s model (with ``tp``, this rank's slice of it) on ``device``.

    ``source``: the full model's ``state_dict`` (our names; only this stage's tensors are
    copied out), or a ``CheckpointSource`` whose files this stage reads its own tensors from.
    """
    from minipaged.attention import get_attention_backend
    from minipaged.models.loader import _assign_weights
    from minipaged.models.parallel_linear import shard_state_dict

    backend = get_attention_backend(attention_backend, device)
    with torch.device("meta"):
        model = StageCausalLM(config, stage, backend, dtype, tp)
    if isinstance(source, Mapping):
        state = stage_state_dict(config, stage, source)
    else:
        state = read_stage_checkpoint(source.path, config, stage, dtype)
    if tp is not None:
        state = shard_state_dict(model, state)
    owned = {
        name: t.to(device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        for name, t in state.items()
    }
    return _assign_weights(model, owned, device)


def load_for_pipeline(
    model: str | None, *, dtype: torch.dtype, device: torch.device | str, attention_backend: str | None
):
    """A ``LoadedModel`` for a pipeline-parallel engine: config and tokenizer only, the weights left on disk
    (a ``CheckpointSource`` each stage reads its own tensors from). A GGUF file, which only transformers
    can dequantise whole, is loaded whole (then each stage copies out its tensors)."""
    from transformers import AutoConfig, AutoTokenizer

    from minipaged.models.loader import (
        DEFAULT_MODEL_NAME,
        LoadedModel,
        ModelNotFoundError,
        ensure_default_model,
        has_tokenizer_files,
        load_model,
    )

    path = ensure_default_model() if model is None else Path(model).expanduser()
    if not path.is_dir():
        return load_model(model, dtype=dtype, device=device, attention_backend=attention_backend)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no config.json and *.safetensors weights")
    config = ModelConfig.from_hf(AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer_files(path) else None
    return LoadedModel(
        CheckpointSource(path, config), tokenizer, config, DEFAULT_MODEL_NAME if model is None else path.name
    )
