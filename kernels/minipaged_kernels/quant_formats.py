"""Packed weight-only quantization (W4A16 / W8A16): one canonical layout and converters to and from the on-disk ones.

Every quantized-linear kernel takes one layout, :class:`PackedWeight`, so the checkpoint
formats meet in a single place: this module. The canonical layout is GPTQ's weight packing
(packed along the input dimension K, so a kernel tile of K rows reads whole int32 words)
with unpacked zero points in the unsigned domain:

    q[k, n]  = (qweight[k // pack, n] >> (bits * (k % pack))) & (2**bits - 1),   pack = 32 // bits
    W[k, n]  = (q[k, n] - zeros[g(k), n]) * scales[g(k), n],   g(k) = g_idx[k] or k // group_size
    y        = x @ W          x [M, K], W [K, N] (nn.Linear's weight transposed), y [M, N]

The on-disk formats, each by its own definition:

- compressed-tensors ``pack-quantized``: ``weight_packed [N, ceil(K * bits / 32)]`` packed
  along K, low bits first, of the *signed* values plus ``2**(bits-1)``; ``weight_scale [N, G]``;
  asymmetric: ``weight_zero_point`` signed, packed the same way but along N
  (``[ceil(N * bits / 32), G]``); symmetric: no zero point (it is 0 signed, ``2**(bits-1)``
  unsigned); ``weight_g_idx [K]`` with activation ordering; ``weight_shape = [N, K]``.
- GPTQ (AutoGPTQ / GPTQModel v1): ``qweight [K / pack, N]`` as above, ``qzeros [G, N / pack]``
  packed along N holding ``z - 1`` (the v1 offset), ``scales [G, N]``, ``g_idx [K]``
  (not monotonic with ``desc_act``). Symmetric checkpoints use the fixed zero point
  ``2**(bits-1)``, whatever ``qzeros`` holds, as vLLM's GPTQ kernels do.
- AWQ (AutoAWQ GEMM, 4 bits only): ``qweight [K, N / 8]`` and ``qzeros [G, N / 8]`` packed along
  N in the interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (nibble ``i`` of a word holds column
  ``8 * word + AWQ_ORDER[i]``), zero points stored as they are, ``scales [G, N]``, no ``g_idx``.

``dequantize_reference_*`` decode each raw format to a dense float64 ``[N, K]`` with plain
per-element indexing, sharing no code with the converters, so the tests can check one
against the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# AutoAWQ's packing order: nibble i of a packed word holds column AWQ_ORDER[i] of its 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class PackedWeightError(ValueError):
    """A packed weight or one of its scales / zeros / group indices is malformed; the message names the tensor."""


def _pack(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise PackedWeightError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 32 // bits


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(name: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PackedWeightError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise PackedWeightError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise PackedWeightError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    return t


def _check_groups(in_features: int, group_size: int) -> int:
    """Number of groups of ``in_features`` rows; ``group_size`` must divide it (per-channel: ``group_size = K``)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise PackedWeightError(f"group_size must be a positive int, got {group_size!r}")
    if in_features % group_size != 0:
        raise PackedWeightError(f"group_size {group_size} does not divide in_features {in_features}")
    return in_features // group_size


