"""Tensor-parallel benchmark: the same workload on one process and on ``--tp`` ranks, interleaved.

    python -m minipaged.bench_tp [--tp 2] [--model DIR] [--num-requests 16] [--rounds 2]

Both engines live in this process (rank 0 of the TP one spawns the other ranks) and
run the same prompts (random token ids, ``ignore_eos``) in alternating rounds, so the
ratio is a same-run A/B. The machine's cores are split evenly: one process gets all of
them, each TP rank ``cores / tp``. For the TP engine it also prints how much of rank 0's
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

from minipaged.bench import add_workload_arguments, make_workload, positive_int


def smollm2_like(num_heads: int = 8, num_kv_heads: int = 4):
    """A random-weight ``CausalLM`` of SmolLM2-135M's size (30 layers, hidden 576, vocab 49152, tied)."""
    from minipaged.attention import get_attention_backend
    from minipaged.models import CausalLM, ModelConfig

    config = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=576 // num_heads,
                         rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_position_embeddings=2048,
                         tie_word_embeddings=True, attention_bias=False, eos_token_ids=(), bos_token_id=None)
    torch.manual_seed(0)
    model = CausalLM(config, get_attention_backend("torch", "cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.05)
    return model.requires_grad_(False).eval()


def run_round(llm, work) -> tuple[float, float]:
    """``(seconds, seconds inside the engine's steps)`` for one pass over the workload."""
    from minipaged import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in work.max_tokens]
    steps_before = len(llm.trace)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(r.duration_s for r in list(llm.trace)[steps_before:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipaged.bench_tp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.set_defaults(num_requests=16, input_len=(16, 128), output_len=(16, 64))
    parser.add_argument("--tp", type=positive_int, default=2, help="tensor_parallel_size of the TP engine")
    parser.add_argument("--model", default=None, help="HF model directory (default: a random SmolLM2-sized Llama)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds per engine (after a warm-up)")
    args = parser.parse_args(argv)

    from minipaged import LLM
    from minipaged.models import load_model

    model = smollm2_like() if args.model is None else load_model(args.model).model
    cores = os.cpu_count() or 1
    work = make_workload(args.num_requests, model.config.vocab_size, tuple(args.input_len), tuple(args.output_len),
                         args.seed)
    kw = dict(num_kv_blocks=2048, block_size=16, max_model_len=512)
    single = LLM(model, **kw)
    tp = LLM(model, tensor_parallel_size=args.tp, **kw)
    threads = {1: cores, args.tp: max(1, cores // args.tp)}
    engines = {1: single, args.tp: tp}
    print(f"cores={cores} model={'random SmolLM2-sized Llama' if args.model is None else args.model} "
          f"requests={len(work.prompts)} output_tokens={work.output_tokens} threads/rank: "
          f"TP=1 {threads[1]}, TP={args.tp} {threads[args.tp]}")
    times: dict[int, list[float]] = {1: [], args.tp: []}
    step_s = 0.0
    stats = tp.worker.tp.stats
    for round_index in range(args.rounds + 1):  # round 0 warms both up and is not counted
        for size, llm in engines.items():
            torch.set_num_threads(threads[size])
            before = (stats.all_reduce_s, stats.broadcast_s, stats.all_reduces, len(tp.trace))
            elapsed, in_steps = run_round(llm, work)
            if round_index == 0:
                continue
            times[size].append(elapsed)
            if size == args.tp:
                step_s += in_steps
                reduce_s = stats.all_reduce_s - before[0]
                bcast_s = stats.broadcast_s - before[1]
                reduces = stats.all_reduces - before[2]
                steps = len(tp.trace) - before[3]
                print(f"round {round_index}: TP={args.tp} {elapsed:.2f} s, {steps} steps, rank 0 inside collectives "
                      f"{(reduce_s + bcast_s) / in_steps:.0%} of step time (all-reduce {reduce_s / in_steps:.0%}, "
                      f"{reduces // max(steps, 1)} per step; step broadcast {bcast_s / in_steps:.0%})")
            else:
                print(f"round {round_index}: TP=1 {elapsed:.2f} s")
    tok = work.output_tokens
    best = {size: min(ts) for size, ts in times.items()}
    print(f"TP=1 {tok / best[1]:.1f} tok/s | TP={args.tp} {tok / best[args.tp]:.1f} tok/s | "
          f"TP={args.tp}/TP=1 throughput {best[1] / best[args.tp]:.2f}x (best of {args.rounds} interleaved rounds)")
    print(f"per-rank KV cache: TP=1 {single.worker.kv_cache_bytes / 2**20:.0f} MiB, "
          f"TP={args.tp} {tp.worker.kv_cache_bytes_per_rank / 2**20:.0f} MiB for the same {kw['num_kv_blocks']} blocks")
    tp.worker.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
