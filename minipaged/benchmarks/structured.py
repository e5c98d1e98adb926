"""``python -m minipaged bench structured``: what a grammar costs per decode step.

A batch of ``--batch`` sequences decodes under one JSON schema over the SmolLM2 vocabulary
(its tokenizer, ``make setup``). Each step times the three things structured outputs add to
a step, separately: filling the ``[batch, ceil(vocab / 32)]`` int32 bitmask from the matchers,
applying it to ``[batch, vocab]`` fp32 logits (the engine's torch path on CPU, the Triton kernel
on a GPU), and advancing the matchers by the sampled tokens. The tokens come from random logits
under the mask; a sequence whose grammar completes restarts, so every step is a mid-document
step. Prints the median microseconds per step of each, and their sum per token.
"""

from __future__ import annotations

import argparse
import time

import torch

from minipaged.benchmarks.common import add_threads_argument, apply_threads, describe_machine, plain_doc, positive_int
from minipaged.core.sequence import Sequence
from minipaged.outputs import RequestMetrics
from minipaged.sampling_params import SamplingParams, StructuredOutputsParams
from minipaged.structured_output import StructuredOutputManager

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(prog="minipaged bench structured", description=plain_doc(__doc__).split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=8, help="constrained sequences per step")
    p.add_argument("--steps", type=positive_int, default=200, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="where the logits live (cuda: the Triton kernel applies the mask)")
    add_threads_argument(p)
    return p


def _sequences(batch: int, params: SamplingParams, generation: int) -> list[Sequence]:
    return [
        Sequence(f"r{generation}-{i}", 0, [1], params, torch.Generator(), 0, i, RequestMetrics(0.0))
        for i in range(batch)
    ]


def run(batch: int, steps: int, warmup: int, device: str) -> dict[str, float]:
    """Median microseconds per step of ``fill``, ``apply`` and ``accept`` (and their sum, ``total``)."""
    from transformers import AutoTokenizer

    from minipaged.models.loader import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    vocab = len(tokenizer)
    manager = StructuredOutputManager(tokenizer, vocab, [tokenizer.eos_token_id])
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    manager.prepare(params.structured_outputs).result()
    seqs = _sequences(batch, params, 0)
    gen = torch.Generator(device=device).manual_seed(0)
    times: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    for step in range(warmup + steps):
        logits = torch.randn(batch, vocab, generator=gen, device=device)
        t0 = time.perf_counter()
        bitmask = manager.fill_bitmask(seqs)
        t1 = time.perf_counter()
        manager.apply(logits, bitmask)
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        tokens = logits.argmax(dim=1).tolist()
        t3 = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.output_token_ids.append(token)
            if manager.accept(seq, token):
                manager.release([seq.seq_id])
                seqs[i] = _sequences(1, params, step + 1)[0]
        t4 = time.perf_counter()
        if step >= warmup:
            times["fill"].append(t1 - t0)
            times["apply"].append(t2 - t1)
            times["accept"].append(t4 - t3)
    manager.shutdown()
    out = {name: sorted(v)[len(v) // 2] * 1e6 for name, v in times.items()}
    out["total"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print microseconds per step."""
    args = build_parser().parse_args(argv)
    threads = apply_threads(args)
    print(describe_machine())
    result = run(args.batch, args.steps, args.warmup, args.device)
    print(f"structured outputs, batch={args.batch} threads={threads} device={args.device} (median us per step)")
    for name in ("fill", "apply", "accept", "total"):
        print(f"  {name:8s} {result[name]:10.1f} us   {result[name] / args.batch:8.1f} us/row")


if __name__ == "__main__":
    main()