@dataclass
class PackedWeight:
    """A weight-only quantized linear weight in the canonical layout the kernels take.

    ``qweight`` int32 ``[ceil(K / pack), N]`` (``pack = 32 // bits``, packed along K, GPTQ's bit order),
    ``scales [num_groups, N]`` float16/bfloat16/float32, ``zeros`` int32 ``[num_groups, N]`` unpacked
    and unsigned (symmetric schemes hold ``2**(bits-1)``), ``g_idx`` int32 ``[K]`` or ``None``
    (then row ``k`` is in group ``k // group_size``), ``group_size`` (per-channel: ``K``),
    ``in_features`` K, ``out_features`` N. Shapes are checked on construction.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        pack = _pack(self.bits)
        k, n = self.in_features, self.out_features
        if not isinstance(k, int) or not isinstance(n, int) or k < 1 or n < 1:
            raise PackedWeightError(f"in_features and out_features must be positive ints, got {k!r}, {n!r}")
        groups = _check_groups(k, self.group_size)
        _check("qweight", self.qweight, (_cdiv(k, pack), n), (torch.int32,))
        _check("scales", self.scales, (groups, n), SCALE_DTYPES)
        _check("zeros", self.zeros, (groups, n), (torch.int32,))
        tensors = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.g_idx is not None:
            _check("g_idx", self.g_idx, (k,), (torch.int32,))
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= groups:
                raise PackedWeightError(f"g_idx holds groups {lo}..{hi}, outside 0..{groups - 1}")
            tensors["g_idx"] = self.g_idx
        devices = {name: t.device for name, t in tensors.items()}
        if len(set(devices.values())) > 1:
            raise PackedWeightError(f"tensors on different devices: {devices}")

    @property
    def num_groups(self) -> int:
        """Number of quantization groups along K."""
        return self.in_features // self.group_size

    @property
    def pack(self) -> int:
        """Quantized values per int32 word."""
        return 32 // self.bits

    def group_index(self) -> torch.Tensor:
        """The group of each input row, int32 ``[K]`` (``g_idx`` or ``k // group_size``)."""
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.in_features, dtype=torch.int32, device=self.qweight.device) // self.group_size


# ---- packing helpers -------------------------------------------------------------------------


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``q [K, N]`` (values in ``[0, 2**bits)``) along dim 0 into int32 ``[ceil(K / pack), N]``;
    value ``k`` lands in bits ``bits * (k % pack)`` of word ``k // pack``, the padding rows are 0."""
    pack = _pack(bits)
    if q.dim() != 2:
        raise PackedWeightError(f"q must be 2-D [K, N], got shape {tuple(q.shape)}")
    k, n = q.shape
    if k and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise PackedWeightError(f"q holds values outside [0, {1 << bits}) for {bits} bits")
    rows = _cdiv(k, pack)
    padded = torch.zeros(rows * pack, n, dtype=torch.int64, device=q.device)
    padded[:k] = q.to(torch.int64)
    shifts = (torch.arange(pack, device=q.device, dtype=torch.int64) * bits).view(1, pack, 1)
    words = (padded.view(rows, pack, n) << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    return _to_int32(words)


def unpack_int32(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[ceil(rows / pack), N]`` to unsigned int32 ``[rows, N]``."""
    pack = _pack(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise PackedWeightError(f"packed must be 2-D int32, got {tuple(packed.shape)} {packed.dtype}")
    if packed.shape[0] != _cdiv(rows, pack):
        raise PackedWeightError(f"packed has {packed.shape[0]} rows of words, expected {_cdiv(rows, pack)} for {rows}")
    shifts = (torch.arange(pack, device=packed.device, dtype=torch.int32) * bits).view(1, pack, 1)
    values = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # the mask drops the arithmetic shift's sign bits
    return values.reshape(-1, packed.shape[1])[:rows].contiguous()


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` to int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _awq_perm(n: int, device: torch.device) -> torch.Tensor:
    """Column order of AWQ's packing: ``perm[8 * w + i] = 8 * w + AWQ_ORDER[i]``."""
    order = torch.tensor(AWQ_ORDER, device=device)
    return (torch.arange(0, n, 8, device=device).view(-1, 1) + order.view(1, -1)).reshape(-1)


def _check_unpacked_zeros(zeros: torch.Tensor, bits: int, name: str) -> None:
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 1 << bits):
        raise PackedWeightError(f"{name} holds zero points outside [0, {1 << bits}) for {bits} bits")


# ---- compressed-tensors pack-quantized ------------------------------------------------------


def from_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_g_idx: torch.Tensor | None,
    weight_shape: torch.Tensor | tuple[int, int],
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> PackedWeight:
    """A compressed-tensors ``pack-quantized`` module's tensors as a :class:`PackedWeight`.

    ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``, ``weight_scale [N, G]``,
    ``weight_zero_point`` int32 ``[ceil(N * bits / 32), G]`` (asymmetric) or ``None``,
    ``weight_g_idx [K]`` or ``None``, ``weight_shape = (N, K)``; ``group_size`` ``None`` means per-channel.
    """
    pack = _pack(bits)
    if weight_shape is None:
        raise PackedWeightError("weight_shape is missing")
    shape = [int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape)]
    if len(shape) != 2 or min(shape) < 1:
        raise PackedWeightError(f"weight_shape must be [out_features, in_features], got {shape}")
    n, k = shape
    group_size = k if group_size is None else group_size
    groups = _check_groups(k, group_size)
    _check("weight_packed", weight_packed, (n, _cdiv(k, pack)), (torch.int32,))
    if weight_scale is None:
        raise PackedWeightError("weight_scale is missing")
    _check("weight_scale", weight_scale, (n, groups), SCALE_DTYPES)
    qweight = weight_packed.t().contiguous()  # both pack along K from bit 0: the same words, transposed
    if symmetric:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32, device=weight_packed.device)
    else:
        if weight_zero_point is None:
            raise PackedWeightError("weight_zero_point is missing for an asymmetric scheme")
        _check("weight_zero_point", weight_zero_point, (_cdiv(n, pack), groups), (torch.int32,))
        zeros = unpack_int32(weight_zero_point, bits, n).t().contiguous()
    g_idx = None
    if weight_g_idx is not None:
        _check("weight_g_idx", weight_g_idx, (k,), (torch.int32, torch.int64))
        g_idx = weight_g_idx.to(torch.int32).contiguous()
    return PackedWeight(qweight, weight_scale.t().contiguous(), zeros, g_idx, bits, group_size, k, n)


