"""Throughput benchmark: minipaged vs transformers (static padded batches, and its generate_batch).

    python -m minipaged.bench [--num-requests 64] [--threads N] [--static-batch-sizes 16 32 64]

All run in this one process on the same prompts (random token ids), dtype (fp32) and
thread count, with ``ignore_eos``, so each request produces exactly its requested
number of tokens. transformers' static batching is run at every batch size given and
minipaged is compared with the fastest of them, so the baseline is the best a
transformers user would get from ``generate``, not an arbitrary one. Prints output
tokens/s, the ratios, the machine's fp32 matmul rate measured now, and the fraction of
it minipaged achieves.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(num_requests: int, vocab: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int) -> Workload:
    """ShareGPT-like spread scaled to a CPU: uniform input and output lengths in the given ranges."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(num_requests)]
    return Workload(prompts, [rng.randint(*out_range) for _ in range(num_requests)])


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """fp32 GEMM rate of this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_token(model: torch.nn.Module) -> float:
    """2 x the weights every token multiplies: all Linear layers plus the LM head (tied or not)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if getattr(model, "lm_head", None) is None:
        linear += model.lm_head_weight.numel()
    return 2.0 * linear


def run_minipaged(loaded, work: Workload, max_num_seqs: int, kv_cache_dtype: str = "auto") -> tuple[float, str]:
    """Seconds for the whole workload, and ``step_breakdown`` of its steps."""
    from minipaged import LLM, SamplingParams

    llm = LLM(loaded, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, kv_cache_memory=2 << 30,
              kv_cache_dtype=kv_cache_dtype)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in work.max_tokens]
    llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    first_step = len(llm.trace)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    assert sum(len(o.outputs[0].token_ids) for o in outs) == work.output_tokens
    return elapsed, step_breakdown(llm.trace[first_step:])


def step_breakdown(records) -> str:
    """One line: time in steps that carry prompt tokens vs decode-only steps, and the mean decode batch."""
    prefill = [r for r in records if r.num_prefill_tokens]
    decode = [r for r in records if not r.num_prefill_tokens]
    mean_batch = sum(r.num_decode_tokens for r in decode) / max(len(decode), 1)
    return (f"  {len(records)} steps: {len(prefill)} with prompt tokens {sum(r.duration_s for r in prefill):.1f} s, "
            f"{len(decode)} decode-only {sum(r.duration_s for r in decode):.1f} s (mean batch {mean_batch:.1f})")


def run_hf_static(hf, work: Workload, batch_size: int, pad_id: int) -> float:
    """Fixed batches in submission order, left-padded; each batch runs to its longest request."""
    hf.generate(torch.tensor([work.prompts[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=pad_id)  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start:start + batch_size]
        new = max(work.max_tokens[start:start + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - t0


def run_hf_generate_batch(hf, work: Workload) -> tuple[float | None, str]:
    """transformers' continuous batching; one max_new_tokens per request through its manager."""
    from transformers import GenerationConfig

    if not hasattr(hf, "continuous_batching_context_manager"):
        return None, "unavailable in this transformers version"
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(work.max_tokens), eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    try:
        with hf.continuous_batching_context_manager(generation_config=gen_cfg, block=True, timeout=5) as manager:
            ids = [manager.add_request(p, max_new_tokens=m) for p, m in zip(work.prompts, work.max_tokens)]
            done = 0
            produced = 0
            while done < len(ids):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    done += 1
                    produced += len(result.generated_tokens)
                elif result is None and not manager.is_running():
                    return None, "its generation thread stopped early"
    except Exception as exc:  # report, do not hide: the other two numbers are still valid
        return None, f"failed: {type(exc).__name__}: {exc}"
    note = "" if produced == work.output_tokens else f" (produced {produced} of {work.output_tokens} tokens)"
    return time.perf_counter() - t0, note


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's options, shared with ``minipaged.bench_vllm`` so both build the same prompts."""
    parser.add_argument("--num-requests", type=positive_int, default=64)
    parser.add_argument("--input-len", type=positive_int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=positive_int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipaged.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--static-batch-sizes", type=positive_int, nargs="+", default=[16, 32, 64], metavar="B",
                        help="transformers static batch sizes to run; minipaged is compared with the fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every engine (default: torch's)")
    parser.add_argument("--skip-hf", action="store_true", help="only run minipaged")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8_e4m3"),
                        help="minipaged's KV cache dtype (see minipaged.kv_quant)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from minipaged.models import load_model
    from minipaged.models.loader import ensure_default_model

    loaded = load_model(None, dtype=torch.float32, attention_backend="torch")
    work = make_workload(args.num_requests, loaded.config.vocab_size, tuple(args.input_len), tuple(args.output_len), args.seed)
    gflops = matmul_gflops()
    per_token = flops_per_token(loaded.model)
    print(f"threads={torch.get_num_threads()} requests={len(work.prompts)} prompt_tokens={work.prompt_tokens} "
          f"output_tokens={work.output_tokens} fp32 matmul={gflops:.1f} GFLOP/s model={per_token / 1e6:.0f} MFLOP/token")

    results: dict[str, float | None] = {}
    t, breakdown = run_minipaged(loaded, work, max_num_seqs=max(64, args.num_requests), kv_cache_dtype=args.kv_cache_dtype)
    results["minipaged"] = work.output_tokens / t
    achieved = (work.prompt_tokens + work.output_tokens) * per_token / t / 1e9
    print(f"minipaged:                 {results['minipaged']:7.1f} output tok/s ({t:.1f} s); "
          f"{achieved:.1f} GFLOP/s incl. prefill = {achieved / gflops:.0%} of fp32 matmul")
    print(breakdown)
    if not args.skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), dtype=torch.float32).eval()
        static = {}
        for batch_size in dict.fromkeys(args.static_batch_sizes):  # each size once, in the order given
            t = run_hf_static(hf, work, batch_size, pad_id=0)
            static[batch_size] = work.output_tokens / t
            print(f"transformers static (bs={batch_size}): {static[batch_size]:7.1f} output tok/s ({t:.1f} s)", flush=True)
        best = max(static, key=static.get)
        results["static"] = static[best]
        print(f"best static batch size: {best}")
        t, note = run_hf_generate_batch(hf, work)
        results["generate_batch"] = None if t is None else work.output_tokens / t
        shown = "n/a" if t is None else f"{results['generate_batch']:7.1f} output tok/s ({t:.1f} s)"
        print(f"transformers generate_batch: {shown}{note}")
        for name in ("static", "generate_batch"):
            if results.get(name):
                label = f"static (bs={best})" if name == "static" else name
                print(f"minipaged / {label}: {results['minipaged'] / results[name]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
