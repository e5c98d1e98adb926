"""Latency benchmark: how long one batch takes from submission to its last token (``vllm bench latency``).

    python -m minipaged bench latency --batch-size 8 --input-len 32 --output-len 128 \\
        --num-iters-warmup 3 --num-iters 10 [--threads N] [--out latency.json] [engine options]

One batch of ``--batch-size`` prompts of ``--input-len`` random token ids, each generating exactly
``--output-len`` tokens (``min_tokens = max_tokens``, ``ignore_eos``; sampled at temperature 1 as
vLLM's benchmark does), submitted together with ``LLM.generate``. After ``--num-iters-warmup``
untimed runs it times ``--num-iters`` runs and prints the mean, median, P90 and P99 latency of the
whole batch and the time per output token (batch latency / ``--output-len``: one decode step of
the batch). Every run's prompts are the same, so with prefix caching on (the default) runs after
the first reuse the prompt's KV blocks; ``--no-prefix-caching`` measures the prefill every time.
The engine options are ``EngineConfig``'s (default model: the embedded SmolLM2-135M-Instruct).

Speculative decoding: ``--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'`` turns
it on; run once with and once without it. ``--workload copy`` replaces the random prompts with the
shipped prompts that invite copying (``minipaged/data/copy_prompts.jsonl``: repeat, edit or rename
within a given text; ``--input-len`` is then unused), ``--workload nomatch`` uses random prompts in
which no token repeats (prompt lookup finds nothing in them: what speculation costs when it cannot
help), and ``--temperature 0`` decodes greedily. With speculation the result reports the drafts, the
acceptance rate and the mean acceptance length. From ``disable_by_batch_size`` running sequences on
(default in ``SpeculativeConfig``) speculation proposes nothing; add ``"disable_by_batch_size": null``
to the config to measure speculation at every batch size. ``--compare-plain`` also builds the same
engine without speculation and alternates timed runs between the two (same prompts, same process),
so both see the same load; it reports the plain engine's latency and the median of the
per-iteration ratios. The two engines share one model object: with a copy of the weights each,
one engine has decoded up to a third slower per step than the other even without drafts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import statistics
import time
from typing import Any

import numpy as np

from minipaged.benchmarks.common import (
    add_out_argument,
    add_threads_argument,
    apply_threads,
    command_line,
    describe_machine,
    describe_weight_memory,
    machine_info,
    plain_doc,
    positive_int,
    warm_up,
    weight_memory,
    write_json_atomic,
)
from minipaged.entrypoints.engine_args import add_engine_arguments, engine_kwargs

PROG = "minipaged bench latency"
PROMPT_SEED = 0  # prompts are fixed random ids; --seed is the engine's sampling seed
WORKLOADS = ("random", "copy", "nomatch")
COPY_PROMPTS = "copy_prompts.jsonl"  # in minipaged/data


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (on ``parser`` when given, e.g. a ``bench`` subcommand's)."""
    parser = parser or argparse.ArgumentParser(
        prog=PROG, description=plain_doc(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bench = parser.add_argument_group("latency")
    bench.add_argument("--batch-size", type=positive_int, default=8, help="prompts in the batch (default: %(default)s)")
    bench.add_argument("--input-len", type=positive_int, default=32, help="tokens per prompt (default: %(default)s)")
    bench.add_argument(
        "--output-len", type=positive_int, default=128, help="tokens generated per prompt (default: %(default)s)"
    )
    bench.add_argument(
        "--num-iters-warmup", type=_nonnegative_int, default=3, help="untimed runs first (default: %(default)s)"
    )
    bench.add_argument("--num-iters", type=positive_int, default=10, help="timed runs (default: %(default)s)")
    bench.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="random",
        help="random: --input-len random token ids; copy: the shipped prompts that invite copying; "
        "nomatch: --input-len random ids, none repeated within a prompt (default: %(default)s)",
    )
    bench.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default: %(default)s)"
    )
    bench.add_argument(
        "--compare-plain",
        action="store_true",
        help="with --speculative-config: alternate every run with the same engine without speculation "
        "and report the speed-up",
    )
    add_threads_argument(parser)
    add_out_argument(parser)
    add_engine_arguments(parser)
    return parser


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def dummy_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """``batch_size`` lists of ``input_len`` random token ids in ``[0, vocab_size)``."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(batch_size)]


def nomatch_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """``batch_size`` lists of ``input_len`` distinct random token ids: no n-gram occurs twice in a prompt."""
    rng = random.Random(seed)
    return [rng.sample(range(vocab_size), input_len) for _ in range(batch_size)]


def copy_prompts(batch_size: int, tokenizer: Any) -> list[list[int]]:
    """``batch_size`` prompts from the shipped copy-inviting set (cycled), as token ids."""
    from importlib import resources

    lines = resources.files("minipaged.data").joinpath(COPY_PROMPTS).read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [tokenizer.encode(texts[i % len(texts)]) for i in range(batch_size)]


def speculation_summary(outputs: list[Any]) -> dict[str, Any]:
    """Drafts, draft and accepted tokens, acceptance rate and mean acceptance length of one run."""
    drafts = sum(o.metrics.num_drafts for o in outputs)
    draft_tokens = sum(o.metrics.num_draft_tokens for o in outputs)
    accepted = sum(o.metrics.num_accepted_tokens for o in outputs)
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
    }


def summarize(latencies: list[float], batch_size: int, input_len: int, output_len: int) -> dict[str, Any]:
    """Statistics of the timed runs (seconds) and the per-output-token time (ms)."""
    arr = np.asarray(latencies, dtype=float)
    mean = float(arr.mean())
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "num_iters": len(latencies),
        "latencies_s": [float(x) for x in arr],
        "mean_s": mean,
        "median_s": float(np.median(arr)),
        "p90_s": float(np.percentile(arr, 90)),
        "p99_s": float(np.percentile(arr, 99)),
        "per_output_token_ms": mean / output_len * 1e3,
        "output_tokens_per_s": batch_size * output_len / mean,
    }


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine from the engine options, warm up, time the batch; returns the result dict
    (``main`` has set the thread count). With ``--compare-plain`` a second engine without speculation
    runs the same batch after each run of the first: its latencies go to ``result["plain"]``."""
    from minipaged import LLM, SamplingParams

    kwargs = engine_kwargs(args)
    with contextlib.ExitStack() as stack:
        llm = stack.enter_context(LLM(**kwargs))
        plain = None
        if args.compare_plain:
            # The same model object, not a second copy of its weights: two copies need not stream
            # equally fast, which would show up as a speed-up or a loss that speculation did not cause.
            rest = {k: v for k, v in kwargs.items() if k not in ("model", "speculative_config")}
            plain = stack.enter_context(LLM(llm.model, tokenizer=llm.tokenizer, **rest))
        weights = weight_memory(llm.model)
        print(describe_weight_memory(weights), flush=True)
        if args.workload == "copy":
            ids = copy_prompts(args.batch_size, llm.tokenizer)
        elif args.workload == "nomatch":
            ids = nomatch_prompts(args.batch_size, args.input_len, llm.model_config.vocab_size)
        else:
            ids = dummy_prompts(args.batch_size, args.input_len, llm.model_config.vocab_size)
        prompts = [{"prompt_token_ids": p} for p in ids]
        params = SamplingParams(
            temperature=args.temperature,
            top_p=1.0,
            max_tokens=args.output_len,
            min_tokens=args.output_len,
            ignore_eos=True,
        )
        counts: dict[str, int] = {}

        def once(engine: Any = llm) -> float:
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            if engine is llm:
                counts["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outputs)
                counts["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outputs)
                speculation.update(speculation_summary(outputs))
            return elapsed

        speculation: dict[str, Any] = {}

        warm_up(once, args.num_iters_warmup)
        if plain is not None:
            warm_up(lambda: once(plain), args.num_iters_warmup)
        latencies, plain_latencies = [], []
        for i in range(args.num_iters):
            latencies.append(once())
            line = f"iteration {i + 1}/{args.num_iters}: {latencies[-1]:.3f} s"
            if plain is not None:
                plain_latencies.append(once(plain))
                line += f" (without speculation {plain_latencies[-1]:.3f} s)"
            print(line, flush=True)
        result = summarize(latencies, args.batch_size, args.input_len, args.output_len)
        if plain is not None:
            result["plain"] = summarize(plain_latencies, args.batch_size, args.input_len, args.output_len)
            # Paired: each ratio compares two runs made one after the other.
            result["speedup_over_plain"] = statistics.median(p / s for p, s in zip(plain_latencies, latencies))
        result |= counts
        result["weights"] = weights
        result["workload"] = args.workload
        result["temperature"] = args.temperature
        if llm.config.speculative_config is not None:
            result["speculation"] = speculation | {
                "disable_by_batch_size": llm.config.speculative_config.disable_by_batch_size
            }
        # The resolved config: KV blocks and max_model_len as the engine sized them.
        result["engine"] = {f.name: _jsonable(getattr(llm.config, f.name)) for f in dataclasses.fields(llm.config)}
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default: ``sys.argv``): print the machine, every timed run and
    the latency statistics, and write them to ``--out`` when given. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare_plain and args.speculative_config is None:
        parser.error("--compare-plain needs --speculative-config")
    apply_threads(args)
    machine = machine_info()
    print(describe_machine(machine), flush=True)
    result = run(args)
    want = args.batch_size * args.output_len
    if result["output_tokens"] != want:
        print(f"warning: the batch produced {result['output_tokens']} output tokens, not {want}")
    print(
        f"batch {args.batch_size} x ({result['prompt_tokens'] / args.batch_size:.0f} prompt + "
        f"{args.output_len} output tokens, {args.workload} prompts), "
        f"{args.num_iters} runs after {args.num_iters_warmup} warm-up:\n"
        f"  latency mean {result['mean_s']:.3f} s, median {result['median_s']:.3f} s, "
        f"P90 {result['p90_s']:.3f} s, P99 {result['p99_s']:.3f} s\n"
        f"  per output token {result['per_output_token_ms']:.2f} ms "
        f"({result['output_tokens_per_s']:.1f} output tokens/s)"
    )
    spec = result.get("speculation")
    if spec:
        rate = spec["acceptance_rate"]
        length = spec["mean_acceptance_length"]
        print(
            f"  speculation (last run): {spec['num_drafts']} drafts, {spec['num_draft_tokens']} draft tokens, "
            f"acceptance rate {'-' if rate is None else f'{rate:.2f}'}, "
            f"mean acceptance length {'-' if length is None else f'{length:.2f}'}"
        )
        if "speedup_over_plain" in result:
            print(
                f"  without speculation: latency median {result['plain']['median_s']:.3f} s; "
                f"speed-up {result['speedup_over_plain']:.2f}x (median of paired runs)"
            )
        threshold = spec["disable_by_batch_size"]
        if threshold is not None and args.batch_size >= threshold:
            print(f"  (batch {args.batch_size} >= disable_by_batch_size {threshold}: no drafts while all run)")
    if args.out:
        write_json_atomic(args.out, {"command": command_line(PROG, argv), "machine": machine, **result})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
