"""The ``minipaged`` command: ``generate``, ``serve`` (the OpenAI-compatible server), ``quantize`` and ``bench NAME``.

Every invalid value, whether argparse or the engine finds it, ends the run with one line
``minipaged: error: ...`` on stderr and exit status 2, like argparse; no traceback. Subcommands
register themselves in ``_parser`` with ``set_defaults(run=...)``; engine options come from
``add_engine_arguments`` / ``engine_kwargs`` so every subcommand spells them alike.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from minipaged.entrypoints.engine_args import add_engine_arguments, engine_fields, engine_kwargs
from minipaged.entrypoints.openai.cli import add_serve_parser
from minipaged.entrypoints.quantize import add_quantize_parser

PROG = "minipaged"
DESCRIPTION = """\
Serve and run small language models on a paged KV cache.

  minipaged generate "The capital of France is"     one or more prompts (--chat for the chat template)
  minipaged serve --port 8000                       the OpenAI-compatible server
  minipaged quantize OUT --bits 4 --method gptq     a W4A16 / W8A16 checkpoint of the model
  minipaged bench NAME                              benchmarks: minipaged bench --help

The model defaults to the embedded SmolLM2-135M-Instruct; generate decodes greedily unless given
a --temperature.
"""


class CliError(Exception):
    """A usage error found after parsing (e.g. incompatible options); ends the run with exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), so every error looks alike."""

    def error(self, message: str) -> NoReturn:
        _print_error(message)
        raise SystemExit(2)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    # --seed here is the per-request sampling seed (SamplingParams.seed), not the engine's.
    add_engine_arguments(gen, exclude=("seed",))
    s = gen.add_argument_group("sampling", "SamplingParams fields; unset ones keep SamplingParams' defaults")
    s.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: %(default)s)")
    s.add_argument("--min-tokens", type=int, help="EOS and stop tokens are masked until this many tokens")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    s.add_argument("--top-p", type=float, help="keep the smallest set of tokens with this much probability")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    s.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top token's probability")
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past the model's EOS")
    s.add_argument(
        "--logprobs",
        type=int,
        metavar="K",
        help="print each token's log-probability and the K most likely alternatives",
    )
    s.add_argument("--seed", type=int, help="seed of each request's own generator")
    s.add_argument("--n", type=int, help="samples per prompt")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt, --n 1)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.set_defaults(run=_generate)


# ``bench NAME``: the module that runs it and its one-line description. The modules are imported
# only when their benchmark runs (by name, at run time: benchmarks sit above the entrypoints and
# import their engine options from here), so ``minipaged --help`` loads none of them.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "throughput": (
        "minipaged.benchmarks.throughput",
        "output tokens/s of a request mix vs transformers' static batches and vLLM's CPU build",
    ),
    "latency": ("minipaged.benchmarks.latency", "latency of one batch from submission to its last token"),
    "serve": (
        "minipaged.benchmarks.serve",
        "Poisson arrivals against OpenAI-compatible servers: TTFT, TPOT, ITL, end-to-end latency",
    ),
    "tp": ("minipaged.benchmarks.tp", "tensor-parallel ranks vs one process on the same workload"),
    "pp": ("minipaged.benchmarks.pp", "pipeline stages with one or P batches in flight, and P x T, vs one process"),
    "blocks": ("minipaged.benchmarks.blocks", "block manager operations per second on a large pool"),
    "step": ("minipaged.benchmarks.step", "one decode step of the model vs transformers' own"),
    "kv-quant": ("minipaged.benchmarks.kv_quant", "accuracy and capacity of the int8 / fp8 KV cache (notebook 08)"),
    "structured": ("minipaged.benchmarks.structured", "per-step cost of a grammar: bitmask fill, apply, accept"),
    "quant-accuracy": (
        "minipaged.benchmarks.quant_accuracy",
        "perplexity and agreement with fp32 of W8A16 / W4A16 checkpoints (RTN, GPTQ)",
    ),
}


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark (minipaged bench NAME --help for its options)",
        description="Benchmarks; each takes its own options: minipaged bench NAME --help.",
    )
    names = bench.add_subparsers(dest="benchmark", required=True, metavar="NAME", parser_class=_Parser)
    for name, (_, description) in BENCHMARKS.items():
        # Listed here for ``bench --help``; ``main`` hands ``bench NAME ...`` to the module before parsing.
        names.add_parser(name, help=description, add_help=False)


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` (a ``BENCHMARKS`` key) with its own arguments; returns its exit status."""
    module = importlib.import_module(BENCHMARKS[name][0])
    status = module.main(argv)
    return 0 if status is None else int(status)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    add_serve_parser(sub)
    add_quantize_parser(sub)
    _add_bench(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from minipaged import LLM, SamplingParams

    params = SamplingParams(**_sampling_kwargs(args))
    if args.stream and (len(args.prompts) > 1 or params.n > 1):
        raise CliError("--stream prints one completion as it grows: give one prompt and --n 1 (or drop --stream)")
    # Shut down on the way out, Ctrl-C included: under torchrun that ends the other ranks in order.
    with LLM(**engine_kwargs(args)) as llm:
        return _generate_with(llm, args, params)


def _generate_with(llm: Any, args: argparse.Namespace, params: Any) -> int:
    prompts: list = args.prompts
    if args.chat:
        prompts = llm.chat_prompts([[{"role": "user", "content": p}] for p in args.prompts])
    if args.stream:
        for chunk in llm.stream(prompts[0], params):
            print(chunk.text, end="", flush=True)
        print()
        return 0
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    for prompt_text, out in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"### {prompt_text}")
        for completion in out.outputs:
            prefix = f"[{completion.index}] " if len(out.outputs) > 1 else ""
            print(prefix + completion.text.strip())
            if args.logprobs is not None:
                _print_logprobs(completion, llm.tokenizer)
    return 0


