"""``python -m minipaged generate``: output on a tiny saved model, and one-line errors with exit 2.

The CLI runs in-process through ``main(argv)`` (capsys holds its output); one subprocess test
checks the real exit status and that no traceback reaches the terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.entrypoints.cli import BENCHMARKS, main

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
PREFIX = "minipaged: error: "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=2,
    )
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        path
    )
    return str(path)


def cli(model_dir: str, *argv: str) -> list[str]:
    """argv for ``generate`` on the tiny model; options in ``argv`` come last, so they win."""
    return ["generate", "--model", model_dir, "--num-kv-blocks", "32", "--block-size", "4", "--no-progress", *argv]


def expected_text(model_dir: str, prompts: list[str], params: SamplingParams) -> list[list[str]]:
    llm = LLM(model_dir, num_kv_blocks=32, block_size=4)
    return [[c.text.strip() for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


def test_generate_prints_the_engine_output(model_dir, capsys):
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, repetition_penalty=1.3)
    want = expected_text(model_dir, ["w3 w4 w5", "w9"], params)
    assert (
        main(cli(model_dir, "w3 w4 w5", "w9", "--max-tokens", "6", "--min-tokens", "6", "--repetition-penalty", "1.3"))
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out == ["### w3 w4 w5", want[0][0], "### w9", want[1][0]]
    assert want[0][0] and want[1][0]  # the comparison is about real text


def test_sampling_flags_reach_the_params(model_dir, capsys):
    params = SamplingParams(
        n=2,
        temperature=0.9,
        top_k=20,
        top_p=0.95,
        min_p=0.01,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        seed=7,
        max_tokens=5,
        ignore_eos=True,
        stop=("w60",),
    )
    want = expected_text(model_dir, ["w7 w8"], params)[0]
    assert (
        main(
            cli(
                model_dir,
                "w7 w8",
                "--n",
                "2",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--top-p",
                "0.95",
                "--min-p",
                "0.01",
                "--presence-penalty",
                "0.5",
                "--frequency-penalty",
                "0.25",
                "--seed",
                "7",
                "--max-tokens",
                "5",
                "--ignore-eos",
                "--stop",
                "w60",
            )
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [f"[{i}] {text}" for i, text in enumerate(want)]


def test_engine_flags_reach_the_engine(model_dir, capsys):
    """--kv-cache-dtype and --tensor-parallel-size build the engine LLM(...) would (int8 rounding
    changes tokens on this tiny model, so the comparison is with an int8 engine)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, num_kv_blocks=32, block_size=4, kv_cache_dtype="int8") as llm:
        want = llm.generate(["w3 w4 w5"], params, use_tqdm=False)[0].outputs[0].text.strip()
    for extra in ([], ["--tensor-parallel-size", "2"]):
        assert (
            main(cli(model_dir, "w3 w4 w5", "--max-tokens", "8", "--ignore-eos", "--kv-cache-dtype", "int8", *extra))
            == 0
        )
        assert capsys.readouterr().out.splitlines() == [want], extra


def test_stream_prints_the_same_text(model_dir, capsys):
    assert main(cli(model_dir, "w11 w12", "--max-tokens", "5")) == 0
    whole = capsys.readouterr().out
    assert main(cli(model_dir, "w11 w12", "--max-tokens", "5", "--stream")) == 0
    assert capsys.readouterr().out.strip() == whole.strip()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-tokens", "0"], "argument --max-tokens: must be an integer >= 1"),
        (["--temperature", "-1"], "argument --temperature:"),
        (["--top-k", "-1"], "argument --top-k:"),
        (["--top-p", "1.5"], "argument --top-p:"),
        (["--n", "0"], "argument --n:"),
        (["--min-tokens", "9", "--max-tokens", "4"], "argument --min-tokens:"),
        (["--presence-penalty", "3"], "argument --presence-penalty:"),
        (["--repetition-penalty", "0"], "argument --repetition-penalty:"),
        (["--logprobs", "21"], "argument --logprobs:"),
        (["--stop", ""], "argument --stop:"),
        (["--seed", "-1"], "argument --seed:"),
        (["--dtype", "int8"], "argument --dtype: unknown dtype"),
        (["--block-size", "0"], "argument --block-size:"),
        (["--max-num-seqs", "0"], "argument --max-num-seqs:"),
        (["--kv-cache-memory", "12Q"], "argument --kv-cache-memory: invalid size"),
        (["--num-kv-blocks", str(10**12)], "argument --num-kv-blocks: a KV cache of"),
        (["--max-model-len", "1000"], "argument --max-model-len:"),
        (["--max-tokens", "abc"], "argument --max-tokens: invalid int value"),
        (["--kv-cache-dtype", "int4"], "argument --kv-cache-dtype: invalid choice"),
        (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size:"),
        (["--tensor-parallel-size", "3"], "argument --tensor-parallel-size:"),
        (["--stream", "--n", "2"], "--stream"),
        (["w5", "--stream"], "--stream"),
    ],
)
def test_invalid_values_print_one_line_and_exit_2(model_dir, capsys, argv, needle):
    argv = cli(model_dir, "w3 w4", *argv)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors exit from parse_args
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    # A warning line may come first (more tensor-parallel ranks than this machine's cores).
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("minipaged: warning:")]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and needle in lines[0], captured.err


