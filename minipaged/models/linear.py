"""Linear layers that multiply by a oneDNN pre-packed weight on CPU.

A decode step multiplies a few rows (one per running sequence) by every weight of the
model, so on a CPU it is bound by how fast the GEMM streams weights from memory. For
such skinny products PyTorch's default fp32 path (MKL ``sgemm`` on a plain row-major
weight) streams far below the memory bandwidth; oneDNN's inner-product primitive on a
weight re-laid out once in its blocked format streams it faster at decode-sized batches
(1-64 rows) and is level with MKL on prefill-sized ones; re-measure with
``python -m minipaged.benchmarks.step`` with and without ``--plain-linear``.
The ops are PyTorch's own (``mkldnn._reorder_linear_weight`` / ``_linear_pointwise``,
the ones Inductor uses for its oneDNN linear fusions), called here directly.

bf16 weights are packed too where oneDNN has a bf16 inner product for this CPU
(``onednn_bf16_packing_available``: AVX-512 BF16/AMX, or AVX-NE-CONVERT): there a
packed bf16 weight beats a plain bf16 ``F.linear`` at batched decode. Without those
instructions (AVX2-only CPUs) oneDNN refuses to pack bf16, and a plain bf16 ``F.linear``
is several times slower than packed fp32: on such a CPU run the model in fp32. Re-measure
with ``python -m minipaged.benchmarks.step --dtype bfloat16`` (and ``--plain-linear``).

The packed copy is built lazily on the first CPU forward and rebuilt whenever the
dense weight changes (``load_state_dict``, in-place edits), so ``weight`` stays the
one source of truth that tests and loaders read. That costs a second copy of the
weights in host memory, so the engine's CPU worker calls ``pack_in_place``: each
layer's weight *becomes* its packed copy (a oneDNN tensor; ``weight.to_dense()``
gives the dense values back exactly). Where numba runs, the fp32 dense weight stays
beside it (``keep_dense``) for the 1-4 row products ``minipaged_kernels.cpu.gemv`` streams faster
than the packed GEMM; otherwise it is freed, ~0.4 GiB for SmolLM2 in fp32. Anywhere else
(CUDA, fp16, bf16 without CPU support, autograd, a PyTorch without oneDNN) the layer is
a plain ``F.linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minipaged_kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from minipaged_kernels.cpu.gemv import DenseWeight as FewRowWeight


def onednn_packing_available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed inner-product ops."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_bf16_packing_available() -> bool:
    """Whether oneDNN can pack and multiply bf16 weights on this CPU (AVX-512 BF16/AMX or AVX-NE-CONVERT)."""
    return onednn_packing_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_ONEDNN = onednn_packing_available()
_PACKED_DTYPES = (torch.float32, torch.bfloat16) if onednn_bf16_packing_available() else (torch.float32,)
_enabled = True  # flipped only inside ``packed_gemm_disabled`` (for A/B benchmarks)


@contextlib.contextmanager
def packed_gemm_disabled() -> Iterator[None]:
    """Within this block every layer takes the plain ``F.linear`` path (to measure what packing buys)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class PackedWeight:
    """A oneDNN-packed copy of one dense ``[out_features, in_features]`` CPU weight (fp32, or bf16 where
    supported), kept in step with it."""

    def __init__(self) -> None:
        self._key: tuple[int, int, torch.dtype] | None = None
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # data_ptr catches a swapped tensor, _version an in-place write into the same one
        # (inference tensors have no version counter: only a swap is seen for them).
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version, weight.dtype)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
            self._key = key
        return self._packed


