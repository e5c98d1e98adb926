"""Round-to-nearest (RTN) weight quantization, and the integer grid that GPTQ shares.

A linear weight ``W [N, K]`` (``nn.Linear`` layout: out_features x in_features) is cut along K
into groups of ``group_size`` columns (per-channel: one group of all K columns). Each row of a
group gets a scale ``s`` and an unsigned zero point ``z``, and each weight the integer

    q = clamp(round(w / s) + z, 0, 2**bits - 1),     dequantized  w' = (q - z) * s.

Symmetric: ``s = 2 * max|w| / (2**bits - 1)`` and ``z = 2**(bits-1)``, so the grid spans
``[-max|w|, max|w|]`` (compressed-tensors' and GPTQ's convention; the top code is clipped by one).
Asymmetric: ``s = (max - min) / (2**bits - 1)`` over the group's range widened to hold 0, and
``z = round(-min / s)``, so 0 is exactly representable (padding and pruned weights stay 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minipaged_kernels.quant_formats import PackedWeight, pack_int32

SUPPORTED_BITS = (4, 8)


@dataclass
class QuantizedWeight:
    """A quantized linear weight before packing, in ``nn.Linear``'s orientation.

    ``q`` int32 ``[N, K]`` unsigned in ``[0, 2**bits)``; ``scales [N, G]`` (float, the stored
    dtype); ``zeros`` int32 ``[N, G]`` unsigned; ``g_idx`` int32 ``[K]`` (the group of each input
    column) or ``None`` for contiguous groups ``k // group_size``; ``group_size`` (per-channel: K).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int

    def group_index(self) -> torch.Tensor:
        """int64 ``[K]``: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.q.shape[1]
        return torch.arange(k, device=self.q.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight ``(q - z) * s`` in ``dtype``."""
        g = self.group_index()
        return ((self.q - self.zeros[:, g]).to(torch.float32) * self.scales[:, g].to(torch.float32)).to(dtype)

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is the midpoint ``2**(bits-1)``."""
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    def to_packed(self) -> PackedWeight:
        """The kernels' canonical :class:`PackedWeight` (``[K, N]`` orientation, packed along K)."""
        n, k = self.q.shape
        return PackedWeight(
            qweight=pack_int32(self.q.t().contiguous(), self.bits),
            scales=self.scales.t().contiguous(),
            zeros=self.zeros.t().contiguous().to(torch.int32),
            g_idx=None if self.g_idx is None else self.g_idx.to(torch.int32).contiguous(),
            bits=self.bits,
            group_size=self.group_size,
            in_features=k,
            out_features=n,
        )


def check_scheme(bits: int, group_size: int | None, in_features: int) -> int:
    """The effective group size (K for per-channel ``None``); ``ValueError`` for an unsupported scheme."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size is None:
        return in_features
    if group_size < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    return group_size  # a group size that does not divide in_features leaves a short last group


def grid_params(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w [N, C]`` (one group): ``scale [N]`` in
    ``scale_dtype``, ``zero [N]`` int32 unsigned. The scale is rounded to ``scale_dtype`` here, so
    the integers computed from it are the ones that dequantize exactly with the stored scale.
    ``min_zero=1`` keeps asymmetric zero points off 0, which GPTQ's v1 layout (it stores ``z - 1``)
    cannot hold; a group of non-negative weights then gives up its top code."""
    maxq = (1 << bits) - 1
    w = w.float()
    if symmetric:
        absmax = w.abs().amax(dim=1)
        scale = 2 * absmax / maxq
        zero = torch.full_like(absmax, 1 << (bits - 1), dtype=torch.int32)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = None
    # An all-zero group: any positive scale represents it exactly; 1 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    if zero is None:
        zero = torch.round(-lo / scale.float()).clamp(min_zero, maxq).to(torch.int32)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s) + z, 0, 2**bits - 1)`` as int32; ``w [N, C]``, ``scale``/``zero`` ``[N]`` or ``[N, C]``."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    q = torch.round(w.float() / scale.float()) + zero
    return q.clamp(0, (1 << bits) - 1).to(torch.int32)


def dequantize_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in fp32; ``q [N, C]``, ``scale``/``zero`` ``[N]`` or ``[N, C]``."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return (q - zero).float() * scale.float()


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    min_zero: int = 0,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight [N, K]``, group by group along K
    (``group_size=None``: per output channel; ``min_zero`` as in :func:`grid_params`)."""
    n, k = weight.shape
    gs = check_scheme(bits, group_size, k)
    groups = -(-k // gs)  # the last group may be short
    # Zero columns pad a short last group: 0 is inside every group's range already (see grid_params),
    # so they change no scale or zero point, and they are dropped again below.
    w = torch.nn.functional.pad(weight.float(), (0, groups * gs - k))
    w = w.reshape(n * groups, gs)  # rows of one group each: row r is (channel r // groups, group r % groups)
    scale, zero = grid_params(w, bits, symmetric, scale_dtype, min_zero)
    q = quantize_to_grid(w, scale, zero, bits)
    return QuantizedWeight(
        q=q.reshape(n, groups * gs)[:, :k].contiguous(),
        scales=scale.reshape(n, groups),
        zeros=zero.reshape(n, groups),
        g_idx=None,
        bits=bits,
        group_size=gs,
    )
