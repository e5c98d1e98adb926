"""GPTQ (Frantar et al., 2022, Algorithm 1): quantize a linear layer column by column, each
column's rounding error pushed onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss on calibration activations.

For a layer ``y = x W^T`` with calibration inputs ``X [n, K]``, the loss ``||X W^T - X Q^T||^2``
has Hessian ``H = 2 X^T X / n`` (per output row; the same for every row). Quantizing column ``j``
to ``q_j`` with error ``e = (w_j - q_j) / [H^-1]_jj`` and updating the remaining columns by
``w_{j+1:} -= e [H^-1]_{j, j+1:}`` keeps the loss minimal given the columns already fixed (the
OBS update). The inverse Hessian rows needed are those of the upper Cholesky factor of ``H^-1``,
computed once. Updates are applied lazily in blocks of ``block_size`` columns: inside a block
column by column, to the columns after the block in one matrix product per block.

Group-wise scales are computed at each group boundary from the weights as they are *then*
(already corrected by the earlier columns' errors). With ``act_order`` (``desc_act``) columns are
visited in order of decreasing ``diag(H)`` (the inputs with the most energy first, while the most
columns remain to absorb their error); groups are then runs of that order, and ``g_idx`` records
each original column's group.
"""

from __future__ import annotations

import torch

from minipaged.models.quantization.rtn import (
    QuantizedWeight,
    check_scheme,
    dequantize_grid,
    grid_params,
    quantize_to_grid,
)


class HessianAccumulator:
    """Running ``H = 2 X^T X / n`` over calibration inputs of one linear layer, ``H [K, K]`` float64.

    ``add`` takes inputs of any leading shape ``[..., K]`` (every row is one sample), so a
    forward hook can pass the layer's input as it arrives.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x [..., K]``."""
        x = x.detach().reshape(-1, self.in_features).to(torch.float64)
        self.sum += x.t() @ x
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` (float64 ``[K, K]``); zeros before any input."""
        return 2 * self.sum / max(self.count, 1)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``), float64 ``[K, K]``.

    Row ``j`` of ``U`` divided by ``U[j, j]`` is the OBS update of the columns after ``j`` once
    columns ``< j`` are fixed, which is what the column loop needs, without re-inverting.
    Dampening keeps ``H`` positive definite when the calibration set is smaller than ``K`` or
    inputs are correlated; it is raised (x10) until the factorization succeeds.
    """
    h = hessian.to(torch.float64)
    mean_diag = torch.diag(h).mean().clamp(min=1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError("the Hessian is not positive definite even after dampening; is the calibration input empty?")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    min_zero: int = 0,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight [N, K]`` given its input Hessian ``hessian [K, K]`` (see the module docstring).

    ``group_size=None`` is per output channel; ``damp`` is the fraction of ``mean(diag H)`` added to
    the diagonal; ``act_order`` visits columns by decreasing ``diag(H)`` and returns a ``g_idx``;
    ``block_size`` is best a multiple of ``group_size`` (a group's grid then sees all earlier updates);
    ``scale_dtype`` and ``min_zero`` as in :func:`~minipaged.models.quantization.rtn.grid_params`.
    """
    n, k = weight.shape
    gs = check_scheme(bits, group_size, k)
    if hessian.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(k, k)}")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    # Inputs that were always 0 carry no information: their weights do not matter, and a unit
    # diagonal keeps H invertible.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)

    groups = -(-k // gs)  # the last group may be short
    q = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(n, groups, dtype=scale_dtype)
    zeros = torch.zeros(n, groups, dtype=torch.int32)
    scale = zero = None
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end]  # a view: column updates inside the block land in ``w``
        err = torch.zeros(n, end - start, dtype=torch.float64)
        for i in range(end - start):
            col = start + i
            if col % gs == 0:  # a new group (in visiting order): its grid from the corrected weights
                scale, zero = grid_params(w[:, col : col + gs], bits, symmetric, scale_dtype, min_zero)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            column = block[:, i]
            q[:, col] = quantize_to_grid(column[:, None], scale, zero, bits)[:, 0]
            deq = dequantize_grid(q[:, col : col + 1], scale, zero)[:, 0].to(torch.float64)
            e = (column - deq) / u[col, col]
            # The OBS step: the columns still to come in this block absorb this column's error.
            block[:, i:] -= e[:, None] * u[col, start:end][None, i:]
            err[:, i] = e
        # The same correction for every column after the block, in one product.
        w[:, end:] -= err @ u[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = None
    if act_order:
        # Column perm[j] was visited j-th, so it belongs to group j // gs.
        g_idx = (torch.arange(k) // gs)[inverse].to(torch.int32)
    return QuantizedWeight(
        q=q[:, inverse].contiguous(),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=gs,
    )


def layer_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X W^T - X Q^T||^2 / n = tr((W - Q) H (W - Q)^T) / 2`` for ``H = 2 X^T X / n``: the loss GPTQ minimizes."""
    d = (weight.to(torch.float64) - quantized.to(torch.float64)).t()
    return float(torch.sum(d * (hessian.to(torch.float64) @ d)) / 2)
