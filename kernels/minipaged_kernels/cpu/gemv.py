"""Skinny fp32 products on CPU, ``x @ weight.T`` for a handful of rows, JIT-compiled by numba.

With one to four sequences running, a decode step's linears are matrix-vector products:
each weight byte is used once or a few times, so the step is bound by how fast the
weights stream from memory. oneDNN's inner product over its packed weight (what
``minipaged.models.linear`` uses for every other batch size) streams small weights
well below the memory bandwidth; this loop, which reads each dense weight row once
and dots it with every input row while the row sits in L1, streams them closer to it.
The rule: at 1-4 rows the loop is faster than the packed path, at 8 rows they are
level, and from 16 rows the packed GEMM's register blocking wins, hence ``MAX_ROWS``.
Blocking two weight rows by two input rows per pass buys nothing at 1-8 rows, so each
pass takes one weight row. The gain is in the layers' small matrices: on SmolLM2's
113 MB LM head the two are level, so the model's LM head stays on the packed path.
Re-measure with ``python -m minipaged.benchmarks.step --batch 1 --few-row-linear on off
--rounds 3 --skip-transformers`` (and ``--batch 4``, ``8``, ``16``).

The reference is ``F.linear``; ``tests/kernels/test_cpu_gemv.py`` compares the two. The dot
products are fp32 with SIMD partial sums (``fastmath`` reassociation), so results
differ from PyTorch's by rounding, as its own kernels do across CPUs and batch sizes.
"""

from __future__ import annotations

import numpy as np
import torch

from minipaged_kernels.cpu._jit import FASTMATH, numba, set_launch_threads

# Up to this many rows the weight-streaming loop beats oneDNN's packed GEMM (see above).
MAX_ROWS = 4
# Row ranges per thread: a few per thread evens out a thread that starts late.
_CHUNKS_PER_THREAD = 4


def available() -> bool:
    """Whether numba is importable, i.e. ``linear`` can run."""
    return numba is not None


def applies_to(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` takes these operands: numba present, at most ``MAX_ROWS`` rows of fp32
    CPU ``x [rows, in_features]``, a dense fp32 CPU ``weight [out_features, in_features]``, a
    ``bias`` that is ``None`` or fp32 CPU ``[out_features]``, no autograd."""
    return _weight_fits(weight) and _inputs_fit(x, weight, bias)


def _weight_fits(weight: torch.Tensor) -> bool:
    """numba present and ``weight`` a dense fp32 CPU matrix."""
    return (
        numba is not None
        and weight.layout == torch.strided
        and weight.is_cpu
        and weight.dtype == torch.float32
        and weight.dim() == 2
    )


def _inputs_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The checks of ``applies_to`` on ``x`` and ``bias``, for a ``weight`` that ``_weight_fits``."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.shape[1] == weight.shape[1]
        and x.dtype == torch.float32
        and x.is_cpu
        and (bias is None or (bias.is_cpu and bias.dtype == torch.float32 and bias.shape == (weight.shape[0],)))
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
    )


def _rows(x, weight, bias, out, n0, n1):
    """``out[:, n] = x @ weight[n] (+ bias[n])`` for ``n`` in ``[n0, n1)``; ``x [M, K]``,
    ``weight [N, K]``, ``bias [N]`` or ``None``, ``out [M, N]``, all fp32."""
    num_rows, in_features = x.shape
    for n in range(n0, n1):
        for m in range(num_rows):  # the weight row stays in L1 across the input rows
            acc = np.float32(0.0)
            for k in range(in_features):
                acc += x[m, k] * weight[n, k]
            if bias is not None:
                acc += bias[n]
            out[m, n] = acc


def _rows_parallel(x, weight, bias, out, chunks):
    """``_rows`` over all of ``weight``, its rows cut into ``chunks`` ranges spread over numba's threads."""
    num_out = weight.shape[0]
    step = (num_out + chunks - 1) // chunks
    for c in numba.prange(chunks):
        _rows(x, weight, bias, out, min(num_out, c * step), min(num_out, (c + 1) * step))


# As in minipaged_kernels.cpu.decode_attention: the body is compiled on its own, not inside the
# prange loop, whose parallel pipeline vectorises inner loops worse.
if numba is not None:
    _rows = numba.njit(cache=True, fastmath=FASTMATH)(_rows)
    _rows_parallel = numba.njit(parallel=True, cache=True, fastmath=FASTMATH)(_rows_parallel)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the few rows ``applies_to`` accepts: ``x [rows, in_features]``,
    ``weight [out_features, in_features]``, ``bias [out_features]`` or ``None``; returns ``[rows, out_features]``.

    Raises ``ValueError`` for operands ``applies_to`` refuses and ``RuntimeError`` without numba.
    """
    if numba is None:
        raise RuntimeError("the CPU GEMV kernel needs numba: pip install 'minipaged[cpu]'")
    if not applies_to(x, weight, bias):
        got_bias = "none" if bias is None else f"{tuple(bias.shape)} {bias.dtype} on {bias.device}"
        raise ValueError(
            f"cpu_gemv.linear takes 1-{MAX_ROWS} fp32 CPU rows, a dense fp32 CPU weight of the same "
            f"in_features and an fp32 CPU bias of its out_features or none, got x {tuple(x.shape)} "
            f"{x.dtype} on {x.device}, weight {tuple(weight.shape)} {weight.dtype} ({weight.layout}) on "
            f"{weight.device}, bias {got_bias}"
        )
    return linear_unchecked(x, weight, bias)


def linear_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear`` without its checks, for a caller that has just asked ``applies_to``."""
    return _launch(x, weight.detach().contiguous().numpy(), bias)


def _launch(x: torch.Tensor, weight: np.ndarray, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [rows, in_features] @ weight.T (+ bias)`` into a new ``[rows, out_features]`` tensor,
    serially or over torch's thread count; operands already checked."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    x_np = x.detach().contiguous().numpy()
    b_np = None if bias is None else bias.detach().contiguous().numpy()
    threads = set_launch_threads()
    if threads == 1:
        _rows(x_np, weight, b_np, out.numpy(), 0, weight.shape[0])
    else:
        _rows_parallel(x_np, weight, b_np, out.numpy(), threads * _CHUNKS_PER_THREAD)
    return out


class DenseWeight:
    """A dense fp32 CPU ``weight [out_features, in_features]`` checked once, for many ``linear`` calls.

    A model multiplies by the same weights every step: checking a weight (and taking its
    numpy view) once leaves each call only the input's checks (``takes``). At 1-4 rows a
    product takes tens of microseconds, so the checks ``linear`` repeats on every call are
    a visible share of it. ``weight`` is held as given; edits to it in place reach the
    products, a different tensor needs a new ``DenseWeight``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        if not weight_applies(weight):
            raise ValueError(
                f"DenseWeight takes a dense, contiguous fp32 CPU [out_features, in_features] weight, got "
                f"{tuple(weight.shape)} {weight.dtype} ({weight.layout}) on {weight.device}"
            )
        self.weight = weight
        self._array = weight.detach().numpy()  # a view: shares the weight's memory

    def takes(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        """``applies_to(x, self.weight, bias)``, without re-checking the weight."""
        return _inputs_fit(x, self.weight, bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, self.weight, bias)`` for operands ``takes`` accepts (not checked again here):
        ``x [rows, in_features]`` -> ``[rows, out_features]``."""
        return _launch(x, self._array, bias)


def weight_applies(weight: torch.Tensor) -> bool:
    """Whether ``DenseWeight`` takes ``weight``: numba present, a dense contiguous fp32 CPU matrix."""
    return _weight_fits(weight) and weight.is_contiguous()
