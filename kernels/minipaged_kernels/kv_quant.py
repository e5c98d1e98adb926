"""The quantized KV cache's number format, defined once in PyTorch: int8 and fp8 (e4m3).

- ``"int8"``: symmetric, one fp32 scale per row (a (token, KV head) row of ``head_dim``
  values): ``scale = amax(|row|) / 127``, ``q = round(x / scale)`` (half to even),
  dequantized as ``q * scale``.
- ``"fp8_e4m3"``: ``float8_e4m3fn`` elements with one fp32 scale per layer:
  ``q = fp8(clamp(x / scale, -448, 448))``, round to nearest even; values beyond the
  range saturate at +-448 instead of turning into NaN (e4m3fn has no infinity).

The Triton kernels (``_kv_quant`` holds their device functions), the numba CPU kernel and
the naive references all compute on the numbers these functions define; the engine's
cache allocation and block copies live in ``minipaged.attention.kv_quant``.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# Storage dtype of each quantized kind; fp8 needs torch >= 2.1 (None before).
STORAGE = {"int8": torch.int8, "fp8_e4m3": getattr(torch, "float8_e4m3fn", None)}
_QMAX = {"int8": INT8_MAX, "fp8_e4m3": FP8_E4M3_MAX}
SCALE_BYTES = 4


def quantize(x: torch.Tensor, kind: str, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows ``x [..., head_dim]``; returns ``(data, scale)``.

    ``scale=None``: one scale per row, ``amax / qmax`` (shape ``x.shape[:-1]``); else the
    given fp32 ``[1]`` (per-layer) scale. Math in fp32; int8 rounds half to even and
    clamps to +-127, fp8 clamps to +-448 (saturation) and rounds to nearest even.
    """
    xf = x.float()
    if scale is None:
        scale = xf.abs().amax(dim=-1) / _QMAX[kind]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = xf / safe[..., None]
    if kind == "int8":
        return torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    return y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(STORAGE["fp8_e4m3"]), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data [..., head_dim]`` times its row scale (or the layer scale ``[1]``), in fp32, cast to ``dtype``."""
    return (data.float() * scale[..., None]).to(dtype)


def calibrated_scale(amax: float, kind: str = "fp8_e4m3") -> float:
    """The per-layer scale that maps the largest observed ``|x|`` onto the format's largest value."""
    return max(float(amax), 1e-12) / _QMAX[kind]
