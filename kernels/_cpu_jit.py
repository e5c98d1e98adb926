"""What the numba CPU kernels share: the optional import, its thread pool, and a vectorisable exp.

numba is optional (``pip install minipaged[cpu]``); ``numba`` is ``None`` without it
and callers fall back to PyTorch.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # optional dependency: callers check available()
    numba = None

if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's default OpenMP layer loads the system libgomp beside the copy bundled with
    # torch; once both pools exist, every later torch op in the process measured ~300x
    # slower (a 36x1536 SiLU: 54 us -> 20 ms, 1 thread). numba's own "workqueue" pool
    # does not interfere. Set before the first parallel call; the variable still wins.
    numba.config.THREADING_LAYER = "workqueue"

# fastmath: only reassociation and contraction, so reductions vectorise (SIMD partial
# sums, FMA) while -inf and NaN keep their meaning.
FASTMATH = {"reassoc", "contract"}

# exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln(2) / 2: Cephes' expf, fp32 throughout.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-80.0)  # exp(-80) ~ 2e-35: below anything a softmax whose max is exp(0) = 1 can see
_EXP_MAX = np.float32(88.0)  # exp(88) ~ 1.7e38, just under fp32's largest; 2^k must stay a normal number
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


def exp_shifted(x, n, m, pow2):
    """``x[:n] = exp(x[:n] - m)`` in place (arguments clamped to [-80, 88]); returns their sum.
    ``pow2``: at least ``n`` uint32 of scratch.

    numba's ``math.exp`` is one libm call per element, which took most of the decode
    kernel's time (a lone sequence of 240 tokens: 0.13 ms a layer, 0.04 ms with this).
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