def to_compressed_tensors(pw: PackedWeight, symmetric: bool) -> dict[str, torch.Tensor]:
    """``pw`` as a compressed-tensors ``pack-quantized`` module's tensors (keys without the module prefix):
    ``weight_packed``, ``weight_scale``, ``weight_shape``, ``weight_zero_point`` (asymmetric only),
    ``weight_g_idx`` (only when ``pw.g_idx`` is set). ``symmetric`` requires every zero to be ``2**(bits-1)``."""
    if symmetric and bool((pw.zeros != 1 << (pw.bits - 1)).any()):
        raise PackedWeightError(f"zeros must all be {1 << (pw.bits - 1)} for a symmetric scheme")
    out = {  # both pack along K from bit 0 with zero padding: weight_packed is qweight transposed
        "weight_packed": pw.qweight.t().contiguous(),
        "weight_scale": pw.scales.t().contiguous(),
        "weight_shape": torch.tensor([pw.out_features, pw.in_features], dtype=torch.int64),
    }
    if not symmetric:
        _check_unpacked_zeros(pw.zeros, pw.bits, "zeros")
        out["weight_zero_point"] = pack_int32(pw.zeros.t().contiguous(), pw.bits)
    if pw.g_idx is not None:
        out["weight_g_idx"] = pw.g_idx.clone()
    return out


