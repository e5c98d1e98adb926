"""What the numba CPU kernels share: the optional import, its thread pool, and a vectorisable exp.

numba is optional (``pip install minipaged[cpu]``); ``numba`` is ``None`` without it
and callers fall back to PyTorch.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # optional dependency: callers check available()
    numba = None


def _torch_uses_openmp() -> bool:
    """Whether torch's intra-op threads are an OpenMP pool (its Linux wheels: the bundled libgomp)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _omp_layer_importable() -> bool:
    """Whether numba's OpenMP threading layer was built and its libgomp found."""
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    return True


if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # A prange launch runs on torch's own OpenMP threads when numba's "omp" layer can load:
    # torch puts its libgomp in the process's global symbol scope first, so the OpenMP calls
    # of numba's layer bind to it, and the two share one pool. numba's own "workqueue" pool
    # would race torch's OpenMP worker, which keeps spinning for a while after each torch
    # op, and roughly double the attention time of a batched decode step that follows a
    # linear. (numba's layer also sets the runtime's nesting on; torch never opens nested
    # regions.) The variable, when set, still wins, so the two compare with
    # ``NUMBA_THREADING_LAYER=workqueue python -m minipaged.benchmarks.step --batch 32`` against the
    # same command without it.
    numba.config.THREADING_LAYER = "omp" if _torch_uses_openmp() and _omp_layer_importable() else "workqueue"


@functools.cache
def _pool_owner() -> int:
    """Start numba's thread pool once, keeping torch's thread count; the pid that owns the pool.

    Starting numba's OpenMP layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)``, which in a
    shared runtime is torch's own setting, so it is put back.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)
    return os.getpid()


def set_launch_threads() -> int:
    """Set numba's thread count for this thread's next ``prange`` launch to torch's count (within
    numba's pool) and return it.

    Returns 1, to run serially, in a process forked after the pool started: GNU OpenMP is
    not fork-safe, and numba's OpenMP layer kills such a child on its first parallel launch.
    """
    if numba is None or _pool_owner() != os.getpid():
        return 1
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


# fastmath: only reassociation and contraction, so reductions vectorise (SIMD partial
# sums, FMA) while -inf and NaN keep their meaning.
FASTMATH = {"reassoc", "contract"}

# exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln(2) / 2: Cephes' expf, fp32 throughout.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-80.0)  # exp(-80) ~ 2e-35: below anything a softmax whose max is exp(0) = 1 can see
_EXP_MAX = np.float32(88.0)  # exp(88) ~ 1.7e38, just under fp32's largest; 2^k must stay a normal number
_EXP_POLY = tuple(
    np.float32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)


def exp_shifted(x, n, m, pow2):
    """``x[:n] = exp(x[:n] - m)`` in place (arguments clamped to [-80, 88]); returns their sum.
    ``pow2``: at least ``n`` uint32 of scratch.

    numba's ``math.exp`` is one libm call per element, which would be most of the decode
    kernel's time (about 3x this polynomial's for a lone sequence of a few hundred tokens).
    The polynomial (within ~1 fp32 ulp of exp) vectorises: the first loop evaluates
    ``exp(r)`` and writes ``2^k`` as its fp32 bit pattern, the second multiplies the two.
    """
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    for t in range(n):
        y = min(max(x[t] - m, _EXP_MIN), _EXP_MAX)  # also catches -inf
        k = np.floor(y * _LOG2E + np.float32(0.5))
        r = y - k * _LN2_HI - k * _LN2_LO
        x[t] = (((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * (r * r) + r + np.float32(1.0)
        pow2[t] = np.uint32(np.int32(k) + np.int32(127)) << np.uint32(23)
    scales = pow2.view(np.float32)
    total = np.float32(0.0)
    for t in range(n):
        x[t] *= scales[t]
        total += x[t]
    return total


if numba is not None:
    exp_shifted = numba.njit(inline="always", fastmath=FASTMATH)(exp_shifted)
