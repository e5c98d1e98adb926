"""KV-append: scatter the new tokens' keys and values into the paged cache.

Every token carries a slot, ``block_id * block_size + offset``; the kernel writes its
``[num_kv_heads, head_dim]`` key and value rows at ``cache[block_id, offset]``. A
negative slot marks a padding token and writes nothing.

The copy moves bits, not numbers: fp16 and bf16 caches are viewed as int16 and fp32
as int32, so one compiled kernel per element width serves every float dtype, the copy
is bit-exact by construction, and the interpreter (which has no bf16 arithmetic) runs
bf16 through the same path as everything else.

An int8 or fp8 cache (``minipaged_kernels._kv_quant``) takes a second kernel that quantizes on
write: one program per (token, kv head) makes a first pass over the row for its scale
``amax / qmax`` and stores it beside the row when the scales are per token (or reads the
layer's fixed scale), then a second pass stores the rounded row; both loop over
``head_dim`` in ``BLOCK_D`` lanes, so one build serves every head_dim.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from minipaged_kernels import _kv_quant
from minipaged_kernels._aot import AotSpec
from minipaged_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_kv_cache, check_same_device, check_tensor

# Lanes per step along head_dim; the kernel loops, so any head_dim works with one tile.
BLOCK_D = 64
# A 64-lane row copy keeps one warp busy; more programs, not wider ones, fill the GPU.
NUM_WARPS = 1

# The shape the report uses for its bytes-moved estimate: a decode step of 64
# sequences on a Llama-7B-like layer (32 kv heads x 128), fp16.
REFERENCE_SHAPE = {"num_tokens": 64, "num_kv_heads": 32, "head_dim": 128, "dtype_bytes": 2}

# Same-width integer views: the kernel copies raw bits.
_BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit
def _kv_append_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    block_size,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_vcb,
    stride_vco,
    stride_vch,
    BLOCK_D: tl.constexpr,
):
    """One program per (token, kv head): copy one key row and one value row."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        src_k = key_ptr + token.to(tl.int64) * stride_kt + head * stride_kh
        src_v = value_ptr + token.to(tl.int64) * stride_vt + head * stride_vh
        dst_k = k_cache_ptr + block * stride_kcb + offset * stride_kco + head * stride_kch
        dst_v = v_cache_ptr + block * stride_vcb + offset * stride_vco + head * stride_vch
        for d0 in range(0, head_dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < head_dim
            tl.store(dst_k + offs_d, tl.load(src_k + offs_d, mask=mask_d), mask=mask_d)
            tl.store(dst_v + offs_d, tl.load(src_v + offs_d, mask=mask_d), mask=mask_d)


@triton.jit
def _kv_append_quant_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_ptr,
    block_size,
    head_dim,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_vcb,
    stride_vco,
    stride_vch,
    stride_sb,
    stride_so,
    stride_sh,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    PER_TOKEN: tl.constexpr,
):
    """One program per (token, kv head): quantize one key row and one value row into the cache.

    ``PER_TOKEN``: scale = amax(|row|) / qmax, stored at the row's slot in the scale
    tensors; else the (stride-0) per-layer scale is read.
    """
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        src_k = key_ptr + token.to(tl.int64) * stride_kt + head * stride_kh
        src_v = value_ptr + token.to(tl.int64) * stride_vt + head * stride_vh
        scale_off = block * stride_sb + offset * stride_so + head * stride_sh
        if PER_TOKEN:
            k_amax = tl.zeros([BLOCK_D], tl.float32)
            v_amax = tl.zeros([BLOCK_D], tl.float32)
            for d0 in range(0, head_dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < head_dim
                k_amax = tl.maximum(k_amax, tl.abs(tl.load(src_k + offs_d, mask=mask_d, other=0.0).to(tl.float32)))
                v_amax = tl.maximum(v_amax, tl.abs(tl.load(src_v + offs_d, mask=mask_d, other=0.0).to(tl.float32)))
            qmax = 127.0 if QUANT == 1 else 448.0
            k_scale = tl.math.div_rn(tl.max(k_amax, 0), qmax)
            v_scale = tl.math.div_rn(tl.max(v_amax, 0), qmax)
            tl.store(k_scale_ptr + scale_off, k_scale)
            tl.store(v_scale_ptr + scale_off, v_scale)
        else:
            k_scale = tl.load(k_scale_ptr + scale_off)
            v_scale = tl.load(v_scale_ptr + scale_off)
        dst_k = k_cache_ptr + block * stride_kcb + offset * stride_kco + head * stride_kch
        dst_v = v_cache_ptr + block * stride_vcb + offset * stride_vco + head * stride_vch
        for d0 in range(0, head_dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < head_dim
            k = tl.load(src_k + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            v = tl.load(src_v + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            tl.store(dst_k + offs_d, _kv_quant.quantize(k, k_scale, QUANT), mask=mask_d)
            tl.store(dst_v + offs_d, _kv_quant.quantize(v, v_scale, QUANT), mask=mask_d)


def check_kv_append_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> int:
    """Validate KV-append arguments (shapes, dtypes, devices, slot range); raise ``ValueError``.

    Shared with ``minipaged_kernels.reference.kv_append`` so both accept exactly the same calls.
    Returns the cache's ``_kv_quant`` code (0 for a float cache).
    """
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache, dtypes + _kv_quant.QUANT_DTYPES)
    quant = _kv_quant.check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    key_dtypes = dtypes if quant else (k_cache.dtype,)
    check_tensor("key", key, 3, key_dtypes)
    check_tensor("value", value, 3, key_dtypes)
    if value.dtype != key.dtype:
        raise ValueError(f"value dtype {value.dtype} differs from key dtype {key.dtype}")
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    check_same_device(k_cache=k_cache, v_cache=v_cache, key=key, value=value, slot_mapping=slot_mapping)
    if tuple(key.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"key has shape {tuple(key.shape)}, expected [num_tokens, {num_kv_heads}, {head_dim}] to match k_cache"
        )
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} tokens")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must be contiguous in their last (head_dim) dimension")
    slots = slot_mapping.to("cpu", torch.int64)
    real = slots[slots >= 0]
    num_slots = num_blocks * block_size
    if real.numel() and int(real.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(real.max())}, outside the cache's {num_slots} slots")
    if real.numel() != torch.unique(real).numel():
        uniq, counts = torch.unique(real, return_counts=True)
        raise ValueError(f"slot_mapping writes slot {int(uniq[counts > 1][0])} more than once")
    return quant


def kv_append(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches in place.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, fp32,
    fp16 or bf16, same dtype as ``key``/``value``. ``slot_mapping``: int32 or int64
    ``[num_tokens]``; token ``t`` goes to slot ``slot_mapping[t]`` =
    ``block_id * block_size + offset``; a negative slot is padding and writes nothing.
    Slots must lie below ``num_blocks * block_size`` and be distinct (``ValueError``
    otherwise; checking reads ``slot_mapping`` on the host once).

    Quantized caches: ``k_cache``/``v_cache`` int8 or ``float8_e4m3fn`` with fp32
    ``k_scale``/``v_scale`` ``[num_blocks, block_size, num_kv_heads]`` (computed per row
    and written here) or ``[1]`` (a fixed per-layer scale, read); ``key``/``value`` any
    float dtype. See ``minipaged_kernels._kv_quant``.
    """
    quant = check_kv_append_args(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if quant:
        _launch_quant(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, quant)
        return
    bits = _BIT_VIEW[k_cache.dtype]
    kc, vc = k_cache.view(bits), v_cache.view(bits)
    _kv_append_kernel[(num_tokens, num_kv_heads)](
        key.view(bits),
        value.view(bits),
        kc,
        vc,
        slot_mapping,
        k_cache.shape[1],
        head_dim,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kc.stride(0),
        kc.stride(1),
        kc.stride(2),
        vc.stride(0),
        vc.stride(1),
        vc.stride(2),
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
        num_stages=1,
    )


def _launch_quant(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    quant: int,
) -> None:
    if key.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        key, value = key.float(), value.float()  # the interpreter has no bf16 arithmetic
    kc, ks = _kv_quant.kernel_views(k_cache, k_scale)
    vc, vs = _kv_quant.kernel_views(v_cache, v_scale)
    _kv_append_quant_kernel[(key.shape[0], key.shape[1])](
        key,
        value,
        kc,
        vc,
        ks,
        vs,
        slot_mapping,
        k_cache.shape[1],
        key.shape[2],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kc.stride(0),
        kc.stride(1),
        kc.stride(2),
        vc.stride(0),
        vc.stride(1),
        vc.stride(2),
        *_kv_quant.scale_strides(ks),
        BLOCK_D=BLOCK_D,
        QUANT=quant,
        PER_TOKEN=k_scale.dim() == 3,
        num_warps=NUM_WARPS,
        num_stages=1,
    )


def bytes_moved(shape: dict) -> int:
    """Bytes a call must move at least: read key+value, write them into the cache, read slots."""
    row = shape["num_kv_heads"] * shape["head_dim"] * shape["dtype_bytes"]
    return shape["num_tokens"] * (4 * row + 8)


def aot_specs() -> list[AotSpec]:
    """Every configuration ``kv_append`` can launch.

    The kernel copies bits, so fp16 and bf16 share the int16 build and fp32 uses int32;
    head_dim and block_size are runtime values. What remains is element width x slot
    index dtype.
    """
    specs = []
    for elem, dtypes in (("i32", "fp32"), ("i16", "fp16/bf16")):
        for index in ("i32", "i64"):
            signature = {
                "key_ptr": f"*{elem}",
                "value_ptr": f"*{elem}",
                "k_cache_ptr": f"*{elem}",
                "v_cache_ptr": f"*{elem}",
                "slot_ptr": f"*{index}",
                "block_size": "i32",
                "head_dim": "i32",
                **{
                    name: "i32"
                    for name in (
                        "stride_kt",
                        "stride_kh",
                        "stride_vt",
                        "stride_vh",
                        "stride_kcb",
                        "stride_kco",
                        "stride_kch",
                        "stride_vcb",
                        "stride_vco",
                        "stride_vch",
                    )
                },
                "BLOCK_D": "constexpr",
            }
            specs.append(
                AotSpec(
                    kernel="kv_append",
                    config=f"{dtypes} slots={index}",
                    fn=_kv_append_kernel,
                    signature=signature,
                    constexprs={"BLOCK_D": BLOCK_D},
                    num_warps=NUM_WARPS,
                    num_stages=1,
                )
            )
    return specs + quant_aot_specs()


def quant_aot_specs() -> list[AotSpec]:
    """The quantizing kernel: input dtype x cache (int8 / fp8 bits) x scale kind.

    Slots are int64 (the engine's); int32 slots reuse the same code with a different
    pointer type and are left to the JIT.
    """
    specs = []
    for in_ty in ("fp32", "fp16", "bf16"):
        for quant, cache_ty in ((_kv_quant.QUANT_INT8, "i8"), (_kv_quant.QUANT_FP8, "u8")):
            for per_token in (True, False):
                signature = {
                    "key_ptr": f"*{in_ty}",
                    "value_ptr": f"*{in_ty}",
                    "k_cache_ptr": f"*{cache_ty}",
                    "v_cache_ptr": f"*{cache_ty}",
                    "k_scale_ptr": "*fp32",
                    "v_scale_ptr": "*fp32",
                    "slot_ptr": "*i64",
                    "block_size": "i32",
                    "head_dim": "i32",
                    **{
                        name: "i32"
                        for name in (
                            "stride_kt",
                            "stride_kh",
                            "stride_vt",
                            "stride_vh",
                            "stride_kcb",
                            "stride_kco",
                            "stride_kch",
                            "stride_vcb",
                            "stride_vco",
                            "stride_vch",
                            "stride_sb",
                            "stride_so",
                            "stride_sh",
                        )
                    },
                    "BLOCK_D": "constexpr",
                    "QUANT": "constexpr",
                    "PER_TOKEN": "constexpr",
                }
                specs.append(
                    AotSpec(
                        kernel="kv_append",
                        config=f"{in_ty}->{_kv_quant.QUANT_NAMES[quant]} {'token' if per_token else 'layer'}",
                        fn=_kv_append_quant_kernel,
                        signature=signature,
                        constexprs={"BLOCK_D": BLOCK_D, "QUANT": quant, "PER_TOKEN": per_token},
                        num_warps=NUM_WARPS,
                        num_stages=1,
                    )
                )
    return specs