def test_bad_prompts_and_models(model_dir, tmp_path, capsys):
    assert main(cli(model_dir, "")) == 2
    assert capsys.readouterr().err.startswith(PREFIX + "argument prompts:")
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(PREFIX + "argument --model: model")
    # A directory without tokenizer files loads (one warning line), then a text prompt is an error.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(model_dir).iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (bare / f.name).write_bytes(f.read_bytes())
    assert main(cli(str(bare), "w3")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "warning: " in err[0] and "no tokenizer files" in err[0]
    assert err[1].startswith(PREFIX + "argument prompts: text prompts need a tokenizer")


def test_logprobs_flag_prints_a_line_per_token(model_dir, capsys):
    assert main(cli(model_dir, "w3 w4", "--max-tokens", "3", "--min-tokens", "3", "--logprobs", "2")) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.startswith("  '") and "(rank " in line for line in out[1:]), out


def test_logprobs_lines(capsys):
    from minipaged.entrypoints.cli import _print_logprobs
    from minipaged.outputs import CompletionOutput, Logprob

    completion = CompletionOutput(
        0,
        "",
        [5, 9],
        "length",
        logprobs=[
            {5: Logprob(-0.1, 1), 7: Logprob(-2.5, 2)},
            {9: Logprob(-3.0, 4), 1: Logprob(-0.5, 1), 2: Logprob(-1.0, 2)},
        ],
    )
    _print_logprobs(completion, tokenizer=None)
    assert capsys.readouterr().out.splitlines() == [
        "  5 -0.100 (rank 1) | 7 -2.500",
        "  9 -3.000 (rank 4) | 1 -0.500, 2 -1.000",
    ]
    _print_logprobs(CompletionOutput(0, "", [5], "length"), tokenizer=None)
    assert "returned no logprobs" in capsys.readouterr().err


def test_real_process_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "minipaged", "generate", "hello", "--max-tokens", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == PREFIX + "argument --max-tokens: must be an integer >= 1, got 0\n"


def test_unset_sampling_flags_keep_sampling_params_defaults():
    """generate sets only what it must (greedy, room for an answer); the rest is SamplingParams' own."""
    from minipaged.entrypoints.cli import _parser, _sampling_kwargs

    kwargs = _sampling_kwargs(_parser().parse_args(["generate", "hi"]))
    assert kwargs == {"temperature": 0.0, "max_tokens": 128}
    assert SamplingParams(**kwargs) == SamplingParams(temperature=0.0, max_tokens=128)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--block-size", "0"], "argument --block-size:"),
        (["--max-model-len", "1000"], "argument --max-model-len:"),
    ],
)
def test_bench_engine_errors_print_one_line_and_exit_2(model_dir, capsys, argv, needle):
    """A benchmark's engine rejects a value the way generate does: one line, exit 2, no traceback."""
    status = main(["bench", "latency", "--model", model_dir, "--batch-size", "1", "--input-len", "2", *argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.startswith(PREFIX)]
    assert status == 2 and len(lines) == 1 and needle in lines[0], captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("argv", [[], ["serve"], ["generate"], ["bench"], *(["bench", b] for b in BENCHMARKS)])
def test_help_is_plain_text_with_defaults(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out and "``" not in out
    if argv == ["serve"]:
        for default in ("(default: 8000)", "--shutdown-timeout", "--max-request-bytes", "--max-n"):
            assert default in out, out
