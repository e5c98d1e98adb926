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
CPUs. RoPE also takes bf16, read as bit patterns (numba has no bf16), widened to fp32
exactly, each product and difference rounded back to bf16 as PyTorch's bf16 ops round
them: bit-equal to the bf16 formula. RMSNorm in bf16 rounds a value whose fp32 statistics
depend on the order of the sum of squares, and a kernel that summed in another order would
move a few bf16 roundings per million, enough to change bf16 greedy tokens where two logits
tie; so ``add_rms_norm_bf16`` sums in the order of PyTorch's CPU sum kernel
(``torch_order_sum``) and is bit-equal to the bf16 formula, which
``bf16_norm_matches_torch`` checks on this host before the model uses it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from minipaged_kernels.cpu._jit import FASTMATH, numba

# PyTorch's CPU sum kernel (ATen's SumKernel.cpp, ``cascade_sum``) reduces a contiguous row in
# vectors of this many floats (its AVX2 build, which x86 CPUs with AVX-512 run too), in 4 interleaved
# accumulators, each cascaded over 4 levels of 16 steps. ``torch_order_sum`` follows it.
TORCH_SUM_LANES = 8
# Rows at least this long may be split across threads by PyTorch's reduction (its grain size),
# which changes the order: ``add_rms_norm_bf16`` is not used for them.
TORCH_REDUCE_GRAIN = 32768
# Up to this many rows the bf16 kernel takes less time than PyTorch's ops (one thread against two,
# about 9 against 15 us at one 576-wide row, level near 20 rows); re-measure by timing
# ``add_rms_norm_bf16`` against ``weight * F.rms_norm(x.add_(residual), ...)`` at 1-32 rows.
BF16_NORM_MAX_ROWS = 16


def available() -> bool:
    """Whether numba is importable, i.e. the fused ops can run."""
    return numba is not None