# ---- GPTQ (AutoGPTQ / GPTQModel v1) ---------------------------------------------------------


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
) -> PackedWeight:
    """A GPTQ (v1) linear's tensors as a :class:`PackedWeight`.

    ``qweight`` int32 ``[K / pack, N]``, ``qzeros`` int32 ``[G, N / pack]`` holding ``z - 1``
    (ignored, and may be ``None``, when ``sym``: the zero point is then ``2**(bits-1)``),
    ``scales [G, N]``, ``g_idx [K]`` or ``None``; ``group_size`` ``-1`` means per-channel.
    A trivial ``g_idx`` (``k // group_size``) is dropped so kernels take the cheaper path.
    """
    pack = _pack(bits)
    if scales is None:
        raise PackedWeightError("scales is missing")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise PackedWeightError(f"qweight must be a 2-D tensor, got {getattr(qweight, 'shape', qweight)!r}")
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    group_size = k if group_size == -1 else group_size
    groups = _check_groups(k, group_size)
    _check("qweight", qweight, (k // pack, n), (torch.int32,))
    _check("scales", scales, (groups, n), SCALE_DTYPES)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32, device=qweight.device)
    else:
        if qzeros is None:
            raise PackedWeightError("qzeros is missing for an asymmetric GPTQ checkpoint")
        if n % pack != 0:
            raise PackedWeightError(f"out_features {n} is not a multiple of {pack}, so qzeros cannot be packed")
        _check("qzeros", qzeros, (groups, n // pack), (torch.int32,))
        zeros = unpack_int32(qzeros.t().contiguous(), bits, n).t().contiguous() + 1  # v1 stores z - 1
    gi = None
    if g_idx is not None:
        _check("g_idx", g_idx, (k,), (torch.int32, torch.int64))
        trivial = torch.arange(k, device=g_idx.device) // group_size
        gi = None if torch.equal(g_idx.to(torch.int64), trivial) else g_idx.to(torch.int32).contiguous()
    return PackedWeight(qweight.contiguous(), scales.contiguous(), zeros, gi, bits, group_size, k, n)


def to_gptq(pw: PackedWeight) -> dict[str, torch.Tensor]:
    """``pw`` as GPTQ (v1) tensors: ``qweight [K / pack, N]``, ``qzeros [G, N / pack]`` (``z - 1``),
    ``scales [G, N]``, ``g_idx [K]`` (always written, ``k // group_size`` when ``pw.g_idx`` is ``None``).
    K and N must be multiples of ``pack``; a zero point of 0 has no v1 encoding and is refused."""
    pack = pw.pack
    if pw.in_features % pack or pw.out_features % pack:
        raise PackedWeightError(f"GPTQ needs in_features and out_features multiples of {pack}")
    _check_unpacked_zeros(pw.zeros, pw.bits, "zeros")
    if bool((pw.zeros == 0).any()):
        raise PackedWeightError("zeros holds 0, which GPTQ's v1 layout (stored z - 1) cannot encode")
    qzeros = pack_int32((pw.zeros - 1).t().contiguous(), pw.bits).t().contiguous()
    return {
        "qweight": pw.qweight.clone(),
        "qzeros": qzeros,
        "scales": pw.scales.clone(),
        "g_idx": pw.group_index().to(torch.int32).clone(),
    }


# ---- AWQ (AutoAWQ GEMM) ---------------------------------------------------------------------


def from_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int
) -> PackedWeight:
    """An AutoAWQ GEMM linear's tensors as a :class:`PackedWeight` (4 bits only).

    ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]`` packed along N in
    ``AWQ_ORDER``, ``scales [G, N]``; ``group_size`` ``-1`` means per-channel.
    """
    if bits != 4:
        raise PackedWeightError(f"AWQ's GEMM layout is 4-bit only, got bits={bits!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise PackedWeightError(f"qweight must be a 2-D tensor, got {getattr(qweight, 'shape', qweight)!r}")
    if scales is None:
        raise PackedWeightError("scales is missing")
    if qzeros is None:
        raise PackedWeightError("qzeros is missing")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group_size = k if group_size == -1 else group_size
    groups = _check_groups(k, group_size)
    _check("qweight", qweight, (k, n // 8), (torch.int32,))
    _check("qzeros", qzeros, (groups, n // 8), (torch.int32,))
    _check("scales", scales, (groups, n), SCALE_DTYPES)
    perm = _awq_perm(n, qweight.device)
    q = torch.empty(k, n, dtype=torch.int32, device=qweight.device)
    q[:, perm] = unpack_int32(qweight.t().contiguous(), 4, n).t()
    zeros = torch.empty(groups, n, dtype=torch.int32, device=qweight.device)
    zeros[:, perm] = unpack_int32(qzeros.t().contiguous(), 4, n).t()
    return PackedWeight(pack_int32(q, 4), scales.contiguous(), zeros, None, 4, group_size, k, n)


def to_awq(pw: PackedWeight) -> dict[str, torch.Tensor]:
    """``pw`` as AutoAWQ GEMM tensors ``qweight [K, N / 8]``, ``qzeros [G, N / 8]``, ``scales [G, N]``;
    4 bits, no ``g_idx``, N a multiple of 8."""
    if pw.bits != 4 or pw.g_idx is not None or pw.out_features % 8:
        raise PackedWeightError("AWQ's GEMM layout needs 4 bits, no g_idx and out_features a multiple of 8")
    _check_unpacked_zeros(pw.zeros, 4, "zeros")
    perm = _awq_perm(pw.out_features, pw.qweight.device)
    q = unpack_int32(pw.qweight, 4, pw.in_features)
    return {
        "qweight": pack_int32(q[:, perm].t().contiguous(), 4).t().contiguous(),
        "qzeros": pack_int32(pw.zeros[:, perm].t().contiguous(), 4).t().contiguous(),
        "scales": pw.scales.clone(),
    }


# ---- dequantization -------------------------------------------------------------------------


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight ``W [K, N]`` of ``pw`` in ``dtype`` (``y = x @ W``), computed in fp32 (float64 if asked)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int32(pw.qweight, pw.bits, pw.in_features)
    g = pw.group_index().long()
    w = (q - pw.zeros[g]).to(work) * pw.scales[g].to(work)
    return w.to(dtype)


def _field(word: int, shift: int, bits: int) -> int:
    """Bits ``[shift, shift + bits)`` of a 32-bit word given as a Python int (either sign)."""
    return ((word & 0xFFFFFFFF) >> shift) & ((1 << bits) - 1)


def dequantize_reference_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_g_idx: torch.Tensor | None,
    weight_shape: torch.Tensor | tuple[int, int],
    *,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Dense float64 ``[N, K]`` from compressed-tensors tensors, element by element: signed value
    ``v = field - 2**(bits-1)`` of bits ``[bits * k % 32, ...)`` in word ``bits * k // 32`` of row ``n``,
    minus the signed zero point (0 when ``weight_zero_point`` is ``None``), times the scale."""
    n_out, k_in = (int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape))
    offset = 1 << (bits - 1)
    packed, scale = weight_packed.tolist(), weight_scale.double().tolist()
    zp = None if weight_zero_point is None else weight_zero_point.tolist()
    gidx = None if weight_g_idx is None else weight_g_idx.tolist()
    gs = k_in if group_size is None else group_size
    out = torch.empty(n_out, k_in, dtype=torch.float64)
    for n in range(n_out):
        row = []
        for k in range(k_in):
            bit = bits * k
            v = _field(packed[n][bit // 32], bit % 32, bits) - offset
            g = gidx[k] if gidx is not None else k // gs
            z = 0
            if zp is not None:
                zbit = bits * n
                z = _field(zp[zbit // 32][g], zbit % 32, bits) - offset
            row.append((v - z) * scale[n][g])
        out[n] = torch.tensor(row, dtype=torch.float64)
    return out


def dequantize_reference_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
) -> torch.Tensor:
    """Dense float64 ``[N, K]`` from GPTQ v1 tensors, element by element: ``q`` from word ``k // pack`` of
    ``qweight`` column ``n``; zero point ``qzeros`` field ``n % pack`` of word ``n // pack``, plus 1
    (``2**(bits-1)`` when ``sym``); group ``g_idx[k]`` (or ``k // group_size``)."""
    pack = 32 // bits
    k_in, n_out = qweight.shape[0] * pack, qweight.shape[1]
    gs = k_in if group_size == -1 else group_size
    qw, sc = qweight.tolist(), scales.double().tolist()
    qz = None if qzeros is None else qzeros.tolist()
    gidx = None if g_idx is None else g_idx.tolist()
    out = torch.empty(n_out, k_in, dtype=torch.float64)
    for n in range(n_out):
        row = []
        for k in range(k_in):
            q = _field(qw[k // pack][n], bits * (k % pack), bits)
            g = gidx[k] if gidx is not None else k // gs
            z = (1 << (bits - 1)) if sym else _field(qz[g][n // pack], bits * (n % pack), bits) + 1
            row.append((q - z) * sc[g][n])
        out[n] = torch.tensor(row, dtype=torch.float64)
    return out


def dequantize_reference_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int
) -> torch.Tensor:
    """Dense float64 ``[N, K]`` from AutoAWQ GEMM tensors, element by element: column ``n`` is nibble
    ``AWQ_ORDER.index(n % 8)`` of word ``n // 8`` in row ``k`` of ``qweight`` (group row of ``qzeros``)."""
    k_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    gs = k_in if group_size == -1 else group_size
    qw, qz, sc = qweight.tolist(), qzeros.tolist(), scales.double().tolist()
    out = torch.empty(n_out, k_in, dtype=torch.float64)
    for n in range(n_out):
        nibble = AWQ_ORDER.index(n % 8)
        row = []
        for k in range(k_in):
            g = k // gs
            q = _field(qw[k][n // 8], 4 * nibble, 4)
            z = _field(qz[g][n // 8], 4 * nibble, 4)
            row.append((q - z) * sc[g][n])
        out[n] = torch.tensor(row, dtype=torch.float64)
    return out
