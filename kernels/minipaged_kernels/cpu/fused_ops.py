"""The Llama block's elementwise work on CPU in one pass each, JIT-compiled by numba.

In a decode step these are a handful of PyTorch ops on a few rows each, so their cost
is dispatch, not arithmetic. vLLM's CPU build fuses them in C++; these are two of
those fusions written in Python, each taking a fraction of the PyTorch ops' time per
call at SmolLM2's shapes, from 1 row to prefill-sized batches:

- ``add_rms_norm``: ``residual = x + residual; out = rms_norm(residual) * weight``
  (vLLM's ``fused_add_rms_norm``), or plain RMSNorm with no residual yet (about 2.5-3x
  less time per call);
- ``rope_``: rotates the q and k heads of a qkv product in place (rotate-half
  convention; about 1.4-2x less time per call).

SiLU x up stays in PyTorch: its multi-threaded kernel wins from 32 rows up. The
references are the PyTorch formulas in ``minipaged.models.llama`` (``F.rms_norm``
and ``apply_rope``), which the model still takes off CPU, for other dtypes, or without
numba; ``tests/kernels/test_cpu_fused_ops.py`` compares the two. The arithmetic is the
references', fp32, in the same order except RMSNorm's sum of squares (SIMD partial
sums), so results differ from PyTorch's by an ulp or so, as its own kernels do across
CPUs. fp32 only: numba has no bf16.
"""

from __future__ import annotations

import numpy as np
import torch

from minipaged_kernels.cpu._jit import FASTMATH, numba


def available() -> bool:
    """Whether numba is importable, i.e. the fused ops can run."""
    return numba is not None


def applies_to(x: torch.Tensor) -> bool:
    """Whether the fused ops take ``x``: numba present, an fp32 CPU tensor, no autograd."""
    return (
        numba is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def _rms_norm_rows(x, residual, weight, eps, out):
    """``out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight`` for each row of ``x [T, D]``;
    with ``residual`` (not ``None``), ``x[t] += residual[t]`` first, in place."""
    num_rows, dim = x.shape
    for t in range(num_rows):
        sum_sq = np.float32(0.0)
        for d in range(dim):
            if residual is not None:
                x[t, d] += residual[t, d]
            sum_sq += x[t, d] * x[t, d]
        inv = np.float32(1.0) / np.sqrt(sum_sq / np.float32(dim) + eps)
        for d in range(dim):
            out[t, d] = (x[t, d] * inv) * weight[d]


def _rope_rows(x, cos, sin):
    """Rotate ``x [T, H, D]`` in place: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` per head,
    ``cos``/``sin`` ``[T, D // 2]`` (each token's position already looked up)."""
    num_rows, num_heads, head_dim = x.shape
    half = head_dim // 2
    for t in range(num_rows):
        for h in range(num_heads):
            for i in range(half):
                x1, x2 = x[t, h, i], x[t, h, half + i]
                x[t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                x[t, h, half + i] = x2 * cos[t, i] + x1 * sin[t, i]


if numba is not None:
    # RMSNorm's sum needs FASTMATH to vectorise; RoPE has no reduction and keeps PyTorch's
    # rounding without it (no FMA contraction of a * b - c * d).
    _rms_norm_rows = numba.njit(cache=True, fastmath=FASTMATH)(_rms_norm_rows)
    _rope_rows = numba.njit(cache=True)(_rope_rows)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)`` for ``x [T, D]`` (``residual`` ``[T, D]``
    or ``None``); the sum is written into ``x``, which is returned as the new residual.
    fp32 CPU tensors (``applies_to``)."""
    out = torch.empty_like(x)
    x_np = x.numpy()  # a view: the in-place sum lands in x
    _rms_norm_rows(
        x_np, None if residual is None else residual.numpy(), weight.detach().numpy(), np.float32(eps), out.numpy()
    )
    return out, x


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place (any strides, e.g. the q and k columns of a qkv product)
    by ``cos``/``sin`` ``[T, 1, D // 2]``; returns ``x``. fp32 CPU tensors."""
    _rope_rows(x.numpy(), cos.reshape(cos.shape[0], -1).numpy(), sin.reshape(sin.shape[0], -1).numpy())
    return x
