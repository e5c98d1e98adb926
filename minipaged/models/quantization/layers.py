"""Which linears of a ``CausalLM`` are quantized, and the tensor-parallel ``QuantLinear`` variants.

A model is first built with its plain linears (``PackedLinear`` or the column/row-parallel
ones); ``install_quant_linears`` then swaps each converted one for a ``QuantLinear`` of the
same role, as ``ModelConfig.quantization`` lists them, so the model code itself does not
change with the checkpoint format. Tensor-parallel ranks rebuild the same layout from the
same ``ModelConfig`` and cut their slices out of the full packed tensors:

- **column-parallel** (``qkv_proj``, ``gate_up_proj``): output columns N, piece by piece, of
  ``qweight``, ``scales``, ``zeros`` and the bias; ``g_idx`` (over K) is replicated;
- **row-parallel** (``o_proj``, ``down_proj``): input rows K. ``qweight`` is cut in whole
  packed words, ``scales``/``zeros`` in whole groups; a split that would cut a word or a
  group raises ``InvalidEngineConfigError`` before any rank starts. Per-channel scales
  (one group) are replicated. With a ``g_idx`` a rank's rows may belong to any group, so
  the scales and zeros are replicated whole and only ``g_idx`` is cut; the rank's
  ``group_size`` is then ``local K / groups``, a label that keeps the shapes consistent
  (the kernels index groups through ``g_idx``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from minipaged.errors import InvalidEngineConfigError
from minipaged.models.linear import PackedLinear
from minipaged.models.parallel_linear import ColumnParallelLinear, RowParallelLinear
from minipaged.models.quantization.config import QuantLayout
from minipaged.models.quantization.linear import DequantScratch, QuantLinear

if TYPE_CHECKING:
    from minipaged.distributed import TensorParallelGroup
    from minipaged.models.config import ModelConfig


class QuantColumnParallelLinear(QuantLinear):
    """This rank's output columns of each fused piece (``[q, k, v]`` or ``[gate, up]``); no communication."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, tp: TensorParallelGroup, **kw):
        self.output_sizes = tuple(output_sizes)
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        super().__init__(in_features, sum(s // tp.world_size for s in self.output_sizes), bias, **kw)

    def _columns(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        pieces, start = [], 0
        for size in self.output_sizes:
            local = size // self.tp_size
            pieces.append(full.narrow(dim, start + self.tp_rank * local, local))
            start += size
        return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]

    def shard_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full layer's tensor ``name`` (columns of the [., N] ones)."""
        if name == "g_idx":
            return full
        return self._columns(full, 0 if name == "bias" else 1)


class QuantRowParallelLinear(QuantLinear):
    """This rank's input rows; one all-reduce sums the partial products, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup, *, group_size, **kw):
        self.tp = tp
        self.full_groups = -(-in_features // group_size)
        local_group = row_parallel_group_size(in_features, group_size, kw["bits"], kw["has_g_idx"], tp.world_size)
        super().__init__(in_features // tp.world_size, out_features, bias, group_size=local_group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in_features / N]`` -> full ``[T, out_features]`` on every rank."""
        out = self.tp.all_reduce(self.matmul(x, None))
        return out.add_(self.bias) if self.bias is not None else out

    def shard_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full layer's tensor ``name`` (rows of qweight/g_idx, groups of scales/zeros)."""
        rank, local = self.tp.rank, self.in_features
        if name == "bias":
            return full
        if name == "qweight":
            words = local // (32 // self.bits)
            return full[rank * words : (rank + 1) * words]
        if name == "g_idx":
            return full[rank * local : (rank + 1) * local]
        if self.g_idx is not None or self.full_groups == 1:
            return full  # scales / zeros: every group may be used by this rank's rows
        groups = local // self.group_size
        return full[rank * groups : (rank + 1) * groups]


def row_parallel_group_size(in_features: int, group_size: int, bits: int, has_g_idx: bool, world_size: int) -> int:
    """A rank's ``group_size`` after splitting ``in_features`` rows over ``world_size`` ranks.

    Raises ``InvalidEngineConfigError`` (field ``tensor_parallel_size``) for a split that would
    cut a packed int32 word or a quantization group.
    """
    pack, groups = 32 // bits, -(-in_features // group_size)  # the last group may be short
    local = in_features // world_size
    what = f"a row-parallel layer with in_features={in_features}"
    if in_features % world_size or local % pack:
        raise InvalidEngineConfigError(
            "tensor_parallel_size", f"{world_size} ranks would cut a packed int32 word of {pack} weights in {what}"
        )
    if has_g_idx or groups == 1:  # every rank keeps every group
        if local % groups:
            raise InvalidEngineConfigError(
                "tensor_parallel_size", f"{world_size} ranks cannot share {groups} groups in {what}"
            )
        return local // groups
    if local % group_size:
        raise InvalidEngineConfigError(
            "tensor_parallel_size", f"{world_size} ranks would cut a group of {group_size} rows in {what}"
        )
    return group_size


def check_tensor_parallel_split(config: ModelConfig, world_size: int) -> None:
    """Refuse, before any rank starts, a tensor-parallel size that would cut a packed word or a group
    of one of ``config``'s row-parallel quantized layers (``InvalidEngineConfigError``)."""
    if config.quantization is None:
        return
    rows = {"self_attn.o_proj": config.num_heads * config.head_dim, "mlp.down_proj": config.intermediate_size}
    for name, spec in config.quantization.layers:
        for suffix, k in rows.items():
            if name.endswith(suffix):
                row_parallel_group_size(k, spec.group_size, spec.bits, spec.has_g_idx, world_size)


def install_quant_linears(
    model: nn.Module, layout: QuantLayout, scale_dtype: torch.dtype, tp: TensorParallelGroup | None
) -> None:
    """Swap each linear that ``layout`` lists for the ``QuantLinear`` of the same role (meta tensors, to be
    loaded with ``load_state_dict(assign=True)``). All of a model's quantized layers share one dequantization
    scratch buffer."""
    scratch = DequantScratch()
    for name, spec in layout.layers:
        old = model.get_submodule(name)
        kw = dict(
            bits=spec.bits,
            group_size=spec.group_size,
            has_g_idx=spec.has_g_idx,
            scale_dtype=scale_dtype,
            scratch=scratch,
        )
        bias = old.bias is not None
        if isinstance(old, ColumnParallelLinear):
            new = QuantColumnParallelLinear(old.in_features, old.output_sizes, bias, tp, **kw)
        elif isinstance(old, RowParallelLinear):
            new = QuantRowParallelLinear(old.full_in_features, old.out_features, bias, tp, **kw)
        elif isinstance(old, PackedLinear):
            new = QuantLinear(old.in_features, old.out_features, bias, **kw)
        else:
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer that can be quantized")
        model.set_submodule(name, new)
