"""Megatron-style tensor-parallel linear layers (column- and row-parallel) beside the plain ones.

With ``N`` ranks, a transformer block needs one all-reduce per half:

- **column-parallel** (QKV, gate/up): each rank holds a slice of the *output* features,
  ``W[rows_r, :]``, and produces its slice of the output (its own attention heads, its
  own part of the MLP's intermediate features) with no communication;
- **row-parallel** (o_proj, down_proj): each rank holds the matching slice of the
  *input* features, ``W[:, cols_r]``, multiplies its slice of the activations and gets a
  partial ``[T, out]`` product; one all-reduce sums the partials into the full output on
  every rank. The bias is added once, after the sum.

A fused projection (``qkv_proj`` = q | k | v, ``gate_up_proj`` = gate | up) is sliced
piece by piece, so rank ``r`` holds ``q_r | k_r | v_r`` and the layer's output splits the
same way as the unsharded one, just with ``1/N`` of the heads.

Embedding and LM head are **replicated**, not vocab-parallel, on purpose: every rank
needs the full hidden state of each token anyway, so a replicated lookup costs no
communication (a vocab-parallel one needs one more all-reduce per step), and only rank
0 samples, so only rank 0 computes logits, with the full head and no gather. For tied
models (SmolLM2, Qwen2-0.5B) the head *is* the embedding, already on every rank. The
price: each rank holds ``vocab x hidden`` embedding weights, and rank 0 does the whole
LM-head GEMM alone; for big-vocabulary models on many GPUs vLLM's vocab-parallel
embedding and head with a gather to rank 0 are the better trade (not done here).

The layers load already-sliced weights: ``shard_weight`` / ``shard_bias`` cut a rank's
slice out of the full tensor, so no rank builds a full model of its own (the full weights
exist once, in the engine process, shared with the other ranks through shared memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from minipaged.models.linear import PackedLinear, linear

if TYPE_CHECKING:
    from minipaged.distributed import TensorParallelGroup
    from minipaged.models.config import ModelConfig


def _split(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what}={size} is not divisible by tensor_parallel_size={world_size}")
    return size // world_size


class ColumnParallelLinear(PackedLinear):
    """``y_r = x @ W[rows_r].T (+ b[rows_r])``: this rank's slice of each output piece, no communication.

    ``output_sizes``: the full sizes of the fused pieces (``[q, k, v]`` or ``[gate, up]``);
    the layer's local output is ``[T, sum(output_sizes) / N]``, laid out piece by piece.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, tp: TensorParallelGroup) -> None:
        self.output_sizes = tuple(output_sizes)
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        local = [_split(s, tp.world_size, "output size") for s in self.output_sizes]
        super().__init__(in_features, sum(local), bias=bias)

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for size in self.output_sizes:
            local = size // self.tp_size
            begin = start + self.tp_rank * local
            pieces.append(full[begin : begin + local])
            start += size
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def shard_weight(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the full ``[sum(output_sizes), in_features]`` weight."""
        return self._rows(full)

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's entries of the full ``[sum(output_sizes)]`` bias."""
        return self._rows(full)


class RowParallelLinear(PackedLinear):
    """``y = sum_r x_r @ W[:, cols_r].T + b``: a partial product per rank, one all-reduce, the bias once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup) -> None:
        self.tp = tp
        self.full_in_features = in_features
        super().__init__(_split(in_features, tp.world_size, "input size"), out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in_features / N]`` (this rank's heads or features) -> full ``[T, out_features]`` on every rank."""
        out = self.tp.all_reduce(linear(x, self.weight, None, self.packed, self.dense_weight, self.few_rows))
        return out.add_(self.bias) if self.bias is not None else out

    def shard_weight(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the full ``[out_features, in_features]`` weight."""
        local = self.in_features
        return full[:, self.tp.rank * local : (self.tp.rank + 1) * local]

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        """The bias is replicated (added once, after the sum)."""
        return full


def column_linear(
    in_features: int, output_sizes: Sequence[int], bias: bool, tp: TensorParallelGroup | None
) -> PackedLinear:
    """A plain ``PackedLinear`` without tensor parallelism (single process pays nothing), else column-parallel."""
    if tp is None:
        return PackedLinear(in_features, sum(output_sizes), bias=bias)
    return ColumnParallelLinear(in_features, output_sizes, bias, tp)


def row_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup | None) -> PackedLinear:
    """A plain ``PackedLinear`` without tensor parallelism, else row-parallel (with its all-reduce)."""
    if tp is None:
        return PackedLinear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


def shard_state_dict(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of the sharded ``model`` cut out of the unsharded model's
    ``full_state`` (same names).

    Parallel layers take their slice (a module with ``shard_tensor``, such as the quantized
    ones, slices each of its tensors by name); every other tensor (norms, embedding, LM head)
    is replicated. Slices are views of ``full_state``: the caller copies them where it loads them.
    """
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        names += [n for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for param_name in names:
            name = f"{module_name}.{param_name}" if module_name else param_name
            if name not in full_state:
                raise ValueError(f"the full state dict has no tensor {name!r}")
            full = full_state[name]
            if hasattr(module, "shard_tensor"):
                full = module.shard_tensor(param_name, full)
            elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                full = module.shard_weight(full) if param_name == "weight" else module.shard_bias(full)
            out[name] = full
    return out


@dataclass(frozen=True)
class RankSlice:
    """What one rank of ``world_size`` holds of a Llama-family model (``[start, stop)`` ranges)."""

    rank: int
    query_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp_features: tuple[int, int]
    params: int  # parameters this rank stores (replicated embedding and norms included; LM head on rank 0)
    kv_bytes_per_token: int  # this rank's KV cache bytes per cached token (all layers, K and V)


def rank_slices(config: ModelConfig, world_size: int, dtype_bytes: int = 4) -> list[RankSlice]:
    """Per-rank view of how ``world_size`` ranks split ``config`` (notebook 09 draws it)."""
    h, kv, inter, d = config.num_heads, config.num_kv_heads, config.intermediate_size, config.head_dim
    for name, size in (("num_heads", h), ("num_kv_heads", kv), ("intermediate_size", inter)):
        _split(size, world_size, name)
    hq, hkv, f = h // world_size, kv // world_size, inter // world_size
    hidden = config.hidden_size
    per_layer = hidden * (hq + 2 * hkv) * d + hq * d * hidden + 3 * hidden * f + 2 * hidden
    if config.attention_bias:
        per_layer += (hq + 2 * hkv) * d
    if config.o_proj_bias:
        per_layer += hidden
    shared = config.vocab_size * hidden + hidden  # embedding and final norm, on every rank
    head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return [
        RankSlice(
            rank=r,
            query_heads=(r * hq, (r + 1) * hq),
            kv_heads=(r * hkv, (r + 1) * hkv),
            mlp_features=(r * f, (r + 1) * f),
            params=config.num_layers * per_layer + shared + (head if r == 0 else 0),
            kv_bytes_per_token=2 * config.num_layers * hkv * d * dtype_bytes,
        )
        for r in range(world_size)
    ]
