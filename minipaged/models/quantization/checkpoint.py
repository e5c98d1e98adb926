"""Reading one linear layer's packed tensors from a checkpoint, and fusing q/k/v and gate/up.

Each format's tensors are converted to the kernels' canonical ``PackedWeight`` by
``minipaged_kernels.quant_formats``; this module finds them by name, checks them against
the shape the model config implies, and concatenates the parts of a fused projection
along N (the packed words run along K, so a fused layer is its parts' columns side by
side, provided they share the group structure). Every failure is an
``InvalidQuantizedWeightError`` naming the tensor, raised before the model is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minipaged.errors import InvalidQuantizedWeightError, UnsupportedQuantizationError
from minipaged.models.quantization.config import QuantSpec, WeightQuantScheme
from minipaged_kernels import quant_formats as qf

# name -> tensor, or None when ``required`` is False and the checkpoint lacks it
Getter = Callable[[str, bool], torch.Tensor | None]

TENSORS = {
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
}


def read_packed(scheme: WeightQuantScheme, module: str, get: Getter) -> qf.PackedWeight:
    """The ``PackedWeight`` of the HF linear ``module`` (``model.layers.0.self_attn.q_proj``)."""
    try:
        if scheme.method == "compressed-tensors":
            pw = qf.from_compressed_tensors(
                get(f"{module}.weight_packed", True),
                get(f"{module}.weight_scale", True),
                get(f"{module}.weight_zero_point", not scheme.symmetric),
                get(f"{module}.weight_g_idx", False),
                get(f"{module}.weight_shape", True),
                bits=scheme.bits,
                group_size=scheme.group_size,
                symmetric=scheme.symmetric,
            )
        elif scheme.method == "gptq":
            pw = qf.from_gptq(
                get(f"{module}.qweight", True),
                get(f"{module}.qzeros", not scheme.symmetric),
                get(f"{module}.scales", True),
                get(f"{module}.g_idx", False),
                bits=scheme.bits,
                group_size=-1 if scheme.group_size is None else scheme.group_size,
                sym=scheme.symmetric,
            )
        else:
            pw = qf.from_awq(
                get(f"{module}.qweight", True),
                get(f"{module}.qzeros", True),
                get(f"{module}.scales", True),
                bits=scheme.bits,
                group_size=-1 if scheme.group_size is None else scheme.group_size,
            )
    except qf.PackedWeightError as err:
        raise InvalidQuantizedWeightError(module, str(err)) from None
    return _drop_trivial_g_idx(pw)


def _drop_trivial_g_idx(pw: qf.PackedWeight) -> qf.PackedWeight:
    """``g_idx == k // group_size`` says nothing the group size does not: drop it for the cheaper kernel path."""
    if pw.g_idx is None:
        return pw
    trivial = torch.arange(pw.in_features, dtype=torch.int32) // pw.group_size
    if torch.equal(pw.g_idx.cpu(), trivial):
        pw.g_idx = None
    return pw


def fuse_quantized(
    scheme: WeightQuantScheme,
    modules: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    get: Getter,
    scale_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], QuantSpec]:
    """The fused layer's tensors (``qweight``, ``scales``, ``zeros``, and ``g_idx`` when any) from the HF
    linears ``modules``, whose dense weights would be ``shapes`` ``[(out_features, in_features), ...]``."""
    dense = [m for m in modules if not scheme.is_quantized(m)]
    if dense:
        raise UnsupportedQuantizationError(
            "quantization_config.ignore",
            f"{dense} left dense while {[m for m in modules if m not in dense]} are quantized; "
            "the parts of a fused projection must be quantized alike",
        )
    parts = [read_packed(scheme, m, get) for m in modules]
    for module, pw, (n, k) in zip(modules, parts, shapes):
        if (pw.out_features, pw.in_features) != (n, k):
            raise InvalidQuantizedWeightError(
                module, f"holds a [{pw.out_features}, {pw.in_features}] weight, the model config expects [{n}, {k}]"
            )
    first = parts[0]
    for module, pw in zip(modules[1:], parts[1:]):
        same_groups = pw.group_size == first.group_size and pw.bits == first.bits
        same_order = (pw.g_idx is None) == (first.g_idx is None) and (
            pw.g_idx is None or torch.equal(pw.g_idx, first.g_idx)
        )
        if not (same_groups and same_order):
            raise InvalidQuantizedWeightError(
                module, f"its groups (g_idx / group size) differ from {modules[0]}'s, so the two cannot be fused"
            )
    tensors = {
        "qweight": torch.cat([pw.qweight for pw in parts], 1) if len(parts) > 1 else first.qweight,
        "scales": torch.cat([pw.scales for pw in parts], 1).to(scale_dtype),
        "zeros": torch.cat([pw.zeros for pw in parts], 1) if len(parts) > 1 else first.zeros,
    }
    if first.g_idx is not None:
        tensors["g_idx"] = first.g_idx
    spec = QuantSpec(bits=first.bits, group_size=first.group_size, has_g_idx=first.g_idx is not None)
    return {name: t.contiguous() for name, t in tensors.items()}, spec
