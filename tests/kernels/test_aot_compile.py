"""Every kernel configuration the wrappers can pick compiles for sm_80 and sm_90 within
shared memory.

Compilation runs ``python -m minipaged_kernels.report --json`` in a child process: this process
defined the kernels under the interpreter, which ``triton.compile`` cannot take. The
child gets an empty Triton cache so every configuration is really compiled.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from minipaged_kernels import _aot, decode_attention, report

# The package re-exports the kv_append function under the module's name.
kv_append_module = importlib.import_module("minipaged_kernels.kv_append")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("aot")
    env = _aot.compile_mode_env()
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "minipaged_kernels.report", "--ci", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_spec_compiles_for_every_target(rows):
    expected = {(spec.kernel, spec.config, target) for _, spec in report.discover(ci=True) for target in _aot.TARGETS}
    compiled = {(r["kernel"], r["config"], r["target"]) for r in rows if r["error"] is None}
    failed = [(r["kernel"], r["config"], r["target"], r["error"]) for r in rows if r["error"] is not None]
    assert not failed, failed
    assert compiled == expected
    kernel_names = {r["kernel"] for r in rows}
    assert {"kv_append", "paged_decode_attention"} <= kernel_names


def test_shared_memory_within_target_limit(rows):
    over = [
        (r["kernel"], r["config"], r["target"], r["shared_bytes"])
        for r in rows
        if r["error"] is None and r["shared_bytes"] > _aot.SHARED_MEMORY_LIMIT[r["target"]]
    ]
    assert not over, over


def test_decode_specs_cover_every_wrapper_choice():
    """Each head_dim the wrapper accepts maps to a tile that has single, split and merge specs."""
    configs = {spec.config for spec in decode_attention.aot_specs()}
    for dtype in ("fp32", "fp16", "bf16"):
        for head_dim in range(1, decode_attention.MAX_HEAD_DIM + 1):
            tile = decode_attention.head_dim_tile(head_dim)
            for stage in ("single", "split", "merge"):
                assert f"{dtype} D{tile} {stage}" in configs
    assert {triton.next_power_of_2(d) for d in (64, 80, 96, 128, 256)} <= set(decode_attention.HEAD_DIM_TILES)


def test_kv_append_specs_cover_every_wrapper_choice():
    configs = {spec.config for spec in kv_append_module.aot_specs()}
    copies = {f"{dtypes} slots={index}" for dtypes in ("fp32", "fp16/bf16") for index in ("i32", "i64")}
    quantizing = {
        f"{dtype}->{cache} {scale}"
        for dtype in ("fp32", "fp16", "bf16")
        for cache in ("int8", "fp8e4m3")
        for scale in ("token", "layer")
    }
    assert configs == copies | quantizing


def test_quantized_cache_specs_cover_every_wrapper_choice():
    """Decode (single and split) and prefill have an int8 and an fp8 build of every float configuration."""
    from minipaged_kernels import prefill_attention

    for module in (decode_attention, prefill_attention):
        configs = {spec.config for spec in module.aot_specs()}
        plain = {c for c in configs if " kv=" not in c and not c.endswith("merge")}
        for cache in ("int8", "fp8e4m3"):
            assert {f"{c} kv={cache}" for c in plain} <= configs


def test_quantized_specs_compile_for_sm80_and_sm90(rows):
    """fp8 decodes with bit operations, so its builds exist (and fit) on sm_80 too; the suite
    compiles the ``in_ci_subset`` of them (``python -m minipaged_kernels.report`` compiles all)."""
    quantized = {
        (r["kernel"], r["config"].split(" kv=")[-1], r["target"])
        for r in rows
        if ("kv=" in r["config"] or "->" in r["config"]) and r["error"] is None
    }
    for kernel in ("paged_decode_attention", "paged_prefill_attention"):
        for cache in ("int8", "fp8e4m3"):
            assert {(kernel, cache, 80), (kernel, cache, 90)} <= quantized
    assert {(k, t) for k, _, t in quantized if k == "kv_append"} == {("kv_append", 80), ("kv_append", 90)}


def test_quant_linear_specs_cover_every_wrapper_choice(rows):
    """GEMM, GEMV and the split-K reduction for each activation dtype and bit width, fp16 and bf16
    compiled for sm_80 and sm_90 (g_idx and bias are runtime switches inside one build)."""
    from minipaged_kernels import quant_linear

    configs = {(spec.kernel, spec.config) for spec in quant_linear.aot_specs()}
    for ty in ("fp32", "fp16", "bf16"):
        assert ("quant_gemv", f"{ty} reduce") in configs
        for bits in (4, 8):
            assert {("quant_gemm", f"{ty} w{bits}"), ("quant_gemv", f"{ty} w{bits}")} <= configs
    built = {(r["kernel"], r["config"], r["target"]) for r in rows if r["error"] is None}
    for kernel in ("quant_gemm", "quant_gemv"):
        for ty in ("fp16", "bf16"):
            for target in _aot.TARGETS:
                assert (kernel, f"{ty} w4", target) in built and (kernel, f"{ty} w8", target) in built


def test_ci_subset_keeps_every_float_spec():
    every, ci = report.discover(), report.discover(ci=True)
    assert {s.config for _, s in every if " kv=" not in s.config} == {s.config for _, s in ci if " kv=" not in s.config}
    assert len(ci) < len(every)
