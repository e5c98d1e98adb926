"""``python -m minipaged bench step``: decode-step throughput of our model vs transformers' own.

Both run the same weights (the embedded SmolLM2-135M-Instruct), ``--dtype`` and thread
count, one decode token for each of ``--batch`` sequences at context ``--context``:
ours over the paged cache with the torch attention backend, transformers' model with
its own KV cache (uniform lengths, so it wastes nothing on padding). With ``--ragged``
our contexts spread around that mean while transformers runs the padded batch a static
batch would. ``--plain-linear`` turns off the oneDNN pre-packed weights
(``minipaged.models.linear``) to show what they buy. Our model's weights are packed as the
engine's CPU worker packs them, dense copies kept for ``minipaged_kernels.cpu.gemv`` (1-4 rows).
``--decode-kernel fused gather`` times our step with each CPU decode-attention path
(``minipaged.attention.torch_backend``) and ``--few-row-linear on off`` with and without that
kernel, alternating every combination ``--rounds`` times in this one process so their ratios
mean something on a busy machine. Prints tokens/s, wall and CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from minipaged.attention import allocate_kv_cache, build_metadata, build_positions
from minipaged.attention.torch_backend import DECODE_KERNELS
from minipaged.benchmarks.common import add_threads_argument, apply_threads, describe_machine, plain_doc
from minipaged.config import DTYPES, EngineConfig
from minipaged.models.linear import PackedLinear, pack_in_place, packed_gemm_disabled
from minipaged.models.loader import ensure_default_model, load_model
from minipaged_kernels import cpu as cpu_kernels


def time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median ``(wall, cpu)`` seconds per call of ``step(i)`` after ``warmup`` calls.

    CPU time (all threads of this process) is reported next to wall time because on a
    shared machine wall time mostly measures the neighbours.
    """
    for i in range(warmup):  # step i runs at context + i: the timed steps go on from the warm-up's
        step(i)
    wall, cpu = [], []
    for i in range(warmup, warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(i)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def bench_ours(
    model,
    batch: int,
    context: int,
    block_size: int,
    warmup: int,
    steps: int,
    ragged: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Median ``(wall, cpu)`` seconds of one decode step of our ``model``: one token for each of ``batch``
    sequences at ``context`` tokens (spread around it with ``ragged``), over a paged cache of
    ``block_size``-token blocks in ``dtype``, each sequence's blocks its own; logits included.
    Token ids ``(batch,)`` are random; ``warmup`` untimed steps, then ``steps`` timed ones."""
    contexts = ragged_contexts(batch, context) if ragged else [context] * batch
    max_len = max(contexts) + warmup + steps
    blocks_per_seq = -(-max_len // block_size)
    caches = allocate_kv_cache(model.config, batch * blocks_per_seq + 1, block_size, dtype, "cpu")
    tables = [list(range(1 + s * blocks_per_seq, 1 + (s + 1) * blocks_per_seq)) for s in range(batch)]
    ids = torch.randint(0, model.config.vocab_size, (batch,))

    def step(i: int) -> None:
        lens = [c + i for c in contexts]
        meta = build_metadata([1] * batch, lens, tables, block_size)
        hidden = model(ids, build_positions([1] * batch, lens), caches, meta)
        model.compute_logits(hidden)

    return time_steps(step, warmup, steps)


def ragged_contexts(batch: int, context: int) -> list[int]:
    """``batch`` contexts spread evenly over ``[16, 2 * context - 16]`` (mean ``context``)."""
    return [round(16 + (2 * context - 32) * i / max(batch - 1, 1)) for i in range(batch)]


@torch.inference_mode()
def bench_transformers(hf_model, batch: int, context: int, warmup: int, steps: int) -> tuple[float, float]:
    """Median ``(wall, cpu)`` seconds of one decode step of transformers' ``hf_model``: input ids
    ``(batch, 1)`` over its own ``DynamicCache`` prefilled with ``context - 1`` random tokens per
    sequence, logits of the last position only; ``warmup`` untimed steps, then ``steps`` timed ones."""
    from transformers import DynamicCache

    prompt = torch.randint(0, hf_model.config.vocab_size, (batch, context - 1))
    cache = DynamicCache(config=hf_model.config)
    hf_model(prompt, past_key_values=cache, use_cache=True)
    ids = torch.randint(0, hf_model.config.vocab_size, (batch, 1))

    def step(i: int) -> None:
        hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    return time_steps(step, warmup, steps)


def time_variants(model, args: argparse.Namespace, dtype: torch.dtype) -> dict[tuple[str, str], tuple[float, float]]:
    """Median ``(wall, cpu)`` step time of our model for every (decode kernel, few-row linear)
    pair asked for, the pairs alternated ``args.rounds`` times.

    Without ``--few-row-linear`` the kernel is on where the engine would use it. Raises
    ``SystemExit`` when "on" is asked for but no layer kept a dense weight (no numba, a dtype
    other than fp32, or ``--plain-linear``), rather than time one path under two labels.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    dense = [m.dense_weight for m in layers]
    kept = any(d is not None for d in dense)
    few_row = args.few_row_linear or (["on"] if kept else ["off"])
    if "on" in few_row and not kept:
        raise SystemExit(
            "--few-row-linear on: no layer kept a dense weight for minipaged_kernels.cpu.gemv here "
            "(it needs numba, fp32 and the packed path); pass --few-row-linear off"
        )
    variants = [(kernel, few) for kernel in args.decode_kernel for few in few_row]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {v: [] for v in variants}
    with packed_gemm_disabled() if args.plain_linear else contextlib.nullcontext():
        for _ in range(args.rounds):
            for kernel, few in variants:
                model.attention_backend.decode_kernel = kernel
                for layer, weight in zip(layers, dense):
                    layer.dense_weight = weight if few == "on" else None
                results[kernel, few].append(
                    bench_ours(
                        model, args.batch, args.context, args.block_size, args.warmup, args.steps, args.ragged, dtype
                    )
                )
    return {v: tuple(sorted(t[i] for t in times)[len(times) // 2] for i in range(2)) for v, times in results.items()}


def report(label: str, times: tuple[float, float], batch: int) -> None:
    """Print one row: ``label``, the ``(wall, cpu)`` seconds per step in ms and the ``batch`` tokens/s."""
    wall, cpu = times
    print(f"{label:<40} {wall * 1e3:8.1f} ms/step wall ({batch / wall:7.1f} tokens/s)   {cpu * 1e3:8.1f} ms/step cpu")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (it runs the model without an engine, so it has no engine options)."""
    parser = argparse.ArgumentParser(prog="minipaged bench step", description=plain_doc(__doc__).splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument(
        "--block-size",
        type=int,
        default=EngineConfig.block_size,
        help="tokens per KV block of our paged cache (default: the engine's, %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    add_threads_argument(parser)
    parser.add_argument(
        "--ragged",
        action="store_true",
        help=(
            "ours: contexts spread over [16, 2*context-16]; "
            "transformers: a batch padded to the longest, as static batching runs it"
        ),
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--plain-linear", action="store_true", help="ours: F.linear instead of oneDNN pre-packed weights"
    )
    parser.add_argument(
        "--decode-kernel",
        nargs="+",
        choices=DECODE_KERNELS,
        default=["auto"],
        help="ours: CPU decode attention path(s) to time, alternated --rounds times",
    )
    parser.add_argument(
        "--few-row-linear",
        nargs="+",
        choices=("on", "off"),
        default=None,
        help="ours: 1-4 row linears through minipaged_kernels.cpu.gemv (on) or the packed GEMM (off); "
        "default: on where the engine would use it (numba, fp32, packed weights)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with several --decode-kernel / --few-row-linear values: times to alternate them",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="weights, activations and KV cache (both models)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark with ``argv`` (default: ``sys.argv``): time our decode step for every variant
    asked for, then transformers' (unless ``--skip-transformers``), and print the rows and the speed-up."""
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM

    apply_threads(args)
    dtype = DTYPES[args.dtype]
    loaded = load_model(None, dtype=dtype, attention_backend="torch")
    print(describe_machine())
    print(
        f"threads={torch.get_num_threads()} batch={args.batch} context={args.context} ragged={args.ragged} "
        f"dtype={args.dtype} model={loaded.name}"
    )
    if not args.plain_linear:  # as the engine's CPU worker does
        pack_in_place(loaded.model, keep_dense=cpu_kernels.load("gemv") is not None)
    medians = time_variants(loaded.model, args, dtype)
    for (kernel, few), times in medians.items():
        label = f"minipaged (torch, {kernel}" + (", few-row off)" if few == "off" else ")")
        report(label + (", plain F.linear" if args.plain_linear else ""), times, args.batch)
    ours = next(iter(medians.values()))
    if args.skip_transformers:
        return
    hf_model = AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=dtype).eval()
    padded = max(ragged_contexts(args.batch, args.context)) if args.ragged else args.context
    theirs = bench_transformers(hf_model, args.batch, padded, args.warmup, args.steps)
    report("transformers (sdpa)", theirs, args.batch)
    print(f"speed-up minipaged / transformers: {theirs[0] / ours[0]:.2f}x wall, {theirs[1] / ours[1]:.2f}x cpu")


if __name__ == "__main__":
    main()
