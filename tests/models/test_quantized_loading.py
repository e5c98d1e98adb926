"""Weight-quantized checkpoints (compressed-tensors, GPTQ, AWQ) against dense references.

Each case quantizes a tiny random Llama by round-to-nearest here (integers, zero points
and scales computed by this file), writes a checkpoint directory in one format, loads it
with ``load_model`` and compares greedy tokens and prefill logits with transformers
running the *same* integers dequantized by this file into a dense model. The GPTQ writer
packs the words itself (no code shared with ``minipaged_kernels.quant_formats``); the
compressed-tensors and AWQ writers use that module's writers, and the compressed-tensors
checkpoint is also loaded by transformers through the ``compressed-tensors`` package,
which unpacks it with its own code. Bad checkpoints must fail with typed errors naming
the field or tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import assert_all_blocks_free, hf_greedy, make_prompts, one_thread  # noqa: F401  one_thread: autouse
from transformers import LlamaConfig, LlamaForCausalLM

from minipaged import LLM, SamplingParams
from minipaged.attention import allocate_kv_cache, build_metadata, build_positions
from minipaged.errors import InvalidEngineConfigError, InvalidQuantizedWeightError, UnsupportedQuantizationError
from minipaged.models import load_model
from minipaged.models.quantization import QuantLinear, parse_quantization_config, weight_bytes
from minipaged_kernels import quant_formats as qf

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer files")

VOCAB = 256
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Layers that read the same input get the same act-order permutation, as GPTQ gives them (one Hessian).
INPUT_GROUPS = [LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:]]
SHARED_INPUT = {linear: i for i, group in enumerate(INPUT_GROUPS) for linear in group}


def tiny_llama(seed: int = 0, tie: bool = False, intermediate_size: int = 128) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a wide init: peaked logits keep greedy argmax away from ties
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
    return hf


@dataclass
class Quantized:
    """One linear quantized by RTN: ``W[n, k] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n]``."""

    q: torch.Tensor  # int64 [K, N], unsigned
    zeros: torch.Tensor  # int64 [G, N], unsigned
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor | None  # int32 [K]
    group_size: int

    def dense(self) -> torch.Tensor:
        """fp32 ``[N, K]``: the dequantized weight, computed here by the definition."""
        groups = self.group_index()
        w = (self.q - self.zeros[groups]).float() * self.scales.float()[groups]
        return w.t().contiguous()

    def group_index(self) -> torch.Tensor:
        k = self.q.shape[0]
        return self.g_idx.long() if self.g_idx is not None else torch.arange(k) // self.group_size


def rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, actorder: bool, seed: int) -> Quantized:
    """Round-to-nearest of a ``[N, K]`` weight; with ``actorder`` the groups follow a random order of the rows."""
    n, k = w.shape
    group = k if group_size is None else group_size
    g_idx = None
    if actorder:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // group
    wt = w.t().double()  # [K, N]
    num_groups, top = -(-k // group), (1 << bits) - 1  # the last group may be short
    scales = torch.empty(num_groups, n, dtype=torch.float16)
    zeros = torch.empty(num_groups, n, dtype=torch.int64)
    for g in range(num_groups):
        rows = wt[groups == g]
        if symmetric:
            scales[g] = (rows.abs().amax(0) / ((1 << (bits - 1)) - 1)).clamp_min(1e-4).half()
            zeros[g] = 1 << (bits - 1)
        else:
            lo, hi = rows.amin(0).clamp_max(0), rows.amax(0).clamp_min(0)
            scales[g] = ((hi - lo) / top).clamp_min(1e-4).half()
            zeros[g] = torch.round(-lo / scales[g].double()).clamp(1, top).long()  # GPTQ v1 cannot store 0
    s, z = scales.double()[groups], zeros[groups]
    q = torch.round(wt / s + z).clamp(0, top).long()
    return Quantized(q, zeros, scales, g_idx, group)


# ---- writers -----------------------------------------------------------------------------------------------
def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer: unsigned ``[R, C]`` -> int32 ``[R / (32 // bits), C]``, row ``r`` in bits
    ``bits * (r % pack)`` of word ``r // pack``."""
    pack = 32 // bits
    v = values.numpy().astype(np.uint64)
    words = np.zeros((v.shape[0] // pack, v.shape[1]), dtype=np.uint64)
    for i in range(pack):
        words |= v[i::pack] << np.uint64(bits * i)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def gptq_tensors(qz: Quantized, bits: int) -> dict[str, torch.Tensor]:
    k = qz.q.shape[0]
    return {
        "qweight": pack_rows(qz.q, bits),
        "qzeros": pack_rows((qz.zeros - 1).t().contiguous(), bits).t().contiguous(),
        "scales": qz.scales.clone(),
        "g_idx": (qz.g_idx if qz.g_idx is not None else (torch.arange(k) // qz.group_size)).to(torch.int32),
    }


def packed_weight(qz: Quantized, bits: int) -> qf.PackedWeight:
    k, n = qz.q.shape
    return qf.PackedWeight(
        qf.pack_int32(qz.q, bits), qz.scales, qz.zeros.to(torch.int32), qz.g_idx, bits, qz.group_size, k, n
    )


def ct_config(bits, group_size, symmetric, actorder, ignore) -> dict:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "actorder": "group" if actorder else None,
        "dynamic": False,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head", *ignore],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


@dataclass(frozen=True)
class Scheme:
    fmt: str
    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = False
    actorder: bool = False
    ignore: tuple[str, ...] = ()  # HF module names left dense

    def __str__(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"{self.fmt}-w{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}{'-act' if self.actorder else ''}"


def write_checkpoint(hf: LlamaForCausalLM, scheme: Scheme, out: Path) -> LlamaForCausalLM:
    """Quantize ``hf``'s linears into ``out`` in ``scheme.fmt``; returns ``hf`` with those linears replaced
    by their dequantized weights (the dense reference)."""
    state = {name: t.clone() for name, t in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for i in range(hf.config.num_hidden_layers):
        for linear in LINEARS:
            module = f"model.layers.{i}.{linear}"
            if module in scheme.ignore:
                continue
            w = state.pop(module + ".weight")
            seed = 10 * i + SHARED_INPUT[linear]
            qz = rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, scheme.actorder, seed)
            if scheme.fmt == "gptq":
                tensors = gptq_tensors(qz, scheme.bits)
            elif scheme.fmt == "awq":
                tensors = qf.to_awq(packed_weight(qz, scheme.bits))
            else:
                tensors = qf.to_compressed_tensors(packed_weight(qz, scheme.bits), scheme.symmetric)
            state.update({f"{module}.{name}": t for name, t in tensors.items()})
            hf.get_submodule(module).weight.data.copy_(qz.dense())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    g = -1 if scheme.group_size is None else scheme.group_size
    if scheme.fmt == "gptq":
        quant = dict(quant_method="gptq", bits=scheme.bits, group_size=g, desc_act=scheme.actorder)
        quant |= dict(sym=scheme.symmetric, checkpoint_format="gptq")
    elif scheme.fmt == "awq":
        quant = dict(quant_method="awq", bits=4, group_size=g, zero_point=True, version="gemm")
        quant["modules_to_not_convert"] = [m.removeprefix("model.") for m in scheme.ignore] or None
    else:
        quant = ct_config(scheme.bits, scheme.group_size, scheme.symmetric, scheme.actorder, scheme.ignore)
    config["quantization_config"] = quant
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return hf


# ---- running -----------------------------------------------------------------------------------------------
def prefill_logits(model, tokens: list[int]) -> torch.Tensor:
    caches = allocate_kv_cache(model.config, 16, 4, torch.float32, "cpu")
    meta = build_metadata([len(tokens)], [len(tokens)], [list(range(16))], 4)
    hidden = model(torch.tensor(tokens), build_positions([len(tokens)], [len(tokens)]), caches, meta)
    return model.compute_logits(hidden)


def greedy(llm: LLM, prompts, max_tokens) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return [o.outputs[0].token_ids for o in outs]


def assert_greedy_under(reference, prompts, outputs, tol: float = 1e-3) -> None:
    """Every token of ``outputs`` is the reference's argmax, given the same prefix, up to ``tol`` (a tie within
    rounding may go either way; anything further is a wrong token)."""
    for prompt, out in zip(prompts, outputs):
        seq = prompt + out
        with torch.no_grad():
            logits = reference(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1 :]
        chosen = logits.gather(1, torch.tensor(out).view(-1, 1)).squeeze(1)
        gap = logits.amax(1) - chosen
        assert float(gap.max()) <= tol, (prompt, out, gap)


def prompts_for_test(count: int = 6):
    prompts, max_tokens = make_prompts(seed=5, count=count)
    return [[t % VOCAB for t in p] for p in prompts], [min(m, 12) for m in max_tokens]


SCHEMES = [
    Scheme("compressed-tensors", bits=4, group_size=32, symmetric=True),
    Scheme("compressed-tensors", bits=8, group_size=None, symmetric=False, ignore=("model.layers.1.mlp.down_proj",)),
    Scheme("compressed-tensors", bits=4, group_size=32, symmetric=False, actorder=True),
    Scheme("gptq", bits=4, group_size=32, symmetric=False, actorder=True),
    Scheme("gptq", bits=8, group_size=64, symmetric=True),
    Scheme("gptq", bits=4, group_size=48, symmetric=False),  # K = 64 and 128: a short last group
    Scheme("awq", bits=4, group_size=32, ignore=("model.layers.0.mlp.down_proj",)),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantized_checkpoint_matches_dense_dequantized_transformers(tmp_path, scheme):
    reference = write_checkpoint(tiny_llama(), scheme, tmp_path)
    loaded = load_model(tmp_path)
    model = loaded.model
    quant = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 4 * 2 - len(scheme.ignore), quant
    for module in scheme.ignore:  # left dense (down_proj has the same name in our model)
        assert not isinstance(model.get_submodule(module), QuantLinear)
    assert model.lm_head.weight.dtype == torch.float32
    tokens = [3, 17, 99, 5, 200, 41, 7, 150, 8]
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(model, tokens), expected, rtol=1e-4, atol=1e-4)
    prompts, max_tokens = prompts_for_test()
    llm = LLM(model, num_kv_blocks=64, block_size=8)
    assert_greedy_under(reference, prompts, greedy(llm, prompts, max_tokens))
    sizes = weight_bytes(model)
    assert sizes["packed"] > 0 and sizes["total"] == sizes["dense"] + sizes["packed"]


# Symmetric only: compressed-tensors >= 0.20 refuses actorder "group" (still in older checkpoints), and
# transformers' dequantizing load re-initialises a packed asymmetric zero point as a size mismatch.
TRANSFORMERS_CT = [SCHEMES[0], Scheme("compressed-tensors", bits=8, group_size=None, symmetric=True)]


@pytest.mark.parametrize("scheme", TRANSFORMERS_CT, ids=str)
def test_compressed_tensors_checkpoint_matches_transformers_own_loading(tmp_path, scheme):
    write_checkpoint(tiny_llama(seed=1, tie=True), scheme, tmp_path)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = [5, 9, 100, 33, 2, 70, 18]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].float()
    got = prefill_logits(load_model(tmp_path).model, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


# ---- tensor parallelism ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme",
    [Scheme("gptq", bits=4, group_size=32, symmetric=False, actorder=True), SCHEMES[0]],
    ids=str,
)
def test_tensor_parallel_quantized_model_equals_one_process(tmp_path, scheme):
    write_checkpoint(tiny_llama(seed=2), scheme, tmp_path)
    prompts, max_tokens = prompts_for_test(count=8)
    kwargs = dict(num_kv_blocks=24, block_size=8)  # too small for the whole batch: preemption too
    single = LLM(load_model(tmp_path).model, **kwargs)
    expected = greedy(single, prompts, max_tokens)
    with LLM(load_model(tmp_path).model, tensor_parallel_size=2, **kwargs) as tp:
        rank0 = tp.engine_core.worker.worker.model
        down = rank0.model.layers[0].mlp.down_proj
        assert isinstance(down, QuantLinear) and down.in_features == 64  # half of intermediate_size
        assert greedy(tp, prompts, max_tokens) == expected


def test_tensor_parallel_split_that_cuts_a_group_is_refused_before_spawning(tmp_path):
    write_checkpoint(tiny_llama(intermediate_size=96), Scheme("gptq", bits=4, group_size=32, symmetric=True), tmp_path)
    model = load_model(tmp_path).model  # down_proj: 3 groups of 32 rows; two ranks would take 48 rows each
    with pytest.raises(InvalidEngineConfigError, match="cut a group") as err:
        LLM(model, tensor_parallel_size=2, num_kv_blocks=16, block_size=8)
    assert err.value.field == "tensor_parallel_size"


@pytest.mark.parametrize(
    ("in_features", "group_size", "bits", "has_g_idx", "expected"),
    [
        (128, 32, 4, False, 32),  # whole groups per rank
        (128, 128, 4, False, 64),  # per-channel: the one group is replicated
        (128, 32, 4, True, 16),  # g_idx: all 4 groups on each rank, group_size only labels 64 rows / 4
        (96, 32, 4, False, "cut a group"),
        (48, 48, 8, False, 24),  # 24 rows per rank: whole 8-bit words (4 rows each)
        (24, 24, 4, False, "packed int32 word"),  # 12 rows per rank: half a 4-bit word (8 rows)
    ],
)
def test_row_parallel_split_rule(in_features, group_size, bits, has_g_idx, expected):
    from minipaged.models.quantization.layers import row_parallel_group_size

    if isinstance(expected, int):
        assert row_parallel_group_size(in_features, group_size, bits, has_g_idx, 2) == expected
    else:
        with pytest.raises(InvalidEngineConfigError, match=expected):
            row_parallel_group_size(in_features, group_size, bits, has_g_idx, 2)


# ---- bad input ---------------------------------------------------------------------------------------------
def ct(**weights) -> dict:
    config = ct_config(4, 32, True, False, ())
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


BAD_CONFIGS = [
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
    ({"bits": 4, "group_size": 128}, "quantization_config.quant_method"),
    (ct(num_bits=3), "quantization_config.config_groups.group_0.weights.num_bits"),
    (ct(type="float", num_bits=8), "quantization_config.config_groups.group_0.weights.type"),
    (ct(strategy="tensor"), "quantization_config.config_groups.group_0.weights.strategy"),
    (ct_config(4, 32, True, False, ()) | {"format": "float-quantized"}, "quantization_config.format"),
    (
        {**ct_config(8, None, True, False, ()), "config_groups": {"g": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}},
        "quantization_config.config_groups.g.input_activations",
    ),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "quantization_config.bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"},
     "quantization_config.checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "quantization_config.group_size"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "quantization_config.lm_head"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "quantization_config.version"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "quantization_config.bits"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "field"), BAD_CONFIGS, ids=lambda v: v if isinstance(v, str) else "")
def test_unsupported_scheme_is_refused_naming_the_field(config, field):
    with pytest.raises(UnsupportedQuantizationError) as err:
        parse_quantization_config(config)
    assert err.value.field == field


def test_unsupported_scheme_is_refused_before_any_tensor_is_read(tmp_path):
    write_checkpoint(tiny_llama(), SCHEMES[0], tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail otherwise
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match="num_bits"):
        load_model(tmp_path)


def rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file

    state = dict(load_file(str(path / "model.safetensors")))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


GPTQ = Scheme("gptq", bits=4, group_size=32, symmetric=False)
DOWN = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    ("edit", "field", "match"),
    [
        (lambda s: s.pop(f"{DOWN}.scales"), f"{DOWN}.scales", "missing"),
        (lambda s: s.pop(f"{DOWN}.qzeros"), f"{DOWN}.qzeros", "missing"),
        (lambda s: s.update({f"{DOWN}.qweight": s[f"{DOWN}.qweight"][:-2].clone()}), DOWN, "shape|divide"),
        (lambda s: s.update({f"{DOWN}.qweight": s[f"{DOWN}.qweight"].float()}), DOWN, "dtype"),
        (lambda s: s.update({f"{DOWN}.scales": s[f"{DOWN}.scales"][:, :-1].clone()}), DOWN, "shape"),
        (lambda s: s.update({f"{DOWN}.g_idx": s[f"{DOWN}.g_idx"] + 7}), DOWN, "g_idx"),
    ],
    ids=["missing-scales", "missing-zeros", "short-qweight", "float-qweight", "narrow-scales", "bad-g_idx"],
)
def test_corrupt_packed_tensor_is_refused_naming_it(tmp_path, edit, field, match):
    write_checkpoint(tiny_llama(), GPTQ, tmp_path)
    rewrite(tmp_path, edit)
    with pytest.raises(InvalidQuantizedWeightError, match=match) as err:
        load_model(tmp_path)
    assert err.value.field == field


def test_group_size_that_disagrees_with_the_stored_groups_is_refused(tmp_path):
    write_checkpoint(tiny_llama(), GPTQ, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 48  # the checkpoint holds groups of 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidQuantizedWeightError, match="scales has shape"):
        load_model(tmp_path)


def test_fused_projection_with_parts_quantized_differently_is_refused(tmp_path):
    write_checkpoint(tiny_llama(), Scheme("compressed-tensors", ignore=("model.layers.0.self_attn.k_proj",)), tmp_path)
    with pytest.raises(UnsupportedQuantizationError, match="fused projection") as err:
        load_model(tmp_path)
    assert err.value.field == "quantization_config.ignore"


def test_fused_projection_parts_with_different_group_order_are_refused(tmp_path):
    write_checkpoint(tiny_llama(), Scheme("gptq", actorder=True), tmp_path)
    rewrite(
        tmp_path,
        lambda s: s.update(
            {"model.layers.1.self_attn.v_proj.g_idx": s["model.layers.1.self_attn.v_proj.g_idx"].flip(0)}
        ),
    )
    with pytest.raises(InvalidQuantizedWeightError, match="cannot be fused") as err:
        load_model(tmp_path)
    assert err.value.field == "model.layers.1.self_attn.v_proj"


# ---- the layer alone ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 4, 5, 33])
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("numba", [True, False])
def test_quant_linear_every_cpu_path_matches_the_dequantized_product(rows, actorder, numba, monkeypatch):
    if not numba:  # the pure PyTorch path of a machine without numba
        from minipaged.models.quantization import linear

        monkeypatch.setattr(linear.cpu_kernels, "load", lambda name: None)
    w = torch.randn(48, 96) * 0.3
    qz = rtn(w, 4, 32, False, actorder, seed=rows)
    pw = packed_weight(qz, 4)
    layer = QuantLinear(96, 48, True, bits=4, group_size=32, has_g_idx=actorder, scale_dtype=torch.float32)
    layer.qweight, layer.scales, layer.zeros = pw.qweight, pw.scales.float(), pw.zeros
    layer.g_idx = pw.g_idx
    layer.bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    x = torch.randn(rows, 96)
    expected = x.double() @ qz.dense().double().t() + layer.bias.double()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert weight_bytes(layer)["packed"] == sum(t.nbytes for t in (pw.qweight, layer.scales, pw.zeros)) + (
        pw.g_idx.nbytes if actorder else 0
    )


@pytest.mark.parametrize("rows", [2, 8])  # the few-row CPU kernel, and dequantize-then-GEMM
def test_bf16_rows_through_a_quant_linear_match_the_dequantized_weight(rows):
    """A bf16 model's QuantLinear (bf16 scales) multiplies on the CPU kernels, returning bf16 within bf16's
    rounding of the float64 product with the dequantized weight, and rebuilds its kept arrays when its
    scales are loaded again in place."""
    gen = torch.Generator().manual_seed(rows)
    k, n, gs = 96, 40, 32
    layer = QuantLinear(k, n, True, bits=4, group_size=gs, has_g_idx=False, scale_dtype=torch.bfloat16)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    layer.qweight.copy_(qf.pack_int32(q, 4))
    layer.zeros.copy_(torch.randint(1, 16, (k // gs, n), generator=gen, dtype=torch.int32))
    layer.bias.data = torch.randn(n, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    for _ in range(2):  # new scales, loaded in place: the kept fp32 copy must follow them
        layer.scales.copy_((torch.rand(k // gs, n, generator=gen) * 0.05 + 0.01).bfloat16())
        with torch.no_grad():
            y = layer(x)
        ref = x.double() @ qf.dequantize(layer.packed_weight(), torch.float64) + layer.bias.double()
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_a_long_bf16_prefill_on_atens_layout_dequantizes_into_the_shared_scratch(monkeypatch):
    """From ``DENSE_FROM_ROWS`` rows a layer in ATen's layout dequantizes once, into the model's one
    scratch buffer, and multiplies densely: within bf16's rounding of the float64 reference."""
    from minipaged_kernels import cpu as cpu_kernels

    aten = cpu_kernels.load("int4_aten")
    if aten is None or aten.numba is None:
        pytest.skip("needs the int4 CPU kernel and numba")
    gen = torch.Generator().manual_seed(5)
    k, n, gs = 128, 80, 32  # a 64-column block and a 16-column tail
    layer = QuantLinear(k, n, False, bits=4, group_size=gs, has_g_idx=False, scale_dtype=torch.bfloat16)
    layer.qweight.copy_(qf.pack_int32(torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32), 4))
    layer.zeros.fill_(8)
    layer.scales.copy_((torch.rand(k // gs, n, generator=gen) * 0.05 + 0.01).bfloat16())
    ref_w = qf.dequantize(layer.packed_weight(), torch.float64)
    assert layer.pack_int4(torch.bfloat16) > 0
    buffers = []
    dequantize = aten.dequantize
    monkeypatch.setattr(aten, "dequantize", lambda w, out=None: buffers.append(out) or dequantize(w, out))
    x = torch.randn(aten.DENSE_FROM_ROWS + 5, k, generator=gen).bfloat16()
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ ref_w
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    assert len(buffers) == 1 and buffers[0] is not None and buffers[0].shape == (k, n)
    assert buffers[0].data_ptr() == layer.scratch.get(k, n, torch.bfloat16, x.device).data_ptr()


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[2], SCHEMES[5]], ids=str)
def test_bf16_engine_hands_4bit_layers_to_atens_int4_kernel(tmp_path, scheme):
    """A bf16 engine gives every 4-bit layer ATen's int4 CPU layout that the kernel can take (groups of 48
    it cannot: those stay on the numba loop) and decodes within bf16's rounding of the dense reference."""
    from minipaged_kernels import cpu as cpu_kernels

    if cpu_kernels.load("int4_aten") is None:
        pytest.skip("this PyTorch has no int4 CPU kernel")
    reference = write_checkpoint(tiny_llama(), scheme, tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", num_kv_blocks=64, block_size=8)
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    converted = [m.int4 is not None for m in layers]
    assert converted == [scheme.group_size % 32 == 0] * len(layers)
    assert all((m.qweight is None) == c for m, c in zip(layers, converted))
    prompts, max_tokens = prompts_for_test()
    assert_greedy_under(reference, prompts, greedy(llm, prompts, max_tokens), tol=0.15)


@pytest.mark.parametrize(
    "symmetric, scale_dtype, actorder",
    [
        (False, torch.bfloat16, False),
        (True, torch.bfloat16, False),
        (True, torch.float16, False),
        (True, torch.bfloat16, True),
    ],
    ids=["asymmetric", "symmetric", "fp16-scales", "act-order"],
)
def test_a_layer_given_atens_layout_keeps_one_copy_and_gives_the_tensors_back(symmetric, scale_dtype, actorder):
    """``pack_int4`` replaces ``qweight``, the scales when ATen's copy holds them exactly (same dtype) and the
    zero points when all are 8 (memory counted once); ``state_dict`` and the other CPU paths get the format's
    tensors back exactly, and fp32 rows still multiply through them."""
    from minipaged_kernels import cpu as cpu_kernels

    if cpu_kernels.load("int4_aten") is None:
        pytest.skip("this PyTorch has no int4 CPU kernel")
    gen = torch.Generator().manual_seed(3)
    k, n, gs = 96, 48, 32
    layer = QuantLinear(k, n, False, bits=4, group_size=gs, has_g_idx=actorder, scale_dtype=scale_dtype)
    layer.qweight.copy_(qf.pack_int32(torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32), 4))
    zeros = torch.full((k // gs, n), 8) if symmetric else torch.randint(1, 16, (k // gs, n), generator=gen)
    layer.zeros.copy_(zeros)
    layer.scales.copy_(torch.rand(k // gs, n, generator=gen) * 0.05 + 0.01)
    if actorder:
        layer.g_idx.copy_((torch.arange(k) // gs)[torch.randperm(k, generator=gen)])
    loaded = {name: t.clone() for name, t in layer.state_dict().items()}
    before = weight_bytes(layer)["packed"]
    released = [loaded["qweight"]] + [loaded["scales"]] * (scale_dtype == torch.bfloat16) + [zeros.int()] * symmetric
    assert layer.pack_int4(torch.bfloat16) == sum(t.nbytes for t in released)
    assert layer.qweight is None and (layer.scales is None) == (scale_dtype == torch.bfloat16)
    assert (layer.zeros is None) == symmetric
    assert weight_bytes(layer)["packed"] == before - sum(t.nbytes for t in released) + layer.int4.nbytes()
    assert layer.int4.weight.nbytes == loaded["qweight"].nbytes  # the 4-bit words are held once
    state = layer.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[name], t) for name, t in loaded.items())
    assert all(state[name].dtype == t.dtype for name, t in loaded.items())
    x = torch.randn(3, k, generator=gen)
    ref = x.double() @ qf.dequantize(layer.packed_weight(), torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)  # fp32 rows: the numba path
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())
