"""Tensor-parallel benchmark: the same workload on one process and on ``--tp`` ranks, interleaved.

    python -m minipaged bench tp [--tp 2] [--model DIR] [--num-requests 16] [--rounds 2] [engine options]

Both engines live in this process (rank 0 of the TP one spawns the other ranks) and
run the same prompts (random token ids, ``ignore_eos``) in alternating rounds, so the
ratios are a same-run A/B. One process runs twice, with all the machine's cores and with
``cores / tp`` threads (what each TP rank gets). For the TP engine it also prints how much of rank 0's
step time is spent inside collectives (all-reduces after the row-parallel layers, and the
per-step broadcast); that time includes waiting for the slower rank.

Without ``--model`` the model is a random-weight Llama with SmolLM2-135M's shape except
8 query / 4 KV heads (SmolLM2 has 9 / 3, which only TP=3 divides).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from minipaged.benchmarks.common import describe_machine, plain_doc, positive_int, warm_up
from minipaged.benchmarks.throughput import add_workload_arguments, make_workload
from minipaged.entrypoints.engine_args import add_engine_arguments, engine_kwargs

PROG = "minipaged bench tp"


def smollm2_like(
    num_heads: int = 8,
    num_kv_heads: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str | None = None,
):
    """A random-weight ``CausalLM`` of SmolLM2-135M's size (30 layers, hidden 576, vocab 49152, tied),
    in ``dtype`` on ``device`` with ``attention_backend`` (``None``: the device's default), as
    ``minipaged.models.load_model`` takes them."""
    from minipaged.attention import get_attention_backend
    from minipaged.models import CausalLM, ModelConfig

    config = ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=576 // num_heads,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attention_bias=False,
        eos_token_ids=(),
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = CausalLM(config, get_attention_backend(attention_backend, device), dtype)
    with torch.no_grad():  # drawn in fp32 on the CPU, so every dtype and device gets the same weights
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.05)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


def run_round(llm, work) -> tuple[float, float]:
    """``(seconds, seconds inside the engine's steps)`` for one pass over the workload."""
    from minipaged import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in work.max_tokens]
    steps_before = len(llm.trace)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(r.duration_s for r in list(llm.trace)[steps_before:])


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options: the workload's, ``--tp``, ``--rounds`` and the engine's."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=plain_doc(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.set_defaults(num_requests=16, input_len=(16, 128), output_len=(16, 64))
    parser.add_argument("--tp", type=positive_int, default=2, help="tensor_parallel_size of the TP engine")
    parser.add_argument("--model", default=None, help="HF model directory (default: a random SmolLM2-sized Llama)")
    parser.add_argument(
        "--rounds", type=positive_int, default=2, help="alternating rounds per engine (after a warm-up)"
    )
    # --model (its own default), --tp and the workload's --seed are this benchmark's; thread counts
    # are set per engine below.
    add_engine_arguments(parser, exclude=("model", "tensor_parallel_size", "seed"))
    return parser


def engine_options(args: argparse.Namespace) -> dict:
    """``LLM`` keywords of both engines: the engine options given, over ``max_model_len=512`` and, unless
    ``--num-kv-blocks`` or ``--kv-cache-memory`` sizes the cache, 2048 blocks (the same cache for both
    engines whatever the machine's memory)."""
    kw = {"max_model_len": 512} | engine_kwargs(args)
    if "num_kv_blocks" not in kw and "kv_cache_memory" not in kw:
        kw["num_kv_blocks"] = 2048
    return kw


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: build one model, a single-process and a ``--tp`` engine over it, and time
    their interleaved rounds; prints the rounds, tokens/s and ratios. Returns the exit status."""
    args = build_parser().parse_args(argv)

    from minipaged import LLM
    from minipaged.config import EngineConfig
    from minipaged.models import load_model

    kw = engine_options(args)
    # Both engines share one prebuilt model, whose dtype, device and backend are the engine's: build it
    # with the ones the engine options ask for (EngineConfig resolves the names and the default device).
    built = EngineConfig.from_kwargs(**kw).model_kwargs()
    model = smollm2_like(**built) if args.model is None else load_model(args.model, **built).model
    cores = os.cpu_count() or 1
    work = make_workload(
        args.num_requests, model.config.vocab_size, tuple(args.input_len), tuple(args.output_len), args.seed
    )
    single = LLM(model, **kw)
    tp = LLM(model, tensor_parallel_size=args.tp, **kw)
    per_rank = max(1, cores // args.tp)
    # (label, engine, torch threads in this process); the TP engine's other ranks use per_rank threads each
    runs = [
        (f"TP=1 x {cores} threads", single, cores),
        (f"TP=1 x {per_rank} threads", single, per_rank),
        (f"TP={args.tp} x {per_rank} threads/rank", tp, per_rank),
    ]
    print(describe_machine())
    print(
        f"cores={cores} load average={os.getloadavg()[0]:.1f} "
        f"model={'random SmolLM2-sized Llama' if args.model is None else args.model} "
        f"requests={len(work.prompts)} output_tokens={work.output_tokens}"
    )
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    stats = tp.engine_core.worker.tp.stats

    def every_engine_once() -> None:
        for _, llm, threads in runs:
            torch.set_num_threads(threads)
            run_round(llm, work)

    warm_up(every_engine_once, 1)
    for round_index in range(1, args.rounds + 1):
        for label, llm, threads in runs:
            torch.set_num_threads(threads)
            before = (stats.all_reduce_s, stats.broadcast_s, stats.all_reduces, len(tp.trace))
            elapsed, in_steps = run_round(llm, work)
            times[label].append(elapsed)
            line = f"round {round_index}: {label}: {elapsed:.2f} s"
            if llm is tp:
                reduce_s, bcast_s = stats.all_reduce_s - before[0], stats.broadcast_s - before[1]
                steps = len(tp.trace) - before[3]
                line += (
                    f", {steps} steps, rank 0 inside collectives {(reduce_s + bcast_s) / in_steps:.0%} of step "
                    f"time (all-reduce {reduce_s / in_steps:.0%}, {(stats.all_reduces - before[2]) // steps} "
                    f"per step; step broadcast {bcast_s / in_steps:.0%})"
                )
            print(line, flush=True)
    tok = work.output_tokens
    best = {label: min(ts) for label, ts in times.items()}
    baseline = runs[0][0]
    print(
        " | ".join(f"{label}: {tok / t:.1f} tok/s ({best[baseline] / t:.2f}x)" for label, t in best.items())
        + f"  (best of {args.rounds} interleaved rounds; ratios against {baseline})"
    )
    print(
        f"per-rank KV cache: TP=1 {single.engine_core.worker.kv_cache_bytes / 2**20:.0f} MiB "
        f"({single.config.num_kv_blocks} blocks), TP={args.tp} "
        f"{tp.engine_core.worker.kv_cache_bytes_per_rank / 2**20:.0f} MiB ({tp.config.num_kv_blocks} blocks)"
    )
    tp.engine_core.worker.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
