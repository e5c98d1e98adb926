"""Command line: ``python -m minipaged generate "prompt"`` (add ``--chat`` to use the chat template).

Defaults to the embedded SmolLM2-135M-Instruct and greedy decoding.
"""
from __future__ import annotations

import argparse
import sys

from minipaged.server.cli import add_serve_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minipaged", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--attention-backend", choices=("torch", "triton"), default=None)
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return args.func(args)
    from minipaged import LLM, SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    llm = LLM(args.model, dtype=args.dtype, attention_backend=args.attention_backend)
    prompts: list = args.prompts
    if args.chat:
        prompts = llm.chat_prompts([[{"role": "user", "content": p}] for p in args.prompts])
    if args.stream and len(prompts) == 1 and args.n == 1:
        for chunk in llm.stream(prompts[0], params):
            print(chunk.text, end="", flush=True)
        print()
        return 0
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    for prompt_text, out in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"### {prompt_text}")
        for completion in out.outputs:
            prefix = f"[{completion.index}] " if len(out.outputs) > 1 else ""
            print(prefix + completion.text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
