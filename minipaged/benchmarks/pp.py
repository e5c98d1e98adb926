"""Pipeline-parallel benchmark: one process, P stages with one batch in flight, P with P in flight, P x T.

    python -m minipaged bench pp [--pp 2] [--tp 2] [--model DIR] [--num-requests 16] [--rounds 2] [engine options]

One distributed engine can run per process at a time, so the configurations run one after
the other (not interleaved: compare them only within one quiet run). For each pipeline
engine it prints how long each stage spent in its forward (busy seconds, from the
engine's per-stage timeline) against the wall time, and the share of the stages' time
spent receiving the residual stream from the stage before. With one batch in flight the
stages take turns, so their busy times add up to about the wall time; with ``--pp`` batches
in flight they overlap. The per-stage time each forward reports includes waiting for the
other stage's processes where cores are shared.
"""

from __future__ import annotations

import argparse
import os

import torch

from minipaged.benchmarks.common import describe_machine, plain_doc, positive_int, warm_up
from minipaged.benchmarks.throughput import add_workload_arguments, make_workload
from minipaged.benchmarks.tp import engine_options, run_round, smollm2_like
from minipaged.entrypoints.engine_args import add_engine_arguments

PROG = "minipaged bench pp"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options: the workload's, ``--pp``, ``--tp``, ``--rounds`` and the engine's."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=plain_doc(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.set_defaults(num_requests=16, input_len=(16, 128), output_len=(16, 64))
    parser.add_argument("--pp", type=positive_int, default=2, help="pipeline_parallel_size of the pipeline engines")
    parser.add_argument("--tp", type=positive_int, default=2, help="tensor_parallel_size of the P x T engine")
    parser.add_argument("--model", default=None, help="HF model directory (default: a random SmolLM2-sized Llama)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds per engine (after a warm-up)")
    exclude = ("model", "tensor_parallel_size", "pipeline_parallel_size", "max_concurrent_batches", "seed")
    add_engine_arguments(parser, exclude=exclude)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run each configuration in turn over the same workload; prints rounds, tokens/s and stage busy times."""
    args = build_parser().parse_args(argv)

    from minipaged import LLM
    from minipaged.config import EngineConfig
    from minipaged.models import load_model
    from minipaged.worker.pipeline import stage_busy_seconds

    kw = engine_options(args)
    # Pipelines need at least one batch per stage in flight to overlap: cap each batch's sequences.
    kw.setdefault("max_num_seqs", max(1, args.num_requests // args.pp))
    built = EngineConfig.from_kwargs(**kw).model_kwargs()
    model = smollm2_like(**built) if args.model is None else load_model(args.model, **built).model
    cores = os.cpu_count() or 1
    work = make_workload(
        args.num_requests, model.config.vocab_size, tuple(args.input_len), tuple(args.output_len), args.seed
    )
    configs = [
        ("P=1", {}),
        (f"P={args.pp} depth 1", dict(pipeline_parallel_size=args.pp, max_concurrent_batches=1)),
        (f"P={args.pp} depth {args.pp}", dict(pipeline_parallel_size=args.pp)),
        (f"P={args.pp} x T={args.tp}", dict(pipeline_parallel_size=args.pp, tensor_parallel_size=args.tp)),
    ]
    print(describe_machine())
    print(
        f"cores={cores} load average={os.getloadavg()[0]:.1f} "
        f"model={'random SmolLM2-sized Llama' if args.model is None else args.model} "
        f"requests={len(work.prompts)} output_tokens={work.output_tokens} max_num_seqs={kw['max_num_seqs']}"
    )
    best: dict[str, float] = {}
    for label, extra in configs:
        world = extra.get("pipeline_parallel_size", 1) * extra.get("tensor_parallel_size", 1)
        torch.set_num_threads(max(1, cores // world))
        with LLM(model, **kw, **extra) as llm:
            warm_up(lambda llm=llm: run_round(llm, work), 1)
            executor = llm.engine_core.worker
            timeline = getattr(executor, "timeline", None)
            for round_index in range(1, args.rounds + 1):
                start = len(timeline) if timeline is not None else 0
                elapsed, _ = run_round(llm, work)
                best[label] = min(best.get(label, elapsed), elapsed)
                line = f"round {round_index}: {label}: {elapsed:.2f} s"
                if timeline is not None:
                    spans = timeline[start:]
                    busy = stage_busy_seconds(spans, llm.config.pipeline_parallel_size)
                    comm = sum(s.comm_s for s in spans)
                    line += (
                        ", stage busy "
                        + " / ".join(f"{b:.2f} s ({b / elapsed:.0%})" for b in busy)
                        + f", receiving hidden states {comm / max(sum(busy), 1e-9):.0%} of stage time"
                    )
                print(line, flush=True)
    baseline = configs[0][0]
    tok = work.output_tokens
    print(
        " | ".join(f"{label}: {tok / t:.1f} tok/s ({best[baseline] / t:.2f}x)" for label, t in best.items())
        + f"  (best of {args.rounds} rounds; ratios against {baseline})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
