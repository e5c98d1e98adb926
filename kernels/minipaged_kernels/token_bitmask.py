"""Token bitmask: set the logits of tokens a grammar forbids to -inf, in place.

A structured-output step knows, per row, which tokens the grammar allows next. It packs
that into ``bitmask [rows, ceil(vocab / 32)]`` int32: bit ``v % 32`` of word ``v // 32``
is 1 when token ``v`` is allowed (the layout xgrammar fills). Applying it before sampling
makes every forbidden token impossible, whatever the sampler does afterwards.

Three implementations, all with the same contract:

- ``apply_token_bitmask``: the Triton kernel, one program per (row, ``BLOCK_V`` tokens);
  each lane reads its token's word, tests its bit, and writes -inf only where the bit is 0
  (allowed logits are never touched, so the call moves ``rows * vocab / 8`` bytes of mask
  and only writes what it forbids).
- ``apply_token_bitmask_torch``: the same with vectorised torch ops (shift every word by
  0..31 at once), for CPU engines where the interpreter would be far too slow.
- ``reference_apply_token_bitmask`` (in ``minipaged_kernels.reference`` style, here beside
  it): unpack bit by bit in Python, the independent check of both.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import triton
import triton.language as tl

from minipaged_kernels._aot import AotSpec

# Tokens per program: a 1024-lane tile reads 32 mask words and covers a 50k vocabulary in ~50 programs per row.
BLOCK_V = 1024
NUM_WARPS = 4
BITS = 32

# The report's bytes-moved estimate: a decode step of 64 rows over a Llama-3-sized vocabulary.
REFERENCE_SHAPE = {"rows": 64, "vocab": 128256, "dtype_bytes": 4}


@triton.jit
def _token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    vocab,
    stride_lr,
    stride_lv,
    stride_br,
    BLOCK_V: tl.constexpr,
):
    """One program per (row, tile of BLOCK_V tokens): forbidden tokens' logits become -inf."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab
    words = tl.load(bitmask_ptr + row * stride_br + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    ptrs = logits_ptr + row * stride_lr + offs.to(tl.int64) * stride_lv
    minus_inf = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    tl.store(ptrs, minus_inf.to(logits_ptr.dtype.element_ty), mask=in_vocab & ~allowed)


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must be 2-D")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    rows, vocab = logits.shape
    words = (vocab + BITS - 1) // BITS
    if tuple(bitmask.shape) != (rows, words):
        raise ValueError(f"bitmask {tuple(bitmask.shape)} must be [rows, ceil(vocab/32)] = {(rows, words)}")
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask on {bitmask.device}, logits on {logits.device}")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Triton: ``logits[r, v] = -inf`` wherever bit v of ``bitmask[r]`` is 0; returns ``logits``.

    logits: ``[rows, vocab]`` fp32/fp16/bf16 (any strides); bitmask: ``[rows, ceil(vocab/32)]``
    int32 (its last dimension contiguous).
    """
    _check(logits, bitmask)
    if bitmask.stride(1) != 1:
        bitmask = bitmask.contiguous()
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        return logits
    grid = (rows, triton.cdiv(vocab, BLOCK_V))
    _token_bitmask_kernel[grid](
        logits,
        bitmask,
        vocab,
        logits.stride(0),
        logits.stride(1),
        bitmask.stride(0),
        BLOCK_V=BLOCK_V,
        num_warps=NUM_WARPS,
    )
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, words]`` int32 -> bool ``[rows, vocab]``, True where allowed (vectorised shifts).

    On a little-endian CPU the words' bytes are the tokens in order, 8 to a byte, least
    significant bit first: numpy's ``unpackbits`` reads them several times faster than shifts.
    """
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Torch ops, same contract as ``apply_token_bitmask`` (the CPU engine's path); returns ``logits``."""
    _check(logits, bitmask)
    return logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[1]), float("-inf"))


def reference_apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Naive: a new tensor, each bit read with Python integer shifts. logits ``[rows, vocab]``."""
    _check(logits, bitmask)
    out = logits.clone()
    words = bitmask.tolist()
    for r in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            if (words[r][v // BITS] >> (v % BITS)) & 1 == 0:
                out[r, v] = float("-inf")
    return out


def bytes_moved(shape: dict) -> int:
    """Bytes a call must move at least: read the mask (the -inf writes depend on how much it forbids)."""
    return shape["rows"] * (shape["vocab"] + BITS - 1) // BITS * 4


def aot_specs() -> list[AotSpec]:
    """Every configuration ``apply_token_bitmask`` can launch: one per logits dtype."""
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        signature = {
            "logits_ptr": f"*{dtype}",
            "bitmask_ptr": "*i32",
            "vocab": "i32",
            "stride_lr": "i32",
            "stride_lv": "i32",
            "stride_br": "i32",
            "BLOCK_V": "constexpr",
        }
        specs.append(
            AotSpec(
                kernel="token_bitmask",
                config=f"logits={dtype}",
                fn=_token_bitmask_kernel,
                signature=signature,
                constexprs={"BLOCK_V": BLOCK_V},
                num_warps=NUM_WARPS,
                num_stages=1,
            )
        )
    return specs
