"""``minipaged quantize [MODEL] OUT``: write a weight-only quantized (W4A16 / W8A16) checkpoint.

The work is ``minipaged.models.quantization.quantizer.quantize_checkpoint``; this module only
turns flags into its ``QuantizeOptions``. Errors are the CLI's usual one line and exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minipaged.models.quantization.quantizer import DTYPES, FORMATS, METHODS, QuantizeOptions

PER_CHANNEL = ("per-channel", "channel", "-1")


def group_size(text: str) -> int | None:
    """``--group-size``: a positive int, or ``per-channel`` (``-1``) for one group per output channel."""
    if text.lower() in PER_CHANNEL:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'per-channel', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'per-channel', got {text!r}")
    return value


def add_quantize_parser(sub: Any) -> None:
    """Register ``quantize`` on the CLI's subparsers."""
    defaults = QuantizeOptions()
    q = sub.add_parser(
        "quantize",
        help="write a W4A16 / W8A16 checkpoint (round-to-nearest or GPTQ)",
        description="Quantize every decoder linear of a Hugging Face safetensors model (embeddings, LM head "
        "and norms stay dense) and write a compressed-tensors or GPTQ checkpoint that transformers, "
        "vLLM and minipaged load.",
    )
    q.add_argument(
        "paths",
        nargs="+",
        metavar="[MODEL] OUT",
        help="source model directory (default: the embedded SmolLM2-135M-Instruct) and the output directory",
    )
    q.add_argument("--bits", type=int, choices=(4, 8), default=defaults.bits, help="(default: %(default)s)")
    q.add_argument(
        "--group-size",
        type=group_size,
        default=defaults.group_size,
        help="input columns per scale, or 'per-channel' (default: %(default)s)",
    )
    q.add_argument("--method", choices=METHODS, default=defaults.method, help="(default: %(default)s)")
    q.add_argument("--format", choices=FORMATS, default=defaults.format, help="(default: %(default)s)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric: a zero point per group")
    q.add_argument("--desc-act", action="store_true", help="GPTQ in order of decreasing activation (writes g_idx)")
    q.add_argument("--calibration", type=Path, metavar="FILE", help="GPTQ calibration text (default: shipped text)")
    q.add_argument(
        "--num-calibration-samples",
        type=int,
        default=defaults.num_calibration_samples,
        metavar="N",
        help="most calibration windows (default: %(default)s)",
    )
    q.add_argument(
        "--calibration-seq-len",
        type=int,
        default=defaults.calibration_seq_len,
        metavar="T",
        help="tokens per calibration window (default: %(default)s)",
    )
    q.add_argument("--damp", type=float, default=defaults.damp, help="GPTQ dampening (default: %(default)s)")
    q.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of scales and dense tensors (default: the model's)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    q.set_defaults(run=run_quantize)


def options_from_args(args: argparse.Namespace) -> QuantizeOptions:
    """The ``QuantizeOptions`` the flags ask for."""
    return QuantizeOptions(
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        symmetric=args.symmetric,
        desc_act=args.desc_act,
        format=args.format,
        calibration=args.calibration,
        num_calibration_samples=args.num_calibration_samples,
        calibration_seq_len=args.calibration_seq_len,
        damp=args.damp,
        dtype=args.dtype,
    )


def run_quantize(args: argparse.Namespace) -> int:
    """``minipaged quantize``: validate the flags, quantize, print where the checkpoint is."""
    from minipaged.entrypoints.cli import CliError
    from minipaged.models.loader import ModelNotFoundError
    from minipaged.models.quantization.quantizer import quantize_checkpoint

    if len(args.paths) > 2:
        raise CliError(f"quantize takes [MODEL] OUT, got {len(args.paths)} paths")
    model, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    options = options_from_args(args)
    options.validate()
    try:
        path = quantize_checkpoint(model, out, options, progress=not args.no_progress)
    except ModelNotFoundError as err:
        raise CliError(f"argument MODEL: {err}") from None
    print(f"minipaged: wrote {path}")
    return 0