# generate's options that are SamplingParams fields of the same name.
SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``SamplingParams`` keywords of the sampling options given (``stop`` repeatable)."""
    kwargs = {name: getattr(args, name) for name in SAMPLING_FIELDS if getattr(args, name) is not None}
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    return kwargs


def _print_logprobs(completion: Any, tokenizer: Any) -> None:
    """One line per generated token: the token, its logprob and rank, then the alternatives."""
    if completion.logprobs is None:
        print(f"{PROG}: warning: this engine returned no logprobs", file=sys.stderr)
        return

    def name(token: int) -> str:
        return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)

    for token, entry in zip(completion.token_ids, completion.logprobs):
        chosen = entry[token]
        others = sorted((lp.rank or 0, t, lp.logprob) for t, lp in entry.items() if t != token)
        alternatives = ", ".join(f"{name(t)} {lp:.3f}" for _, t, lp in others)
        print(
            f"  {name(token)} {chosen.logprob:.3f} (rank {chosen.rank})"
            + (f" | {alternatives}" if alternatives else "")
        )


def _error_line(err: Exception, args: argparse.Namespace) -> str:
    """``argument --max-tokens: must be ...`` for a typed input error whose field is a CLI option."""
    field = getattr(err, "field", None)
    message = str(err)
    if field is None:
        return message
    message = message.removeprefix(f"{field}: ")
    if field in ("prompt", "prompts", "messages"):
        return f"argument prompts: {message}"
    if field in vars(args):  # every option's dest is its flag without the dashes
        return f"argument --{field.replace('_', '-')}: {message}"
    return f"{field}: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for any invalid value, like argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        # Each benchmark parses its own options (and prints its own --help); errors of the
        # engine it builds are reported against the engine flags, which every benchmark shares.
        engine_flags = argparse.Namespace(**{f.name: None for f in engine_fields()})
        return _run_reporting_errors(lambda: run_benchmark(argv[1], argv[2:]), engine_flags)
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return _run_reporting_errors(lambda: run(args), args)


def _run_reporting_errors(run: Callable[[], int], args: argparse.Namespace) -> int:
    """``run()``, with a typed input error or Ctrl-C turned into one stderr line and an exit status.

    Ctrl-C exits with 130, as a shell expects, except in a torchrun rank: there it is the job's
    requested stop (the server drained and shut every rank down in order), and any non-zero
    status would make torchrun report the job as failed. SIGTERM, which torchrun's agent and
    cluster schedulers send, stops a rank the same way (uvicorn catches both while serving and
    re-raises the one it caught once it has shut down).
    """
    from minipaged.distributed import torchrun_rank
    from minipaged.errors import InputError
    from minipaged.models.loader import ModelNotFoundError

    launched = torchrun_rank() is not None
    if launched and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run()
        except CliError as err:
            _print_error(str(err))
        except ModelNotFoundError as err:
            _print_error(f"argument --model: {err}")
        except InputError as err:
            _print_error(_error_line(err, args))
        except KeyboardInterrupt:
            return 0 if launched else 130
    return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)
