"""The quantizer: RTN is round-to-nearest on its grid, GPTQ beats it on the calibration data, and
the checkpoints ``minipaged quantize`` writes load in transformers (with the compressed-tensors
package, which dequantizes them on CPU) as the same numbers decoded here by the formats' own
element-by-element definitions. An llmcompressor-written fixture checks the format the other way round.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minipaged.entrypoints.cli import main
from minipaged.models.quantization.gptq import HessianAccumulator, gptq_quantize
from minipaged.models.quantization.rtn import rtn_quantize
from minipaged_kernels.quant_formats import (
    dequantize,
    dequantize_reference_compressed_tensors,
    dequantize_reference_gptq,
    from_compressed_tensors,
)
from tests.tiny_models import SMOL_DIR, make_tiny_model_dir, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
PREFIX = "minipaged: error: "
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJ += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---- RTN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_picks_the_nearest_point_of_each_groups_grid(bits, group_size, symmetric):
    """Each dequantized weight is the grid point nearest to it, on a grid built from the group's range
    as the definition says (symmetric: +-max|w| around code 2**(bits-1); asymmetric: [min, max] with 0 on it)."""
    torch.manual_seed(bits * 7 + (group_size or 1) + symmetric)
    w = torch.randn(24, 128) * torch.rand(24, 1) + 0.3 * torch.randn(24, 1)  # uneven rows, shifted means
    qw = rtn_quantize(w, bits, group_size, symmetric)
    gs = group_size or 128
    maxq = 2**bits - 1
    deq = qw.dequantize().double()
    for n in range(0, 24, 5):
        for g in range(128 // gs):
            col = w[n, g * gs : (g + 1) * gs].double()
            if symmetric:
                scale = 2 * col.abs().max() / maxq
                zero = 2 ** (bits - 1)
            else:
                lo, hi = min(col.min(), 0.0), max(col.max(), 0.0)
                scale = (hi - lo) / maxq
                zero = round(float(-lo / scale))
            grid = (torch.arange(maxq + 1, dtype=torch.float64) - zero) * scale
            got = deq[n, g * gs : (g + 1) * gs]
            on_grid = (got[:, None] - grid[None, :]).abs().min(dim=1).values
            assert (on_grid <= 1e-4 * scale).all()  # every value is a point of the grid (fp32 scale)
            nearest = (col[:, None] - grid[None, :]).abs().min(dim=1).values
            # ... the nearest one (up to ties at exact midpoints, which fp32 rounding may break either way)
            assert ((col - got).abs() <= nearest + 1e-4 * scale).all()
            assert qw.zeros[n, g] == zero
    assert qw.q.min() >= 0 and qw.q.max() <= maxq
    if not symmetric:  # zero is on every asymmetric grid exactly
        zero_w = w.clone()
        zero_w[:, :5] = 0
        assert (rtn_quantize(zero_w, bits, group_size, False).dequantize()[:, :5] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_short_last_group_is_quantized_on_its_own_columns(symmetric):
    """K = 96 in groups of 64: the last group holds 32 columns, and its grid is the one RTN gives those
    columns alone (the padding that fills the group moves no scale or zero point)."""
    torch.manual_seed(3 + symmetric)
    w = torch.randn(8, 96) + (0 if symmetric else 0.7)  # asymmetric: a group range off-centre
    qw = rtn_quantize(w, 4, 64, symmetric)
    assert qw.scales.shape == (8, 2) and qw.q.shape == (8, 96) and qw.group_size == 64
    head, tail = rtn_quantize(w[:, :64], 4, None, symmetric), rtn_quantize(w[:, 64:], 4, None, symmetric)
    assert torch.equal(qw.dequantize(), torch.cat([head.dequantize(), tail.dequantize()], dim=1))
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(torch.randn(8, 96), 3, 32)
    with pytest.raises(ValueError, match="positive"):
        rtn_quantize(torch.randn(8, 96), 4, 0)


# ---- GPTQ -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def down_proj_calibration():
    """Layer 0's down_proj of the tiny random Llama and its inputs on calibration prompts.

    The prompts repeat a few token patterns, as text does, so the activations are correlated:
    the structure GPTQ's error propagation uses and RTN cannot."""
    hf = tiny_hf_model("llama")
    gen = torch.Generator().manual_seed(3)
    motifs = torch.randint(3, 384, (6, 8), generator=gen)
    ids = motifs[torch.randint(0, 6, (8, 12), generator=gen)].reshape(8, 96)
    captured = []
    linear = hf.model.layers[0].mlp.down_proj
    handle = linear.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        hf(input_ids=ids)
    handle.remove()
    x = torch.cat(captured).reshape(-1, linear.in_features)
    return linear.weight.detach().clone(), x


