"""What weight-only quantization costs in accuracy: perplexity and agreement with the fp32 model.

    python -m minipaged bench quant-accuracy                      # SmolLM2, every default scheme
    python -m minipaged bench quant-accuracy --schemes w4-g64-gptq --max-tokens 16

Each scheme is written by ``minipaged quantize`` (compressed-tensors) into a temporary directory and
read back by transformers with the compressed-tensors package, which dequantizes it: the forward
is transformers', so the numbers measure the checkpoint, not this project's kernels. Per scheme:

- perplexity on ``minipaged/data/eval_text.txt`` (shipped; not the calibration text), in windows
  of ``--window`` tokens;
- top-1 agreement: the fraction of those positions whose most likely next token equals fp32's;
- greedy agreement: ``--prompts`` prompts cut from the same text, ``--max-tokens`` greedy tokens
  each, the fraction of generated tokens equal to fp32's at the same position.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from minipaged.benchmarks.common import (
    add_out_argument,
    add_threads_argument,
    apply_threads,
    command_line,
    machine_info,
    plain_doc,
    write_json_atomic,
)
from minipaged.models.quantization.quantizer import QuantizeOptions, quantize_checkpoint

PROG = "minipaged bench quant-accuracy"
EVAL_FILE = "eval_text.txt"
# name -> QuantizeOptions fields. Groups of 64: SmolLM2's hidden size (576) is not a multiple of 128.
SCHEMES: dict[str, dict[str, Any]] = {
    "w8-channel-rtn": dict(bits=8, group_size=None, method="rtn"),
    "w8-channel-gptq": dict(bits=8, group_size=None, method="gptq"),
    "w4-g64-rtn": dict(bits=4, group_size=64, method="rtn"),
    "w4-g64-gptq": dict(bits=4, group_size=64, method="gptq"),
    "w4-g64-gptq-desc-act": dict(bits=4, group_size=64, method="gptq", desc_act=True),
}
# transformers' compressed-tensors loader cannot read weight_g_idx (activation order), so these are
# dequantized here with the formats module instead; see dense_from_checkpoint.
DEFAULT_SCHEMES = ("w8-channel-rtn", "w8-channel-gptq", "w4-g64-rtn", "w4-g64-gptq")


def eval_token_ids(tokenizer: Any) -> list[int]:
    """The shipped evaluation text as token ids."""
    text = resources.files("minipaged.data").joinpath(EVAL_FILE).read_text(encoding="utf-8")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def score(model: Any, ids: list[int], window: int) -> tuple[float, torch.Tensor]:
    """``(mean negative log-likelihood per predicted token, argmax predictions [n])`` over
    non-overlapping windows of ``ids``."""
    nll, count, preds = 0.0, 0, []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        nll -= float(logp.gather(-1, chunk[:, 1:, None]).sum())
        count += chunk.shape[1] - 1
        preds.append(logits.argmax(-1)[0])
    return nll / count, torch.cat(preds)


@torch.no_grad()
def greedy(model: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """``max_tokens`` greedy tokens after each prompt (no EOS stop, so lengths match)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        out.append(gen[0, len(prompt) :].tolist())
    return out


def load_dense(path: Path) -> Any:
    """A checkpoint as a dense fp32 transformers model (compressed-tensors dequantizes quantized ones)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model(input_ids=torch.tensor([[1, 2]]))  # compressed-tensors decompresses on the first call
    return model


def dense_from_checkpoint(src: Path, ckpt: Path) -> Any:
    """The source model with each quantized linear replaced by the checkpoint's weights, dequantized
    by the formats module: for schemes transformers cannot load (``weight_g_idx``)."""
    from safetensors.torch import load_file

    from minipaged_kernels.quant_formats import dequantize, from_compressed_tensors

    model = load_dense(src)
    weights = json.loads((ckpt / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    weights = weights["weights"]
    state = load_file(str(ckpt / "model.safetensors"))
    for name in {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_packed")}:
        pw = from_compressed_tensors(
            state[f"{name}.weight_packed"],
            state[f"{name}.weight_scale"],
            state.get(f"{name}.weight_zero_point"),
            state.get(f"{name}.weight_g_idx"),
            state[f"{name}.weight_shape"],
            bits=weights["num_bits"],
            group_size=weights["group_size"],
            symmetric=weights["symmetric"],
        )
        model.get_submodule(name).weight.data = dequantize(pw).t().contiguous()
    return model


def evaluate(src: Path, schemes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per scheme (fp32 first): perplexity, top-1 and greedy agreement with fp32, time to quantize."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    ids = eval_token_ids(tokenizer)
    step = max(len(ids) // args.prompts, args.prompt_len)
    prompts = [ids[i : i + args.prompt_len] for i in range(0, step * args.prompts, step)][: args.prompts]

    fp32 = load_dense(src)
    nll32, preds32 = score(fp32, ids, args.window)
    gen32 = greedy(fp32, prompts, args.max_tokens)
    rows = [dict(scheme="fp32", perplexity=math.exp(nll32), top1_agreement=1.0, greedy_agreement=1.0)]
    del fp32
    for name in schemes:
        with tempfile.TemporaryDirectory() as tmp:
            options = QuantizeOptions(**SCHEMES[name], num_calibration_samples=args.calibration_samples)
            start = time.perf_counter()
            ckpt = quantize_checkpoint(src, Path(tmp) / name, options, progress=not args.no_progress)
            seconds = time.perf_counter() - start
            model = dense_from_checkpoint(src, ckpt) if options.desc_act else load_dense(ckpt)
        nll, preds = score(model, ids, args.window)
        gen = greedy(model, prompts, args.max_tokens)
        same = sum(a == b for x, y in zip(gen, gen32) for a, b in zip(x, y))
        rows.append(
            dict(
                scheme=name,
                perplexity=math.exp(nll),
                top1_agreement=float((preds == preds32).float().mean()),
                greedy_agreement=same / sum(len(g) for g in gen32),
                quantize_seconds=round(seconds, 1),
            )
        )
        print(_row_text(rows[-1]), flush=True)
    return rows


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['scheme']:<22} ppl {row['perplexity']:8.3f}   top-1 {row['top1_agreement']:.3f}   "
        f"greedy {row['greedy_agreement']:.3f}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``."""
    lines = [
        "| scheme | perplexity | top-1 agreement with fp32 | greedy agreement with fp32 | quantize s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = (r["scheme"], f"{r['perplexity']:.3f}", f"{r['top1_agreement']:.3f}", f"{r['greedy_agreement']:.3f}")
        lines.append("| " + " | ".join((*cells, str(r.get("quantize_seconds", "")))) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``minipaged bench quant-accuracy``."""
    parser = argparse.ArgumentParser(prog=PROG, description=plain_doc(__doc__).splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2)")
    parser.add_argument("--schemes", nargs="+", choices=tuple(SCHEMES), default=list(DEFAULT_SCHEMES))
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=8, help="greedy prompts (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default: %(default)s)")
    parser.add_argument(
        "--calibration-samples", type=int, default=128, help="GPTQ calibration windows (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_threads_argument(parser)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args)

    from minipaged.models.loader import ensure_default_model

    src = Path(args.model) if args.model else ensure_default_model()
    rows = evaluate(src, args.schemes, args)
    print(table(rows))
    if args.out:
        write_json_atomic(args.out, dict(command=command_line(PROG, argv), machine=machine_info(), rows=rows))
    return 0
