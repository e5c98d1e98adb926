"""``minipaged bench NAME``: every benchmark is listed and answers --help, ``bench latency`` runs and
writes its JSON, and the shared helper writes result files atomically."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from minipaged.benchmarks import common
from minipaged.entrypoints.cli import BENCHMARKS, main

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("throughput", "latency", "serve", "tp", "pp", "blocks", "step", "kv-quant", "structured", "quant-accuracy")


def test_bench_help_lists_every_benchmark(capsys):
    assert tuple(BENCHMARKS) == NAMES
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long descriptions
    for name, (_, description) in BENCHMARKS.items():
        assert f"{name} {' '.join(description.split())}" in out


@pytest.mark.parametrize("name", NAMES)
def test_each_benchmark_answers_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minipaged bench {name}")


@pytest.mark.parametrize("name", ("throughput", "latency", "serve", "tp", "pp", "kv-quant"))
def test_benchmarks_that_build_an_engine_take_the_engine_options(name, capsys):
    with pytest.raises(SystemExit):
        main(["bench", name, "--help"])
    out = capsys.readouterr().out
    # Options each benchmark owns or sweeps are its own; these come from EngineConfig in every one.
    for flag in ("--block-size", "--max-num-seqs", "--max-num-batched-tokens", "--no-prefix-caching"):
        assert flag in out, (name, flag)


def test_unknown_benchmark_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "nope"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_latency_runs_and_writes_its_json(tmp_path, capsys):
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", max_model_len=64)
    out = tmp_path / "results" / "latency.json"
    argv = ["--batch-size", "2", "--input-len", "8", "--output-len", "4", "--num-iters", "2"]
    argv += ["--num-iters-warmup", "1", "--model", str(model), "--block-size", "4", "--num-kv-blocks", "32"]
    assert main(["bench", "latency", *argv, "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latency mean" in printed and "per output token" in printed
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] == 2 * 8 and result["output_tokens"] == 2 * 4
    assert (result["batch_size"], result["input_len"], result["output_len"], result["num_iters"]) == (2, 8, 4, 2)
    latencies = result["latencies_s"]
    assert len(latencies) == 2 and all(x > 0 for x in latencies)
    assert result["mean_s"] == pytest.approx(sum(latencies) / 2)
    assert min(latencies) <= result["median_s"] <= result["p90_s"] <= result["p99_s"] <= max(latencies)
    assert result["per_output_token_ms"] == pytest.approx(result["mean_s"] / 4 * 1000)
    assert result["output_tokens_per_s"] == pytest.approx(8 / result["mean_s"])
    assert result["engine"]["model"] == str(model) and result["engine"]["num_kv_blocks"] == 32
    assert result["engine"]["block_size"] == 4
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"]
    assert result["command"].startswith("minipaged bench latency --batch-size 2")


def test_latency_statistics_by_hand():
    from minipaged.benchmarks.latency import summarize

    values = [0.4, 0.1, 0.3, 0.2, 1.0]
    stats = summarize(values, batch_size=4, input_len=16, output_len=10)
    ordered = sorted(values)

    def percentile(q: float) -> float:  # linear interpolation between closest ranks
        rank = q / 100 * (len(ordered) - 1)
        low = int(rank)
        return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)

    assert stats["mean_s"] == pytest.approx(0.4)
    assert stats["median_s"] == pytest.approx(0.3)
    assert stats["p90_s"] == pytest.approx(percentile(90)) and stats["p99_s"] == pytest.approx(percentile(99))
    assert stats["p90_s"] == pytest.approx(float(np.percentile(values, 90)))
    assert stats["per_output_token_ms"] == pytest.approx(40.0)
    assert stats["output_tokens_per_s"] == pytest.approx(100.0)


def test_dummy_prompts_have_the_asked_shape_and_vocabulary():
    from minipaged.benchmarks.latency import dummy_prompts

    prompts = dummy_prompts(3, 5, vocab_size=11)
    assert len(prompts) == 3 and all(len(p) == 5 and all(0 <= t < 11 for t in p) for p in prompts)
    assert prompts == dummy_prompts(3, 5, vocab_size=11)


def test_write_json_atomic_never_shows_a_half_written_file(tmp_path):
    path = tmp_path / "out" / "result.json"
    payloads = [{"round": i, "values": list(range(i, i + 100_000))} for i in range(8)]
    seen, errors = [], []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                seen.append(json.loads(text)["round"])
            except json.JSONDecodeError as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for payload in payloads:
            common.write_json_atomic(path, payload)
    finally:
        done.set()
        thread.join()
    assert not errors, f"a reader saw a partial file: {errors[0]}"
    assert json.loads(path.read_text()) == payloads[-1]
    assert seen == sorted(seen)
    # A write that fails part-way (not JSON-serialisable) leaves the previous file and no stray temp file.
    with pytest.raises(TypeError):
        common.write_json_atomic(path, {"round": 99, "bad": object()})
    assert json.loads(path.read_text()) == payloads[-1]
    assert os.listdir(path.parent) == ["result.json"]


def test_machine_info_names_the_cpu_flags_kernels_care_about():
    import torch

    info = common.machine_info()
    assert info["torch"] == torch.__version__ and info["cores"] == os.cpu_count()
    assert info["threads"] == torch.get_num_threads()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()[2:])
        wanted = {f for f in flags if re.fullmatch(r"avx2|avx512\w*|avx_vnni\w*|amx\w*|fma|f16c", f)}
        assert set(info["cpu_flags"]) == wanted
    line = common.describe_machine(info)
    assert f"torch={torch.__version__}" in line and f"cores={os.cpu_count()}" in line


def test_threads_flag_sets_torch_threads():
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    common.add_threads_argument(parser)
    before = torch.get_num_threads()
    try:
        assert common.apply_threads(parser.parse_args(["--threads", "1"])) == 1 == torch.get_num_threads()
        assert common.apply_threads(parser.parse_args([])) == 1  # unset: leaves torch's count alone
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])


def test_child_processes_find_this_checkout_without_the_install():
    """The throughput benchmark's children (and vLLM's venv, where minipaged is not installed) import
    minipaged and minipaged_kernels from where this process does: the repository root and kernels/."""
    env = common.child_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(ROOT), str(ROOT / "kernels")]
    code = "import importlib.util as u\nfor name in ('minipaged', 'minipaged_kernels'): print(u.find_spec(name).origin)"
    # -S: no site-packages, so no editable install either; only PYTHONPATH can find them.
    proc = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    origins = proc.stdout.split()
    assert origins == [
        str(ROOT / "minipaged" / "__init__.py"),
        str(ROOT / "kernels" / "minipaged_kernels" / "__init__.py"),
    ]


@pytest.mark.parametrize("install_dir", ("site-packages", "dist-packages"))
def test_child_processes_get_no_installed_environment_on_their_path(install_dir, tmp_path, monkeypatch):
    """With a regular install, minipaged's directory is the environment's site-packages: on vLLM's
    PYTHONPATH it would put this environment's torch before vLLM's own, so it is left out."""
    import importlib.util
    from types import SimpleNamespace

    installed = tmp_path / "lib" / "python3" / install_dir
    checkout = tmp_path / "checkout"
    origins = {
        "minipaged": installed / "minipaged" / "__init__.py",
        "minipaged_kernels": checkout / "kernels" / "minipaged_kernels" / "__init__.py",
    }
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(origins[name])))
    assert common.source_roots() == [str((checkout / "kernels").resolve())]
    env = common.child_env({"PYTHONPATH": "/theirs"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str((checkout / "kernels").resolve()), "/theirs"]
    origins["minipaged_kernels"] = installed / "minipaged_kernels" / "__init__.py"
    assert common.source_roots() == []
    assert common.child_env({"PYTHONPATH": "/theirs"})["PYTHONPATH"] == "/theirs"


def _commands() -> list[list[str]]:
    """``python -m minipaged`` and, when installed beside this Python, the ``minipaged`` console script."""
    commands = [[sys.executable, "-m", "minipaged"]]
    script = Path(sys.executable).parent / "minipaged"
    if script.exists():
        commands.append([str(script)])
    return commands


@pytest.mark.parametrize("command", _commands(), ids=lambda c: Path(c[-1]).name)
def test_real_process_help_exits_0(command):
    for extra, needle in (([], "bench"), (["bench"], "throughput"), (["serve"], "--port")):
        proc = subprocess.run([*command, *extra, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and needle in proc.stdout, (extra, proc.stderr[-2000:])


def test_top_level_help_imports_no_benchmark():
    code = (
        "import sys\nfrom minipaged.entrypoints.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('minipaged.benchmarks.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_bench_serve_passes_the_engine_options_to_the_launched_server():
    from minipaged.benchmarks import serve as bs

    args = bs.build_parser().parse_args(
        ["--block-size", "8", "--no-prefix-caching", "--seed", "3", "--max-num-seqs", "4"]
    )
    (target,) = bs.make_targets(args)
    command = " ".join(target.command)
    assert "--block-size 8 --max-num-seqs 4 --no-enable-prefix-caching" in command  # EngineConfig's field order
    assert "--seed" not in command  # the benchmark's --seed draws its workload; the server keeps its own


def test_bench_tp_sizes_the_cache_by_blocks_only_when_no_size_is_given():
    from minipaged.benchmarks import tp

    def options(*argv):
        return tp.engine_options(tp.build_parser().parse_args(list(argv)))

    assert options()["num_kv_blocks"] == 2048
    assert options("--num-kv-blocks", "64")["num_kv_blocks"] == 64
    by_bytes = options("--kv-cache-memory", "48M")
    assert by_bytes["kv_cache_memory"] == 48 << 20 and "num_kv_blocks" not in by_bytes


def test_bench_tp_builds_its_model_in_the_engine_dtype():
    import torch

    from minipaged import LLM
    from minipaged.benchmarks.tp import smollm2_like

    model = smollm2_like(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos.dtype == torch.bfloat16
    with LLM(model, dtype="bfloat16", num_kv_blocks=4, max_model_len=64) as llm:
        assert llm.config.torch_dtype == torch.bfloat16


def test_kv_quant_capacity_budget_takes_a_size_with_a_unit():
    from minipaged.benchmarks import kv_quant

    parser = kv_quant.build_parser()
    assert parser.parse_args(["--capacity-kv-cache-memory", "48M"]).capacity_kv_cache_memory == 48 << 20
    assert parser.parse_args([]).capacity_kv_cache_memory == 48 << 20
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-memory", "48M"])  # the engine's name, with another meaning: not taken


def test_kv_quant_parts_merged_side_by_side_keep_every_part(tmp_path):
    from minipaged.benchmarks.kv_quant import merge_part

    out = tmp_path / "figures" / "eval.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"kept": 1}))
    parts = [f"part{i}" for i in range(16)]
    threads = [
        threading.Thread(target=merge_part, args=(out, part, {"value": i}, {"command": part}))
        for i, part in enumerate(parts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = json.loads(out.read_text())
    assert result["kept"] == 1
    assert {p: result[p]["value"] for p in parts} == {p: i for i, p in enumerate(parts)}
    assert sorted(result["runs"]) == sorted(parts)