def _packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack ``weight`` here: a CPU weight of a packable dtype, packing not disabled."""
    return _ONEDNN and _enabled and weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES


def uses_packed_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``linear`` would take the oneDNN packed path for these operands."""
    return (
        _packable(weight)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: PackedWeight,
    dense: torch.Tensor | None = None,
    few_rows: FewRowWeight | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [T, in_features]``, through ``packed`` when that is faster here.

    ``weight`` may be packed already (``pack_in_place``); ``x`` must then be a CPU tensor of its dtype.
    ``dense``, the dense copy ``pack_in_place`` kept of a packed ``weight``, serves the plain path of
    ``packed_gemm_disabled``; ``few_rows``, the same copy prepared for ``minipaged_kernels.cpu.gemv``,
    serves the few-row products that kernel streams faster than the packed GEMM (1-4 fp32 rows on
    CPU). Both are ignored once ``weight`` is no longer packed (a weight assigned since).
    """
    if few_rows is not None and weight.is_mkldnn and _enabled and few_rows.takes(x, bias):
        return few_rows.linear(x, bias)
    if weight.is_mkldnn:
        if x.device.type != "cpu" or x.dtype != weight.dtype:
            raise ValueError(
                f"a packed {weight.dtype} weight multiplies {weight.dtype} CPU inputs only, got {x.dtype} on {x.device}"
            )
        if not _enabled:  # an A/B against the plain path: the dense weight, unpacked if not kept
            return F.linear(x, weight.to_dense() if dense is None else dense, bias)
        packed_weight = weight
    elif uses_packed_gemm(x, weight):
        packed_weight = packed.get(weight)
    else:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight, bias, "none", [], "")


def pack_in_place(module: nn.Module, keep_dense: bool = False) -> int:
    """Make the weight of every ``PackedLinear`` in ``module`` that takes the packed path (a CPU
    weight of a packable dtype that does not require grad) its oneDNN-packed copy.

    With ``keep_dense`` the dense weight stays beside it as ``layer.dense_weight``, for the
    few-row products ``minipaged_kernels.cpu.gemv`` runs faster (fp32 only: other dtypes are freed anyway);
    otherwise it is freed. Returns the bytes of dense weights released. From then on the
    layer's ``weight`` is a oneDNN tensor: ``linear`` multiplies by it directly and
    ``weight.to_dense()`` recovers the dense values exactly. In-place edits no longer reach
    the packed weight, while a kept ``dense_weight`` is the layer's former tensor itself (no
    copy), shared with whatever it shared storage with: edit neither once packed (the engine
    never does). Assigning a new ``weight`` (``load_state_dict(assign=True)``) retires the
    dense copy: ``linear`` then packs the new one lazily.
    """
    released = 0
    for layer in module.modules():
        weight = layer.weight if isinstance(layer, PackedLinear) else None
        if weight is None or weight.is_mkldnn or weight.requires_grad or not _packable(weight):
            continue
        dense = weight.detach().contiguous()
        layer.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(dense), requires_grad=False)
        layer.packed = PackedWeight()  # drop a lazily built copy, if any
        if keep_dense and dense.dtype == torch.float32:
            layer.dense_weight = dense
        else:
            released += weight.numel() * weight.element_size()
    return released


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose CPU fp32 (and, where supported, bf16) forward uses a oneDNN pre-packed copy of its weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.packed = PackedWeight()
        self.dense_weight = None  # set by pack_in_place(keep_dense=True)

    @property
    def dense_weight(self) -> torch.Tensor | None:
        """The dense fp32 copy ``pack_in_place(keep_dense=True)`` kept of the packed weight, or ``None``."""
        return self._dense_weight

    @dense_weight.setter
    def dense_weight(self, weight: torch.Tensor | None) -> None:
        # Checked and prepared for the few-row kernel here, once, rather than on every forward.
        self._dense_weight = weight
        self.few_rows = few_row_weight(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.dense_weight, self.few_rows)


def few_row_weight(dense: torch.Tensor | None) -> FewRowWeight | None:
    """``dense`` prepared for ``minipaged_kernels.cpu.gemv`` (``None`` without numba, or for a weight
    that kernel does not take)."""
    gemv = cpu_kernels.load("gemv")
    if dense is None or gemv is None or not gemv.weight_applies(dense):
        return None
    return gemv.DenseWeight(dense)