def norm_applies_to(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether ``add_rms_norm`` takes these: numba present, fp32 CPU tensors, no autograd on ``x``."""
    # Spelled out (no helper, no generator): the model asks on every norm of every step.
    return (
        numba is not None
        and x.dtype == torch.float32
        and x.is_cpu
        and weight.dtype == torch.float32
        and weight.is_cpu
        and (residual is None or (residual.dtype == torch.float32 and residual.is_cpu))
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def rope_applies_to(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope_`` takes these: numba present, fp32 or bf16 CPU tensors of one dtype, no autograd on ``x``."""
    return (
        numba is not None
        and (x.dtype == torch.float32 or x.dtype == torch.bfloat16)
        and x.is_cpu
        and cos.dtype == x.dtype
        and sin.dtype == x.dtype
        and cos.is_cpu
        and sin.is_cpu
        and not (x.requires_grad and torch.is_grad_enabled())
    )


# bf16 tensors reach the RoPE kernel as their raw 16-bit patterns, viewed as int16 (numba has
# no bf16 type; torch hands int16 to numpy faster than uint16).
def _bf16_to_f32(bits):
    """The fp32 value of a bf16 bit pattern (int16): its top 16 bits, exactly."""
    return np.uint32((np.uint32(bits) & np.uint32(0xFFFF)) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(value):
    """The bf16 bit pattern (int16) nearest ``value`` (fp32), ties to even, NaN as 0x7FC0: torch's own
    rounding, so an op done here in fp32 and rounded once gives torch's bf16 op's bits."""
    if value != value:
        return np.int16(0x7FC0)
    bits = np.float32(value).view(np.uint32)
    return np.int16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


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


def _add_squares(x, quad, lanes, acc):
    """``acc[0, k] += x[v] * x[v]`` lane by lane for the 4 vectors ``v = 4 * quad + k`` of bf16 bit
    patterns ``x`` (``lanes`` floats each)."""
    for k in range(4):
        base = (quad * 4 + k) * lanes
        for lane in range(lanes):
            v = _bf16_to_f32(x[base + lane])
            acc[0, k, lane] += v * v


def _torch_order_sum(x, lanes, acc):
    """Sum of the squares of bf16 bit patterns ``x [D]``, in fp32, added in the order of PyTorch's CPU
    sum kernel over a contiguous row: ``D // lanes`` vectors, taken 4 at a time into 4 accumulators
    that cascade through 4 levels every 16 steps, then the leftover vectors, the accumulators in turn,
    the leftover elements, and the lanes one by one; a row shorter than one vector, as single floats.
    ``acc`` is scratch ``[4, 4, lanes]`` fp32."""
    dim = x.shape[0]
    if dim < lanes:  # PyTorch's scalar kernel: the same cascade, over single floats
        lanes = 1
    num_vecs = dim // lanes
    num_quads = num_vecs // 4
    acc[:] = 0
    level_power = 4  # max(4, ceil(log2(num_quads)) // 4): 4 for any row under TORCH_REDUCE_GRAIN
    step = 1 << level_power
    i = 0
    while i + step <= num_quads:
        for _ in range(step):
            _add_squares(x, i, lanes, acc)
            i += 1
        for j in range(1, 4):  # carry each level into the next, as far as i's bits say
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & ((step - 1) << (j * level_power)):
                break
    while i < num_quads:
        _add_squares(x, i, lanes, acc)
        i += 1
    for j in range(1, 4):
        acc[0] += acc[j]
    for m in range(num_quads * 4, num_vecs):
        for lane in range(lanes):
            v = _bf16_to_f32(x[m * lanes + lane])
            acc[0, 0, lane] += v * v
    for k in range(1, 4):
        acc[0, 0] += acc[0, k]
    total = np.float32(0.0)
    for d in range(num_vecs * lanes, dim):
        v = _bf16_to_f32(x[d])
        total += v * v
    for lane in range(lanes):
        total += acc[0, 0, lane]
    return total


def _inverse_rms(x, eps, lanes, acc):
    """``1 / sqrt(mean(x^2) + eps)`` of one row of bf16 bit patterns, in fp32 as PyTorch's
    ``rsqrt(x.float().pow(2).mean() + eps)`` computes it."""
    mean = _torch_order_sum(x, lanes, acc) / np.float32(x.shape[0])
    return np.float32(1.0) / np.sqrt(mean + eps)


def _inverse_rms_rows(x, eps, lanes, out):
    """``_inverse_rms`` of each row of ``x [T, D]`` into ``out [T]`` (for the host check)."""
    acc = np.empty((4, 4, lanes), np.float32)
    for t in range(x.shape[0]):
        out[t] = _inverse_rms(x[t], eps, lanes, acc)


def _rms_norm_rows_bf16(x, residual, weight, eps, lanes, out):
    """``_rms_norm_rows`` on bf16 bit patterns, rounding where the bf16 formula rounds: the residual sum
    to bf16, the statistics in fp32 (``_torch_order_sum``), the normalised row to bf16, then its product
    with the weight to bf16."""
    num_rows, dim = x.shape
    acc = np.empty((4, 4, lanes), np.float32)
    for t in range(num_rows):
        if residual is not None:
            for d in range(dim):
                x[t, d] = _f32_to_bf16(_bf16_to_f32(x[t, d]) + _bf16_to_f32(residual[t, d]))
        inv = _inverse_rms(x[t], eps, lanes, acc)
        for d in range(dim):
            normed = _round_bf16(_bf16_to_f32(x[t, d]) * inv)
            out[t, d] = _f32_to_bf16(normed * _bf16_to_f32(weight[d]))


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


def _round_bf16(value):
    """``value`` (fp32) rounded to bf16, as fp32."""
    return _bf16_to_f32(_f32_to_bf16(value))


def _rope_rows_bf16(x, cos, sin):
    """``_rope_rows`` on bf16 bit patterns, each product and difference rounded to bf16 as the
    PyTorch formula's bf16 ops round them: bit-equal to it."""
    num_rows, num_heads, head_dim = x.shape
    half = head_dim // 2
    for t in range(num_rows):
        for h in range(num_heads):
            for i in range(half):
                x1, x2 = _bf16_to_f32(x[t, h, i]), _bf16_to_f32(x[t, h, half + i])
                c, s = _bf16_to_f32(cos[t, i]), _bf16_to_f32(sin[t, i])
                x[t, h, i] = _f32_to_bf16(_round_bf16(x1 * c) - _round_bf16(x2 * s))
                x[t, h, half + i] = _f32_to_bf16(_round_bf16(x2 * c) + _round_bf16(x1 * s))


if numba is not None:
    _bf16_to_f32 = numba.njit(inline="always")(_bf16_to_f32)
    _f32_to_bf16 = numba.njit(inline="always")(_f32_to_bf16)
    _round_bf16 = numba.njit(inline="always")(_round_bf16)
    # RMSNorm's sum needs FASTMATH to vectorise; RoPE has no reduction and keeps PyTorch's
    # rounding without it (no FMA contraction of a * b - c * d).
    _rms_norm_rows = numba.njit(cache=True, fastmath=FASTMATH)(_rms_norm_rows)
    # No fastmath: the point of these is PyTorch's exact order of additions.
    _add_squares = numba.njit(inline="always")(_add_squares)
    _torch_order_sum = numba.njit(cache=True)(_torch_order_sum)
    _inverse_rms = numba.njit(cache=True)(_inverse_rms)
    _inverse_rms_rows = numba.njit(cache=True)(_inverse_rms_rows)
    _rms_norm_rows_bf16 = numba.njit(cache=True)(_rms_norm_rows_bf16)
    _rope_rows = numba.njit(cache=True)(_rope_rows)
    _rope_rows_bf16 = numba.njit(cache=True)(_rope_rows_bf16)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 ``values`` rounded to bf16 as the kernels round, as int16 bit patterns (for tests)."""
    return _to_bf16_bits(values.astype(np.float32))


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """int16 bf16 bit patterns widened to fp32 as the kernels widen them (for tests)."""
    return _from_bf16_bits(bits.astype(np.int16))


def _to_bf16_bits(values):
    out = np.empty(values.shape, dtype=np.int16)
    for i in range(values.size):
        out[i] = _f32_to_bf16(values[i])
    return out


def _from_bf16_bits(bits):
    out = np.empty(bits.shape, dtype=np.float32)
    for i in range(bits.size):
        out[i] = _bf16_to_f32(bits[i])
    return out


if numba is not None:
    _to_bf16_bits = numba.njit(_to_bf16_bits)
    _from_bf16_bits = numba.njit(_from_bf16_bits)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t``'s memory: fp32 as is, bf16 as its bit patterns (int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)`` for ``x [T, D]`` (``residual`` ``[T, D]``
    or ``None``); the sum is written into ``x``, which is returned as the new residual.
    fp32 CPU tensors (``norm_applies_to``)."""
    out = torch.empty_like(x)
    x_np = x.numpy()  # a view: the in-place sum lands in x
    _rms_norm_rows(
        x_np, None if residual is None else residual.numpy(), weight.detach().numpy(), np.float32(eps), out.numpy()
    )
    return out, x


def bf16_norm_applies_to(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> bool:
    """Whether ``add_rms_norm_bf16`` takes these: numba present, contiguous bf16 CPU ``x [T, D]``,
    ``weight [D]`` and ``residual [T, D]`` (or ``None``), ``T`` at most ``BF16_NORM_MAX_ROWS``, ``D``
    under ``TORCH_REDUCE_GRAIN``, no autograd, and the kernel bit-equal to PyTorch on this host for
    ``D`` and ``eps`` (``bf16_norm_matches_torch``)."""
    return (
        numba is not None
        and x.dtype == torch.bfloat16
        and x.is_cpu
        and x.dim() == 2
        and x.shape[0] <= BF16_NORM_MAX_ROWS
        and x.is_contiguous()
        and weight.dtype == torch.bfloat16
        and weight.is_cpu
        and weight.shape == x.shape[1:]
        and weight.is_contiguous()
        and (
            residual is None
            or (
                residual.dtype == torch.bfloat16
                and residual.is_cpu
                and residual.shape == x.shape
                and residual.is_contiguous()
            )
        )
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.shape[1] < TORCH_REDUCE_GRAIN
        and bf16_norm_matches_torch(x.shape[1], eps)
    )


def add_rms_norm_bf16(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm`` for bf16: ``(weight * rms_norm(x + residual), x + residual)`` for ``x [T, D]``,
    ``weight [D]``, ``residual [T, D]`` or ``None``; bit-equal, for finite inputs, to PyTorch's bf16 ops
    (``x.add_(residual)``, then ``weight * F.rms_norm(x, (D,), None, eps)``) where
    ``bf16_norm_applies_to``. The sum is written into ``x``, which is returned as the new residual."""
    out = torch.empty_like(x)
    _rms_norm_rows_bf16(
        _bits(x),
        None if residual is None else _bits(residual),
        _bits(weight.detach()),
        np.float32(eps),
        TORCH_SUM_LANES,
        _bits(out),
    )
    return out, x


def torch_order_sum(x: torch.Tensor) -> float:
    """The fp32 sum of squares of a bf16 row ``x [D]`` in PyTorch's CPU summation order (for tests)."""
    return float(
        _torch_order_sum(_bits(x.contiguous()), TORCH_SUM_LANES, np.empty((4, 4, TORCH_SUM_LANES), np.float32))
    )


@functools.cache
def bf16_norm_matches_torch(dim: int, eps: float) -> bool:
    """Whether ``add_rms_norm_bf16`` gives PyTorch's bits for rows of ``dim`` and this ``eps`` on this host
    (a CPU or PyTorch build that sums in another order does not). Checked once per ``(dim, eps)`` on
    seeded random rows, step by step where a difference would hide in the bf16 output (there one ulp
    of fp32 shows a few times per million elements): the fp32 sums of squares, the fp32 inverse norms,
    then the outputs."""
    if numba is None:
        return False
    gen = torch.Generator().manual_seed(dim)
    rows = (torch.randn(16, dim, generator=gen) * torch.logspace(-3, 3, 16)[:, None]).bfloat16()
    wide = rows.float()
    sums = torch.tensor([torch_order_sum(row) for row in rows], dtype=torch.float32)
    inverse = torch.empty(16, dtype=torch.float32)
    _inverse_rms_rows(_bits(rows), np.float32(eps), TORCH_SUM_LANES, inverse.numpy())
    if not torch.equal(sums, wide.pow(2).sum(-1)):
        return False
    if not torch.equal(inverse, torch.rsqrt(wide.pow(2).mean(-1) + eps)):
        return False
    residual = torch.randn(16, dim, generator=gen).bfloat16()
    weight = torch.rand(dim, generator=gen).bfloat16()
    expected_sum = rows.clone().add_(residual)
    expected = weight * F.rms_norm(expected_sum, (dim,), None, eps)
    got, got_sum = add_rms_norm_bf16(rows.clone(), weight, eps, residual)
    return torch.equal(got.view(torch.int16), expected.view(torch.int16)) and torch.equal(
        got_sum.view(torch.int16), expected_sum.view(torch.int16)
    )


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place (any strides, e.g. the q and k columns of a qkv product)
    by ``cos``/``sin`` ``[T, 1, D // 2]``; returns ``x``. fp32 or bf16 CPU tensors of one dtype."""
    kernel = _rope_rows_bf16 if x.dtype == torch.bfloat16 else _rope_rows
    kernel(_bits(x), _bits(cos.reshape(cos.shape[0], -1)), _bits(sin.reshape(sin.shape[0], -1)))
    return x
