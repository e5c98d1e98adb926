"""``QuantLinear``: a linear layer whose weight stays packed (4 or 8 bits per weight) in memory.

The layer holds one ``minipaged_kernels.quant_formats.PackedWeight`` as buffers (so
``.to(device)`` and ``state_dict`` carry it): ``qweight`` int32 ``[ceil(K / pack), N]``,
``scales [groups, N]``, ``zeros`` int32 ``[groups, N]``, optionally ``g_idx`` int32 ``[K]``,
and a dense ``bias [N]``. Its forward picks the fastest way to multiply here:

- CUDA: the Triton dequantize-in-registers kernel ``quant_linear.quant_matmul``;
- CPU, bf16 / fp16 rows on a 4-bit weight that ``pack_int4_in_place`` gave ATen's layout (the engine's CPU
  worker does so for a 16-bit model): PyTorch's own int4 kernel (``cpu.int4_aten``); from
  ``int4_aten.DENSE_FROM_ROWS`` bf16 rows (a long prefill) the layer dequantizes ATen's layout once into the
  shared scratch buffer below and multiplies densely in bf16, which that kernel's per-row cost loses to. The
  layer then holds that layout *instead of* ``qweight`` (one copy of the 4-bit weights), and of ``scales`` /
  ``zeros`` where ATen's copy holds them exactly, and rebuilds them whenever another path or ``state_dict``
  asks for them;
- CPU with numba, at most ``FEW_ROWS`` rows (small-batch decode) of fp32 or bf16: ``cpu.quant_gemv`` streams
  the packed words and dequantizes in registers, reading ~bits/32 of an fp32 weight's bytes (its arrays, built
  once per weight, are kept on the layer);
- CPU, more rows (prefill, larger decode batches): the weight is dequantized once per call into a scratch buffer
  shared by every layer of the model (sized to the largest layer), then one dense fp32 GEMM. The
  dequantization costs ``K * N`` operations against the GEMM's ``M * K * N``, so from a few
  dozen rows on it is a small share of the call. Keeping a dequantized oneDNN-packed copy
  per layer instead would undo the memory saving that is the point of the format, so it is
  not done. Re-measure the packed few-row loop against dequantize-then-GEMM and dense fp32/bf16
  with ``python -m minipaged_kernels.cpu.quant_bench``.
- anywhere else (no numba): the same dequantize-then-multiply in PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minipaged_kernels import cpu as cpu_kernels
from minipaged_kernels import quant_formats as qf

if TYPE_CHECKING:
    from minipaged_kernels.cpu.int4_aten import Int4Weight

# Up to this many rows the CPU streams packed weights instead of dequantizing: the numba loop keeps a
# word's fields in registers up to quant_gemv.FUSED_MAX_ROWS rows; past that, dequantize-then-GEMM wins
# (python -m minipaged_kernels.cpu.quant_bench --rows 1 4 8 16).
FEW_ROWS = 4


class DequantScratch:
    """One reusable dense buffer for the CPU prefill path, shared by all ``QuantLinear`` layers of a model."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``[rows, cols]`` view of the buffer (grown, never shrunk); its contents are garbage."""
        need = rows * cols
        buf = self._buffer
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            self._buffer = buf = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(rows, cols)


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W) + b`` for ``x [T, in_features]``, with ``W`` kept packed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        bits: int,
        group_size: int,
        has_g_idx: bool,
        scale_dtype: torch.dtype,
        scratch: DequantScratch | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        pack, groups = 32 // bits, -(-in_features // group_size)  # the last group may be short
        self.register_buffer("qweight", torch.empty(-(-in_features // pack), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=scale_dtype))
        self.register_buffer("zeros", torch.empty(groups, out_features, dtype=torch.int32))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32) if has_g_idx else None)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scratch = scratch if scratch is not None else DequantScratch()
        # cpu.quant_gemv's arrays for this weight, built on the first CPU call (fp32 scales: a copy
        # of [groups, N] when the model's dtype is not fp32, counted by weight_bytes).
        self._cpu_arrays, self._cpu_key = None, None
        self._packed, self._packed_key = None, None  # the checked PackedWeight view, rebuilt when buffers change
        # ATen's int4 layout of the weight, set by pack_int4_in_place (qweight is then None).
        self.int4: Int4Weight | None = None

    def _key(self) -> tuple:
        """Identity of the buffers: a load with ``assign=True`` or ``.to()`` replaces them, an in-place load
        bumps ``_version`` (inference tensors have none: only a swap is seen for them)."""
        return tuple(
            (t.data_ptr(), 0 if t.is_inference() else t._version)
            for t in (self.qweight, self.scales, self.zeros, self.g_idx)
            if t is not None
        )

    def packed_weight(self) -> qf.PackedWeight:
        """The layer's weight as the kernels' ``PackedWeight`` (views of the buffers; ``qweight``, and the
        ``scales`` / ``zeros`` ``pack_int4`` released, rebuilt from ATen's layout)."""
        if self.int4 is not None:
            return self._rebuilt()
        key = self._key()
        if self._packed_key != key:  # the shape checks once per set of buffers, not on every forward
            self._packed, self._packed_key = self._view(self.qweight, self.scales, self.zeros), key
        return self._packed

    def _rebuilt(self) -> qf.PackedWeight:
        """The format's tensors of a weight held in ATen's layout, exactly as they were loaded."""
        aten, groups = cpu_kernels.load("int4_aten"), self._num_groups()
        qweight = qf.pack_int32(aten.unpack(self.int4), 4)
        scales = self.scales if self.scales is not None else aten.format_scales(self.int4, groups)
        zeros = self.zeros
        if zeros is None:  # released only when every zero point was 8
            zeros = torch.full((groups, self.out_features), 8, dtype=torch.int32)
        return self._view(qweight, scales, zeros)

    def _num_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def _view(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> qf.PackedWeight:
        return qf.PackedWeight(
            qweight, scales, zeros, self.g_idx, self.bits, self.group_size, self.in_features, self.out_features
        )

    def _prepared(self, kernel):
        """``kernel.prepare`` of this layer's weight, kept while the buffers stay the same tensors."""
        key = self._key()
        if self._cpu_key != key:
            self._cpu_arrays, self._cpu_key = kernel.prepare(self.packed_weight()), key
        return self._cpu_arrays

    def pack_int4(self, dtype: torch.dtype) -> int:
        """Give a 4-bit CPU weight ATen's int4 layout for ``dtype`` rows in place of the format's tensors;
        returns the bytes released (0 when ``cpu.int4_aten`` cannot take this weight, which then stays as
        it is).

        ``qweight`` always goes; ``scales`` too when ATen's copy holds them exactly (the same dtype), and
        ``zeros`` when every zero point is 8 (symmetric weights). ``packed_weight`` and ``state_dict``
        rebuild them exactly, so that the layer holds one copy of its weight, not two.
        """
        kernel = cpu_kernels.load("int4_aten")
        if kernel is None or self.int4 is not None:
            return 0
        pw = self.packed_weight()
        if kernel.unsupported_reason(pw, dtype):
            return 0
        self.int4 = kernel.pack(pw, dtype)
        released = self.qweight.nbytes
        self.qweight = None
        scales = kernel.format_scales(self.int4, self._num_groups())
        if scales is not None and scales.dtype == self.scales.dtype and torch.equal(scales, self.scales):
            released, self.scales = released + self.scales.nbytes, None
        if bool((self.zeros == 8).all()):
            released, self.zeros = released + self.zeros.nbytes, None
        self._packed, self._packed_key, self._cpu_arrays, self._cpu_key = None, None, None, None
        return released

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.int4 is not None:  # a checkpoint holds the format's tensors, not ATen's layout
            pw = self.packed_weight()
            for name in ("qweight", "scales", "zeros"):
                destination[prefix + name] = getattr(pw, name)

    def extra_repr(self) -> str:
        order = ", g_idx" if self.g_idx is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}{order}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in_features]`` -> ``[T, out_features]`` in ``x``'s dtype."""
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W (+ bias)`` by the path the module docstring describes."""
        int4 = self.int4
        if int4 is not None and x.dtype == int4.scale_zeros.dtype and x.device.type == "cpu" and x.dim() == 2:
            aten = cpu_kernels.load("int4_aten")
            buffer = None  # a long prefill dequantizes into the model's one scratch buffer
            if x.shape[0] >= aten.DENSE_FROM_ROWS and aten.dense_applies_to(int4):
                buffer = self.scratch.get(int4.padded_in_features, int4.out_features, int4.dtype, x.device)
            return aten.matmul_unchecked(x, int4, bias, buffer)  # K is the layer's own
        pw = self.packed_weight()
        if x.device.type == "cuda":
            from minipaged_kernels.quant_linear import quant_matmul

            return quant_matmul(x, pw, bias)
        kernel = cpu_kernels.load("quant_gemv")
        if kernel is not None and x.shape[0] <= FEW_ROWS and kernel.applies_to(x, pw, bias):
            return kernel.matmul_unchecked(x, pw, bias, prepared=self._prepared(kernel))
        if kernel is not None and x.dtype in kernel.INPUT_DTYPES and x.device.type == "cpu":
            # bf16 too: numba writes fp32, and an fp32 GEMM then costs less than rounding the weight to bf16
            weight = self.scratch.get(self.in_features, self.out_features, torch.float32, x.device)
            kernel.dequantize_into(pw, weight, self._prepared(kernel))
            out = F.linear(x.float(), weight.t(), None if bias is None else bias.float())
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        weight = self.scratch.get(self.in_features, self.out_features, x.dtype, x.device)
        weight.copy_(qf.dequantize(pw, x.dtype))
        return F.linear(x, weight.t(), bias)


def pack_int4_in_place(module: nn.Module, dtype: torch.dtype) -> int:
    """``QuantLinear.pack_int4`` on every 4-bit layer of ``module`` that ATen's int4 CPU kernel can take for
    ``dtype`` rows; returns the bytes of the format's tensors released (ATen's copy takes about as much)."""
    return sum(layer.pack_int4(dtype) for layer in module.modules() if isinstance(layer, QuantLinear))


def weight_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of ``module``'s weights by kind: ``packed`` (QuantLinear buffers: packed words, scales,
    zeros, g_idx), ``dense`` (every other parameter and persistent buffer, oneDNN-packed ones by their
    dense size) and ``total``. Tied tensors count once."""
    seen: set[int] = set()
    packed = dense = 0
    for sub in module.modules():
        quant = isinstance(sub, QuantLinear)
        tensors = list(sub._parameters.items()) + [
            (n, b) for n, b in sub._buffers.items() if n not in sub._non_persistent_buffers_set
        ]
        for name, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            size = t.numel() * t.element_size()  # oneDNN-packed weights too: their dense size
            if quant and name != "bias":
                packed += size
            else:
                dense += size
        if quant and sub.int4 is not None:
            packed += sub.int4.nbytes()
        if quant and sub._cpu_arrays is not None and (sub.scales is None or sub.scales.dtype != torch.float32):
            packed += sub._cpu_arrays.scales.nbytes  # the CPU kernel's fp32 copy of the scales
        kept = getattr(sub, "dense_weight", None)  # pack_in_place's fp32 copy for the few-row kernel
        if isinstance(kept, torch.Tensor) and id(kept) not in seen:
            seen.add(id(kept))
            dense += kept.numel() * kept.element_size()
    return {"dense": dense, "packed": packed, "total": dense + packed}