def _output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """``||X W^T - X Wq^T||^2`` on the calibration activations, in float64."""
    x = x.double()
    return float(((x @ w.double().t() - x @ wq.double().t()) ** 2).sum())


@pytest.mark.parametrize(
    "bits,group_size,act_order,block_size",
    [(4, 128, False, 128), (4, 128, True, 32), (4, 32, True, 128), (4, 32, False, 64), (8, None, False, 32)],
)
def test_gptq_error_on_the_calibration_data_is_below_rtn(
    down_proj_calibration, bits, group_size, act_order, block_size
):
    """GPTQ's point: with each column's rounding error propagated to the columns after it, the layer's
    output error on the calibration activations is well below rounding every weight on its own.
    Blocks shorter than K exercise the lazy update of the columns after each block too."""
    w, x = down_proj_calibration
    acc = HessianAccumulator(w.shape[1])
    for chunk in x.split(100):  # accumulated in pieces, as hooks deliver it
        acc.add(chunk)
    rtn = rtn_quantize(w, bits, group_size, symmetric=True)
    gptq = gptq_quantize(w, acc.hessian(), bits, group_size, symmetric=True, act_order=act_order, block_size=block_size)
    e_rtn = _output_error(w, rtn.dequantize(), x)
    e_gptq = _output_error(w, gptq.dequantize(), x)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    assert gptq.q.min() >= 0 and gptq.q.max() < 2**bits
    if act_order:  # g_idx: whole groups; with several groups, not the contiguous ones
        counts = torch.bincount(gptq.g_idx.long())
        assert (counts == group_size).all()
        if group_size < w.shape[1]:
            assert not torch.equal(gptq.g_idx.long(), torch.arange(w.shape[1]) // group_size)
    else:
        assert gptq.g_idx is None


def test_gptq_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(3, 7, 16)
    acc = HessianAccumulator(16)
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(acc.hessian(), 2 * flat.t() @ flat / 21)


# ---- checkpoints written by `minipaged quantize` ---------------------------------------------

needs_tokenizer = pytest.mark.skipif(
    not (SMOL_DIR / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer files come from `make setup`"
)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_src"), max_model_len=256)


def _quantize(source: Path, out: Path, *flags: str) -> Path:
    assert main(["quantize", str(source), str(out), "--no-progress", *flags]) == 0
    return out


def _hand_dequantized_model(src: Path, ckpt: Path, config: dict):
    """The source model with each decoder linear's weight replaced by the checkpoint's tensors decoded
    element by element, by the format's definition (``dequantize_reference_*``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    state = load_file(str(ckpt / "model.safetensors"))
    qc = config["quantization_config"]
    for i, layer in enumerate(model.model.layers):
        for proj in PROJ:
            p = f"model.layers.{i}.{proj}."
            assert p + "weight" not in state  # quantized layers carry no dense weight
            if qc["quant_method"] == "gptq":
                w = dequantize_reference_gptq(
                    state[p + "qweight"],
                    state[p + "qzeros"],
                    state[p + "scales"],
                    state[p + "g_idx"],
                    bits=qc["bits"],
                    group_size=qc["group_size"],
                    sym=qc["sym"],
                )
            else:
                scheme = qc["config_groups"]["group_0"]["weights"]
                w = dequantize_reference_compressed_tensors(
                    state[p + "weight_packed"],
                    state[p + "weight_scale"],
                    state.get(p + "weight_zero_point"),
                    state.get(p + "weight_g_idx"),
                    state[p + "weight_shape"],
                    bits=scheme["num_bits"],
                    group_size=scheme["group_size"],
                )
            layer.get_submodule(proj).weight.data = w.float()
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@needs_tokenizer
@pytest.mark.parametrize(
    "flags",
    [
        ("--bits", "4", "--group-size", "32", "--method", "rtn"),
        ("--bits", "4", "--group-size", "64", "--method", "gptq", "--num-calibration-samples", "4"),
        ("--bits", "8", "--group-size", "per-channel", "--method", "gptq", "--calibration-seq-len", "128"),
    ],
    ids=["w4-g32-rtn", "w4-g64-gptq", "w8-channel-gptq"],
)
def test_compressed_tensors_checkpoint_loads_in_transformers(source_dir, tmp_path, flags):
    """transformers + compressed-tensors read the checkpoint as the numbers its definition gives.

    Symmetric schemes only: transformers sizes an asymmetric module's ``weight_zero_point`` unpacked
    and re-initializes the packed one it finds (a known limitation), so asymmetric checkpoints are
    checked against compressed-tensors' own decompressor below instead."""
    from transformers import AutoModelForCausalLM

    ckpt = _quantize(source_dir, tmp_path / "q", *flags)
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    assert (ckpt / "tokenizer.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    by_hand = _hand_dequantized_model(source_dir, ckpt, config)
    dense = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want, fp32 = _logits(loaded, ids), _logits(by_hand, ids), _logits(dense, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want, fp32, atol=1e-4)  # the weights really are quantized


@needs_tokenizer
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_desc_act_checkpoint_decodes_to_the_quantizers_weights(source_dir, tmp_path, fmt):
    """With act order the groups are not contiguous: the written g_idx and packed words decode, by
    the format's definition, to the weights the quantizer left in the calibrated model."""
    flags = ("--bits", "4", "--group-size", "32", "--method", "gptq", "--desc-act", "--format", fmt)
    ckpt = _quantize(source_dir, tmp_path / "q", *flags, "--asym")
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    if fmt == "gptq":
        assert qc["desc_act"] is True and qc["sym"] is False and qc["bits"] == 4 and qc["group_size"] == 32
        assert qc["checkpoint_format"] == "gptq"
    else:
        assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    by_hand = _hand_dequantized_model(source_dir, ckpt, config)
    state = load_file(str(ckpt / "model.safetensors"))
    g_idx = state["model.layers.0.mlp.down_proj." + ("g_idx" if fmt == "gptq" else "weight_g_idx")]
    assert not torch.equal(g_idx.long(), torch.arange(128) // 32)
    # the same checkpoint in the other format decodes to the same weights
    other = "gptq" if fmt == "compressed-tensors" else "compressed-tensors"
    ckpt2 = _quantize(source_dir, tmp_path / "q2", *flags[:-1], other, "--asym")
    by_hand2 = _hand_dequantized_model(source_dir, ckpt2, json.loads((ckpt2 / "config.json").read_text()))
    for a, b in zip(by_hand.model.layers, by_hand2.model.layers):
        for proj in PROJ:
            torch.testing.assert_close(a.get_submodule(proj).weight, b.get_submodule(proj).weight, rtol=0, atol=0)


@needs_tokenizer
def test_gptq_checkpoint_with_a_short_last_group_loads_and_decodes(source_dir, tmp_path):
    """Groups of 48 over K = 64 and 128 (as 128 over SmolLM2's 576): GPTQ's layout holds the short last group,
    its tensors decode by the format's definition to per-group RTN of the source weights, and minipaged's
    loader multiplies by exactly those weights."""
    from minipaged.models import load_model

    ckpt = _quantize(source_dir, tmp_path / "q", "--bits", "4", "--group-size", "48", "--format", "gptq")
    config = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    assert config["quantization_config"]["group_size"] == 48
    assert state["model.layers.0.mlp.down_proj.scales"].shape[0] == 3  # ceil(128 / 48)
    by_hand = _hand_dequantized_model(source_dir, ckpt, config)
    source = load_file(str(source_dir / "model.safetensors"))
    loaded = load_model(ckpt).model
    for i, layer in enumerate(by_hand.model.layers):
        w = source[f"model.layers.{i}.mlp.down_proj.weight"]
        rtn = rtn_quantize(w, 4, 48, symmetric=True, scale_dtype=w.dtype).dequantize()
        torch.testing.assert_close(layer.mlp.down_proj.weight, rtn, rtol=0, atol=0)
        x = torch.randn(3, 128)
        ours = loaded.model.layers[i].mlp.down_proj(x)  # the few-row CPU kernel
        torch.testing.assert_close(ours, x @ layer.mlp.down_proj.weight.t(), rtol=1e-5, atol=1e-5)


def _compressed_tensors_decompress(state: dict, prefix: str, weights: dict) -> torch.Tensor:
    """One module's dense weight ``[N, K]`` by the compressed-tensors package's own pack-quantized decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    module = {name: state[prefix + name] for name in names if prefix + name in state}
    return PackedQuantizationCompressor.decompress(module, scheme)["weight"]


@needs_tokenizer
@pytest.mark.parametrize("bits,group_size", [(4, "32"), (8, "per-channel")])
def test_asymmetric_checkpoint_matches_compressed_tensors_decompressor(source_dir, tmp_path, bits, group_size):
    """Packed asymmetric zero points decode, by compressed-tensors' own code, to the quantizer's weights."""
    flags = ("--bits", str(bits), "--group-size", group_size, "--asym", "--method", "gptq")
    ckpt = _quantize(source_dir, tmp_path / "q", *flags, "--num-calibration-samples", "4")
    config = json.loads((ckpt / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is False and weights["zp_dtype"] == "torch.int8"
    by_hand = _hand_dequantized_model(source_dir, ckpt, config)
    state = load_file(str(ckpt / "model.safetensors"))
    for i, layer in enumerate(by_hand.model.layers):
        for proj in PROJ:
            theirs = _compressed_tensors_decompress(state, f"model.layers.{i}.{proj}.", weights)
            torch.testing.assert_close(layer.get_submodule(proj).weight, theirs.float(), rtol=0, atol=1e-7)


# ---- a checkpoint written by llmcompressor ----------------------------------------------------


@pytest.mark.parametrize("name", ["llmcompressor_w4a16_g32", "llmcompressor_w8a16_asym_channel"])
def test_llmcompressor_fixture_unpacks_to_the_reference_weights(name):
    """The formats module reads what llmcompressor wrote as compressed-tensors does: through
    transformers for the symmetric fixture, through the package's decompressor for the asymmetric
    one (transformers cannot size its packed zero points)."""
    from transformers import AutoModelForCausalLM

    path = FIXTURES / name
    scheme = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    weights = scheme["weights"]
    state = load_file(str(path / "model.safetensors"))
    model = None
    if weights["symmetric"]:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        _logits(model, torch.tensor([[1, 5, 9, 77]]))  # compressed-tensors decompresses on the first call
    for i in range(2):
        for proj in PROJ:
            p = f"model.layers.{i}.{proj}."
            pw = from_compressed_tensors(
                state[p + "weight_packed"],
                state[p + "weight_scale"],
                state.get(p + "weight_zero_point"),
                state.get(p + "weight_g_idx"),
                state[p + "weight_shape"],
                bits=weights["num_bits"],
                group_size=weights["group_size"],
                symmetric=weights["symmetric"],
            )
            ours = dequantize(pw).t()
            if model is not None:
                theirs = model.get_submodule(p[:-1]).weight
            else:
                theirs = _compressed_tensors_decompress(state, p, weights)
            torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-7)


# ---- CLI errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--bits", "3"), "argument --bits: invalid choice: 3"),
        (("--group-size", "48"), "argument --group-size: 48 does not divide model.layers.0.self_attn.q_proj"),
        (("--group-size", "48"), "compressed-tensors (and transformers through it) cannot read a short last group"),
        (("--group-size", "0"), "argument --group-size: expected a positive integer"),
        (("--desc-act",), "argument --desc-act: activation order needs calibration"),
        (("--method", "awq"), "argument --method: invalid choice"),
        (("--damp", "2"), "argument --damp: must be in (0, 1)"),
    ],
)
def test_bad_flags_print_one_line_and_exit_2(source_dir, tmp_path, capsys, flags, needle):
    try:
        status = main(["quantize", str(source_dir), str(tmp_path / "out"), "--no-progress", *flags])
    except SystemExit as exit_:  # argparse's own errors exit from parse_args
        status = exit_.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bad_paths(source_dir, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(PREFIX + "argument MODEL:")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["quantize", str(source_dir), str(tmp_path / "full"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(PREFIX + "out: ")


def test_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "minipaged", "quantize", str(tmp_path / "out"), "--bits", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == PREFIX + "argument --bits: invalid choice: 3 (choose from 4, 8)\n"
