"""Argument validation shared by the kernel wrappers and the references.

Every check raises ``ValueError`` naming the offending argument, so a wrong call
fails loudly instead of reading or writing out of bounds.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Check that ``t`` is a tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    """Check that all named tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev}, but other arguments are on {first}")


def check_kv_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> tuple[int, int, int, int]:
    """Validate a paged cache pair ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    ``dtypes``: the accepted cache dtypes (references also take float64).
    Returns ``(num_blocks, block_size, num_kv_heads, head_dim)``.
    """
    check_tensor("k_cache", k_cache, 4, dtypes)
    check_tensor("v_cache", v_cache, 4, dtypes)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last (head_dim) dimension")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if block_size < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"k_cache has an empty dimension: shape {tuple(k_cache.shape)}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_block_tables(
    block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int, block_size: int
) -> None:
    """Validate ``block_tables [num_seqs, max_blocks]`` and ``context_lens [num_seqs]``.

    Every block a sequence uses (the first ``ceil(context_len / block_size)`` entries
    of its row) must be a valid physical block id; a context longer than the table
    can hold is an error. Entries past a sequence's used blocks are never read.
    This inspects values, so it synchronises with the device once.
    """
    check_tensor("block_tables", block_tables, 2, INDEX_DTYPES)
    check_tensor("context_lens", context_lens, 1, INDEX_DTYPES)
    num_seqs, max_blocks = block_tables.shape
    if context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries but block_tables has {num_seqs} rows")
    if num_seqs == 0:
        return
    lens = context_lens.to("cpu", torch.int64)
    if int(lens.min()) < 1:
        raise ValueError(f"context_lens must be >= 1, got min {int(lens.min())}")
    blocks_needed = (lens + block_size - 1) // block_size
    if int(blocks_needed.max()) > max_blocks:
        bad = int(torch.argmax(blocks_needed))
        raise ValueError(
            f"context_lens[{bad}]={int(lens[bad])} needs {int(blocks_needed[bad])} blocks "
            f"but block_tables has only {max_blocks} columns"
        )
    tables = block_tables.to("cpu", torch.int64)
    used = torch.arange(max_blocks).unsqueeze(0) < blocks_needed.unsqueeze(1)
    used_ids = tables[used]
    if used_ids.numel() and (int(used_ids.min()) < 0 or int(used_ids.max()) >= num_blocks):
        bad = used_ids[(used_ids < 0) | (used_ids >= num_blocks)][0]
        raise ValueError(f"block_tables holds block id {int(bad)}, outside [0, {num_blocks})")


def check_heads(num_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size, checking ``num_heads`` is a multiple of ``num_kv_heads``."""
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_heads} heads, not a multiple of the cache's {num_kv_heads} kv heads")
    return num_heads // num_kv_heads


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Return ``out`` after checking it matches ``like``, or a fresh tensor like it."""
    if out is None:
        return torch.empty_like(like)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must have shape {tuple(like.shape)}, dtype {like.dtype}, device {like.device}; "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


def check_kernel_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``check_out`` for a kernel that stores rows of ``head_dim`` contiguous elements."""
    out = check_out(out, like)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last (head_dim) dimension")
    return out


def default_scale(head_dim: int, scale: float | None) -> float:
    """Softmax scale, ``1/sqrt(head_dim)`` unless given; must be a positive finite number."""
    if scale is None:
        return head_dim**-0.5
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def check_cu_seqlens_q(cu_seqlens_q: torch.Tensor, num_tokens: int, context_lens: torch.Tensor) -> None:
    """Validate packed-query offsets ``cu_seqlens_q [num_seqs + 1]`` against
    ``num_tokens`` packed rows and ``context_lens [num_seqs]``.

    Offsets start at 0, never decrease and end at ``num_tokens``; a sequence's new
    tokens cannot outnumber its context (prefix + new). Synchronises with the device.
    """
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, INDEX_DTYPES)
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}")
    cu = cu_seqlens_q.to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    new_lens = cu[1:] - cu[:-1]
    if num_seqs and int(new_lens.min()) < 0:
        bad = int(torch.argmin(new_lens))
        raise ValueError(f"cu_seqlens_q decreases at index {bad}: {int(cu[bad])} -> {int(cu[bad + 1])}")
    if int(cu[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens_q ends at {int(cu[-1])}, but q has {num_tokens} tokens")
    too_long = new_lens > context_lens.to("cpu", torch.int64)
    if bool(too_long.any()):
        bad = int(torch.nonzero(too_long)[0])
        raise ValueError(
            f"cu_seqlens_q gives sequence {bad} {int(new_lens[bad])} new tokens, "
            f"more than its context_lens {int(context_lens[bad])}"
        )
