"""What a quantized KV cache costs in accuracy and buys in capacity: the numbers of notebook 08.

    python -m minipaged bench kv-quant                          # every part
    python -m minipaged bench kv-quant --parts greedy --prompts 50  # one part, fewer prompts

Updates ``figures/08_kv_quant_eval.json`` (``--out``; each part replaces its own entry and
records the command that produced it, so parts can run in separate processes), which the
notebook loads:

- ``kernel_errors``: the Triton decode kernel (the interpreter without CUDA) on a quantized
  cache vs the float64 reference over the *unquantized* cache (what quantization costs),
  and vs the float64 reference over the dequantized cache (what the kernel itself adds),
  for several scale schemes; histograms of log10 |error|.
- ``greedy``: the real SmolLM2-135M-Instruct, greedy, ``--max-tokens`` tokens for each of
  ``--prompts`` prompts (first paragraphs of Python standard-library docstrings, which
  ship with every Python), per cache dtype: the fraction of generated tokens equal to the
  float cache's at the same position, of identical completions, the first divergence.
- ``perplexity``: the same model scoring a fixed text (standard-library module
  docstrings, ``--ppl-tokens`` tokens) in chunks of ``PPL_CHUNK`` tokens, each chunk
  attending to the earlier ones through the paged cache, per cache dtype and scale scheme.
- ``capacity``: at one ``--capacity-kv-cache-memory``, a ShareGPT-like mix
  (``minipaged.benchmarks.throughput``'s workload, random token ids, ``ignore_eos``): blocks,
  most sequences running at once, preemptions and output tokens/s from the engine, per cache dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import inspect
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minipaged.attention import kv_quant
from minipaged.benchmarks.common import (
    add_out_argument,
    add_threads_argument,
    apply_threads,
    command_line,
    machine_info,
    plain_doc,
    write_json_atomic,
)
from minipaged.entrypoints.engine_args import add_engine_arguments, byte_size, engine_kwargs

PROG = "minipaged bench kv-quant"

DTYPES = kv_quant.KV_CACHE_DTYPES
PARTS = ("kernel_errors", "perplexity", "greedy", "capacity")
# Scale schemes compared at the kernel and perplexity level: (label, cache dtype, per_token, calibrated).
SCHEMES = (
    ("int8 per token", "int8", True, False),
    ("int8 per layer (calibrated)", "int8", False, True),
    ("fp8 per layer (scale 1)", "fp8_e4m3", False, False),
    ("fp8 per layer (calibrated)", "fp8_e4m3", False, True),
    ("fp8 per token", "fp8_e4m3", True, False),
)
DOC_MODULES = (
    "argparse",
    "collections",
    "functools",
    "itertools",
    "json",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "typing",
    "subprocess",
    "os",
    "shutil",
    "random",
    "statistics",
    "datetime",
    "logging",
    "heapq",
    "bisect",
    "contextlib",
    "dataclasses",
    "enum",
    "fractions",
    "decimal",
    "csv",
    "io",
    "inspect",
)
# The perplexity part scores the engine's two schemes and calibrated fp8 (each scoring is a
# full forward over the text; the kernel part compares all of SCHEMES).
PPL_SCHEMES = tuple(
    s for s in SCHEMES if s[0] in ("int8 per token", "fp8 per layer (scale 1)", "fp8 per layer (calibrated)")
)
PPL_CHUNK = 128
BLOCK_SIZE = 16


def docstring_paragraphs() -> list[str]:
    """First paragraphs of public standard-library docstrings, in a fixed order, deduplicated."""
    seen: dict[str, None] = {}
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            para = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 40 <= len(para) <= 400:
                seen[para] = None
    return list(seen)


def module_docs_text() -> str:
    """The fixed perplexity text: the module docstrings of ``DOC_MODULES``, concatenated."""
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in DOC_MODULES)


# ---------------------------------------------------------------- kernel error


def _histogram(values: torch.Tensor, lo: float = -9.0, hi: float = 0.0, bins: int = 45) -> dict:
    logs = values.abs().clamp_min(10**lo).log10()
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    return {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": counts.tolist()}


def kernel_errors(seed: int = 0) -> dict:
    """Decode kernel on SmolLM2-shaped heads (9 query, 3 KV heads of 64), K with outlier channels."""
    import minipaged_kernels
    from minipaged_kernels import reference

    gen = torch.Generator().manual_seed(seed)
    lens = [37, 64, 100, 150, 211, 256]
    nb_per_seq = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(nb_per_seq)
    shape = (num_blocks, BLOCK_SIZE, 3, 64)
    k = torch.randn(shape, generator=gen)
    k[..., :4] *= 8.0  # a few large channels, as real keys have
    v = torch.randn(shape, generator=gen)
    tables = torch.zeros(len(lens), max(nb_per_seq), dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    start = 0
    for i, nb in enumerate(nb_per_seq):
        tables[i, :nb] = order[start : start + nb]
        start += nb
    context = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 9, 64, generator=gen)
    truth = reference.paged_decode_attention(q.double(), k.double(), v.double(), tables, context)
    fp32 = minipaged_kernels.paged_decode_attention(q, k, v, tables, context)
    rows = {"auto (fp32)": {"vs_truth": _summary(fp32.double() - truth), "hist": _histogram(fp32.double() - truth)}}
    for label, kind, per_token, calibrated in SCHEMES:
        k_layer = torch.tensor([kv_quant.calibrated_scale(float(k.abs().max()), kind)]) if calibrated else torch.ones(1)
        v_layer = torch.tensor([kv_quant.calibrated_scale(float(v.abs().max()), kind)]) if calibrated else torch.ones(1)
        kd, ks = kv_quant.quantize(k, kind, None if per_token else k_layer)
        vd, vs = kv_quant.quantize(v, kind, None if per_token else v_layer)
        out = minipaged_kernels.paged_decode_attention(q, kd, vd, tables, context, k_scale=ks, v_scale=vs)
        own_ref = reference.paged_decode_attention(q.double(), kd, vd, tables, context, k_scale=ks, v_scale=vs)
        err = out.double() - truth
        rows[label] = {
            "vs_truth": _summary(err),
            "vs_dequantized_reference": _summary(out.double() - own_ref),
            "k_rel_rms": _rel_rms(kv_quant.dequantize(kd, ks, torch.float64), k),
            "v_rel_rms": _rel_rms(kv_quant.dequantize(vd, vs, torch.float64), v),
            "hist": _histogram(err),
        }
    return rows


def _summary(err: torch.Tensor) -> dict:
    return {"max_abs": float(err.abs().max()), "rms": float(err.pow(2).mean().sqrt())}


def _rel_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact.double()).pow(2).mean().sqrt() / exact.double().pow(2).mean().sqrt())


# ---------------------------------------------------------------- accuracy on SmolLM2


def greedy_agreement(num_prompts: int, max_tokens: int, engine: dict[str, Any] | None = None) -> dict:
    """Greedy completions per cache dtype, compared position by position with the float cache's
    (``engine``: further ``LLM`` keywords)."""
    from minipaged import LLM, SamplingParams

    prompts = docstring_paragraphs()[:num_prompts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = {}
    for dtype in DTYPES:
        llm = LLM(kv_cache_dtype=dtype, **(engine or {}))
        t0 = time.perf_counter()
        outputs[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        print(f"greedy {dtype}: {time.perf_counter() - t0:.1f}s", flush=True)
    base = outputs["auto"]
    result = {"num_prompts": len(prompts), "max_tokens": max_tokens, "example_prompt": prompts[0]}
    for dtype in DTYPES[1:]:
        same = sum(a == b for x, y in zip(base, outputs[dtype]) for a, b in zip(x, y))
        firsts = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(base, outputs[dtype])
        ]
        result[dtype] = {
            "token_agreement": same / sum(len(x) for x in base),
            "identical_completions": sum(x == y for x, y in zip(base, outputs[dtype])) / len(base),
            "mean_first_divergence": sum(firsts) / len(firsts),
            "first_divergence": firsts,
        }
    return result


def perplexity(num_tokens: int) -> dict:
    """Perplexity of ``module_docs_text()`` per cache dtype and scale scheme (chunked, paged, torch backend)."""
    from minipaged.attention import allocate_kv_cache, build_metadata, build_positions
    from minipaged.models import load_model

    loaded = load_model(None, dtype=torch.float32, attention_backend="torch")
    ids = loaded.tokenizer(module_docs_text())["input_ids"][:num_tokens]
    model, cfg = loaded.model, loaded.model.config
    num_blocks = -(-len(ids) // BLOCK_SIZE)

    def score(caches) -> float:
        nll = 0.0
        for start in range(0, len(ids) - 1, PPL_CHUNK):
            chunk = ids[start : start + PPL_CHUNK]
            end = start + len(chunk)
            positions = build_positions([len(chunk)], [end])
            meta = build_metadata([len(chunk)], [end], [list(range(num_blocks))], BLOCK_SIZE, "cpu", positions)
            hidden = model(torch.tensor(chunk), positions, caches, meta)
            logp = torch.log_softmax(model.compute_logits(hidden), dim=-1)
            targets = torch.tensor(ids[start + 1 : end + 1])
            nll -= float(logp[: len(targets)].gather(1, targets[:, None]).sum())
        return float(torch.exp(torch.tensor(nll / (len(ids) - 1))))

    fp_caches = allocate_kv_cache(cfg, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    result = {
        "num_tokens": len(ids),
        "text": "module docstrings of " + ", ".join(DOC_MODULES),
        "auto": score(fp_caches),
    }
    print(f"perplexity auto: {result['auto']:.3f}", flush=True)
    # Per-layer amax of K and V over the whole text: the calibration the calibrated schemes use.
    amax = [(float(k.abs().max()), float(v.abs().max())) for k, v in fp_caches]
    result["layer_amax"] = amax
    shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    for label, kind, per_token, calibrated in PPL_SCHEMES:
        caches = [
            tuple(kv_quant.allocate(shape, kind, torch.float32, "cpu", per_token) for _ in "kv")
            for _ in range(cfg.num_layers)
        ]
        if calibrated:
            for (kc, vc), (ka, va) in zip(caches, amax):
                kc.scale.fill_(kv_quant.calibrated_scale(ka, kind))
                vc.scale.fill_(kv_quant.calibrated_scale(va, kind))
        result[label] = score(caches)
        print(f"perplexity {label}: {result[label]:.3f}", flush=True)
    return result


# ---------------------------------------------------------------- capacity


def capacity(
    kv_cache_memory: int,
    num_requests: int,
    in_range: tuple[int, int],
    out_range: tuple[int, int],
    engine: dict[str, Any] | None = None,
) -> dict:
    """The same ShareGPT-like mix through the engine at one KV byte budget, per cache dtype
    (``engine``: further ``LLM`` keywords)."""
    from minipaged import LLM, SamplingParams
    from minipaged.benchmarks.throughput import make_workload

    result = {
        "kv_cache_memory": kv_cache_memory,
        "num_requests": num_requests,
        "input_len": list(in_range),
        "output_len": list(out_range),
    }
    for dtype in DTYPES:
        llm = LLM(kv_cache_memory=kv_cache_memory, kv_cache_dtype=dtype, **({"max_num_seqs": 256} | (engine or {})))
        work = make_workload(num_requests, llm.model_config.vocab_size, in_range, out_range, seed=0)
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in work.max_tokens]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        stats = llm.block_manager.stats()
        assert stats.used_blocks == 0, stats
        result[dtype] = {
            "num_blocks": llm.config.num_kv_blocks,
            "tokens": llm.config.num_kv_blocks * llm.config.block_size,
            "max_running": max(r.num_running for r in llm.trace),
            "preemptions": llm.num_preemptions,
            "steps": len(llm.trace),
            "elapsed_s": elapsed,
            "output_tok_per_s": work.output_tokens / elapsed,
        }
        print(f"capacity {dtype}: {result[dtype]}", flush=True)
    return result


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (released when its descriptor closes): processes
    merging parts into a file of that directory take turns, and none writes over another's part."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def merge_part(out: str | os.PathLike, part: str, value: Any, run: dict[str, Any]) -> None:
    """Set ``part``'s entry and its ``runs[part]`` record in the JSON file ``out``, keeping the other
    parts': read, update and atomic write under a lock, so parts may run side by side."""
    out = Path(out)
    with _locked(out.parent):
        result = json.loads(out.read_text()) if out.exists() else {}
        result[part] = value
        result.setdefault("runs", {})[part] = run
        write_json_atomic(out, result)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the engine's apply to the greedy and capacity parts."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=plain_doc(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_out_argument(parser, default="figures/08_kv_quant_eval.json")
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS))
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument(
        "--capacity-kv-cache-memory",
        type=byte_size,
        default=48 << 20,
        metavar="BYTES",
        help="the capacity part's KV cache budget, the same for every cache dtype, e.g. 48M "
        "(default: %(default)s bytes)",
    )
    parser.add_argument("--capacity-requests", type=int, default=32)
    parser.add_argument("--capacity-output-len", type=int, nargs=2, default=(16, 128))
    add_threads_argument(parser)
    # The cache dtypes are what it compares; the capacity part's byte budget is --capacity-kv-cache-memory
    # above, so the engine's --kv-cache-memory would only collide with it.
    add_engine_arguments(parser, exclude=("kv_cache_dtype", "kv_cache_memory"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``--parts`` asked for with ``argv`` (default: ``sys.argv``), one after the other, merging
    each result into ``--out`` as it finishes (``merge_part``). Returns the exit status."""
    args = build_parser().parse_args(argv)
    apply_threads(args)
    engine = engine_kwargs(args)
    command = command_line(PROG, argv)
    runs = {
        "kernel_errors": lambda: kernel_errors(),
        "perplexity": lambda: perplexity(args.ppl_tokens),
        "greedy": lambda: greedy_agreement(args.prompts, args.max_tokens, engine),
        "capacity": lambda: capacity(
            args.capacity_kv_cache_memory, args.capacity_requests, (16, 256), tuple(args.capacity_output_len), engine
        ),
    }
    for part in args.parts:
        t0 = time.perf_counter()
        value = runs[part]()
        elapsed = time.perf_counter() - t0
        run = {
            "command": command,
            "seconds": round(elapsed, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": machine_info(),
        }
        merge_part(args.out, part, value, run)
        print(f"{part}: {elapsed:.0f}s, written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
