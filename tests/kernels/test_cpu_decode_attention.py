"""The numba CPU paged decode kernel against the gather-then-softmax reference (float64),
and the torch backend's dispatch to it.

Inputs come from ``test_decode_attention.make_batch``: fresh random q/K/V in shuffled
blocks, ragged contexts (1, block_size +- 1, hundreds), rows past each context and
blocks no sequence owns poisoned with NaN, unused table entries -1, and ``out``
poisoned too, so reading or skipping the wrong thing shows up.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("numba")

from test_attention_backends import MIXED, per_token_reference, random_paged_step  # noqa: E402
from test_decode_attention import REL_TOL, make_batch, rel_error  # noqa: E402

from minipaged.attention import kv_quant  # noqa: E402
from minipaged.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from minipaged_kernels import reference
from minipaged_kernels.cpu import _jit as _cpu_jit
from minipaged_kernels.cpu import decode_attention as cpu_decode_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

CASES = [  # (block_size, head_dim, num_kv_heads, group, dtype)
    (16, 64, 3, 3, torch.float32),  # SmolLM2's attention shape
    (1, 40, 2, 4, torch.float32),
    (7, 5, 1, 7, torch.float32),  # odd block size and head_dim, one kv head
    (3, 128, 2, 1, torch.bfloat16),  # no GQA
    (16, 64, 3, 3, torch.bfloat16),
    (5, 80, 2, 3, torch.float16),
]


@pytest.mark.parametrize("block_size, head_dim, num_kv_heads, group, dtype", CASES)
def test_matches_reference(block_size, head_dim, num_kv_heads, group, dtype):
    rng = random.Random()
    lens = [1, block_size - 1 or 1, block_size, block_size + 1, rng.randint(100, 400), rng.randint(1, 60)]
    rng.shuffle(lens)
    q, k_cache, v_cache, tables, context_lens = make_batch(
        lens, block_size, num_kv_heads, group, head_dim, dtype, "cpu", seed=rng.randrange(1 << 30)
    )
    out = torch.full_like(q, float("nan"))
    scale = rng.uniform(0.05, 0.5)
    result = cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, out)
    assert result is out
    ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, context_lens, scale)
    assert torch.isfinite(out).all(), "kernel left NaN in out or read a poisoned cache row"
    err = rel_error(out, ref)
    assert err < REL_TOL[dtype], f"relative error {err:.2e} above {REL_TOL[dtype]:.0e} for {dtype}"


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_cache_matches_reference(kind, per_token, dtype):
    """int8 / fp8 rows with per-row or per-layer scales (minipaged.attention.kv_quant's scheme): the kernel
    equals float64 attention over the dequantized cache, as the Triton kernel is tested."""
    rng = random.Random()
    lens = [1, 15, 16, 17, rng.randint(100, 300)]
    q, k_cache, v_cache, tables, context_lens = make_batch(
        lens, 16, 3, 3, 64, torch.float32, "cpu", seed=rng.randrange(1 << 30)
    )
    layer_scale = None if per_token else torch.full((1,), rng.uniform(0.01, 0.05))
    (kd, ks), (vd, vs) = (kv_quant.quantize(c, kind, layer_scale) for c in (k_cache, v_cache))
    q = q.to(dtype)
    out = torch.full_like(q, float("nan"))
    cpu_decode_attention.paged_decode_attention(q, kd, vd, tables, context_lens, 0.125, out, k_scale=ks, v_scale=vs)
    ref = reference.paged_decode_attention(q.double(), kd, vd, tables, context_lens, 0.125, k_scale=ks, v_scale=vs)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < REL_TOL[dtype]


def test_fp8_rows_widen_exactly():
    """The kernel's fp8 table is torch's float8_e4m3fn -> float32 for all 256 bytes."""
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).float()
    torch.testing.assert_close(
        torch.from_numpy(cpu_decode_attention._FP8_E4M3_TABLE), expected, rtol=0, atol=0, equal_nan=True
    )


def test_fp16_rows_widen_exactly():
    """Every fp16 bit pattern widens to the fp32 torch gives (the kernel reads fp16 by its bits)."""
    import numpy as np

    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    bits = np.array(
        [cpu_decode_attention._fp16_bits_to_fp32_bits(np.uint32(np.uint16(h))) for h in halves.numpy()], dtype=np.uint32
    )
    expected = halves.view(torch.float16).float()
    torch.testing.assert_close(torch.from_numpy(bits.view(np.float32)), expected, rtol=0, atol=0, equal_nan=True)


def test_exp_within_a_few_ulp_of_exp():
    """The kernels' vectorised exp against float64 exp over everything fed to it: softmax scores
    at or below their max (down to -inf for an empty row) and SiLU's exp(-x) up to 88: ~1 ulp
    measured, 2.5 allowed; also the sum it returns for a softmax row and the clamped tails."""
    import numpy as np

    rng = np.random.default_rng()
    n = 4096
    x = np.concatenate([rng.uniform(-80, 88, n - 8), [0.0, -1e-30, 1e-30, -0.34657, -0.34658, -80.0, -79.99, 88.0]])
    m = np.float32(rng.uniform(-20, 20))
    x = (x + m).astype(np.float32)
    shifted = (x - m).astype(np.float64)  # the fp32 difference the kernel forms, then exact exp
    got = x.copy()
    _cpu_jit.exp_shifted(got, n, m, np.empty(n, np.uint32))
    expected = np.exp(shifted)
    ulp = np.spacing(expected.astype(np.float32)).astype(np.float64)
    worst = (np.abs(got - expected) / ulp).max()
    assert worst <= 2.5, f"exp off by {worst:.2f} ulp"
    scores = (rng.uniform(-30, 0, 256) + m).astype(np.float32)  # a softmax row: its sum stays in fp32's range
    total = _cpu_jit.exp_shifted(scores, 256, m, np.empty(256, np.uint32))
    assert abs(total - scores.astype(np.float64).sum()) <= 1e-6 * total
    far = np.array([-1e4, -np.inf, -85.0, 1e4, np.inf], np.float32)  # clamped to [exp(-80), exp(88)], never NaN
    tail = far.copy()
    _cpu_jit.exp_shifted(tail, 5, np.float32(0), np.empty(5, np.uint32))
    assert np.isfinite(tail).all() and (tail[:3] < 1e-34).all() and (tail[:3] >= 0).all()
    assert np.allclose(tail[3:], np.exp(88.0), rtol=1e-6)


def test_serial_and_parallel_launchers_agree():
    """The one-thread launcher (a lone sequence) and the prange one run the same program: equal bits."""
    import numpy as np

    q, k_cache, v_cache, tables, lens = make_batch(
        [1, 17, 250, 64], 16, 3, 3, 64, torch.float32, "cpu", seed=random.randrange(1 << 30)
    )
    outs = []
    for launch in (cpu_decode_attention._decode_serial, cpu_decode_attention._decode_parallel):
        out = torch.full_like(q, float("nan"))
        launch(
            q.numpy(),
            k_cache.numpy(),
            v_cache.numpy(),
            None,
            None,
            tables.to(torch.int32).numpy(),
            lens.to(torch.int32).numpy(),
            np.float32(0.125),
            out.numpy(),
        )
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_strided_q_and_int64_tables_and_empty_batch():
    q, k_cache, v_cache, tables, lens = make_batch([9, 33], 8, 2, 3, 16, torch.float32, "cpu", seed=3)
    wide = torch.randn(2, 12, 16)
    wide[:, :6] = q  # q as a strided view, as the model hands it over
    out = cpu_decode_attention.paged_decode_attention(wide[:, :6], k_cache, v_cache, tables.long(), lens.long())
    ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens)
    assert rel_error(out, ref) < REL_TOL[torch.float32]
    empty = cpu_decode_attention.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0])
    assert empty.shape == (0, 6, 16)


def test_rejects_bad_arguments():
    q, k_cache, v_cache, tables, lens = make_batch([4, 9], 4, 2, 2, 16, torch.float32, "cpu", seed=5)
    with pytest.raises(ValueError, match="context_lens"):
        cpu_decode_attention.paged_decode_attention(
            q, k_cache, v_cache, tables, torch.tensor([4, 0], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="dtype"):
        cpu_decode_attention.paged_decode_attention(q.double(), k_cache, v_cache, tables, lens)
    with pytest.raises(ValueError, match="out"):
        cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, out=torch.empty(3, 4, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", MIXED + [([1, 4, 1, 1, 2, 1], [30, 4, 1, 17, 9, 64])])
def test_torch_backend_fused_path_matches_gather_path(dtype, lens):
    """Mixed steps (decode rows not contiguous): fused and gather paths agree, and both match float64."""
    fused, gather = TorchAttentionBackend(decode_kernel="fused"), TorchAttentionBackend(decode_kernel="gather")
    q, k, v, k_cache, v_cache, meta = random_paged_step(*lens, 4, 2, 3, 32, dtype, seed=random.randrange(1 << 30))
    assert fused.prepare(meta, k_cache).backend_plan.fused_decode is not None
    assert gather.prepare(meta, k_cache).backend_plan.fused_decode is None
    k_gather, v_gather = k_cache.clone(), v_cache.clone()
    out = fused.forward(q, k, v, k_cache, v_cache, meta, 0.2)
    expected = gather.forward(q, k, v, k_gather, v_gather, meta, 0.2)
    assert torch.equal(k_cache, k_gather) and torch.equal(v_cache, v_gather)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(out.double(), per_token_reference(q, k_cache, v_cache, meta, 0.2), **tol)


def test_backend_dispatch_keeps_other_caches_on_the_gather_path():
    backend = TorchAttentionBackend()
    assert backend.uses_fused_decode(torch.empty(1, 4, 1, 8))
    assert not backend.uses_fused_decode(torch.empty(1, 4, 1, 8, dtype=torch.float64))
    assert not backend.uses_fused_decode(torch.empty(1, 4, 1, 8, dtype=torch.uint8))  # bytes without scales
    assert not TorchAttentionBackend(decode_kernel="gather").uses_fused_decode(torch.empty(1, 4, 1, 8))
    with pytest.raises(ValueError, match="decode_kernel"):
        TorchAttentionBackend(decode_kernel="flash")


_POOL_CHILD = r"""
import json, os, sys
import torch
from minipaged_kernels import reference
from minipaged_kernels.cpu import _jit as _cpu_jit
from minipaged_kernels.cpu import decode_attention as cpu_decode_attention
from test_decode_attention import make_batch

threads = lambda: len(os.listdir("/proc/self/task"))
seed = int(sys.argv[1])
q, k_cache, v_cache, tables, lens = make_batch([5, 40, 17, 200], 16, 3, 3, 64, torch.float32, "cpu", seed=seed)
ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, 0.125)
err = lambda out: float((out.double() - ref).abs().max())
report = {"layer": _cpu_jit.numba.config.THREADING_LAYER}
torch.set_num_threads(2)
torch.randn(512, 512) @ torch.randn(512, 512)  # torch's OpenMP team of 2 now exists
report["threads_before"] = threads()
torch.set_num_threads(1)  # numba's pool starts here
report["err_one_thread"] = err(cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125))
report["torch_threads_after_pool_start"] = torch.get_num_threads()
torch.set_num_threads(2)
report["err_parallel"] = err(cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125))
report["threads_after"] = threads()
child = os.fork()
if child == 0:  # GNU OpenMP is not fork-safe: the child must take the serial launcher
    ok = err(cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)) < 1e-4
    os._exit(0 if ok else 1)
report["child_status"] = os.waitpid(child, 0)[1]
print(json.dumps(report))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not hasattr(os, "fork"), reason="needs Linux")
def test_parallel_launch_runs_on_torchs_openmp_pool():
    """Where torch's threads are OpenMP (its Linux wheels), the kernel's prange launch runs on
    torch's own pool: no thread appears, torch's thread count is left as set, and a process
    forked afterwards still gets right answers (serially: numba's OpenMP layer would kill it)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    # The child imports make_batch from test_decode_attention, which imports tests/pairwise.py;
    # the caller's own PYTHONPATH entries stay behind them.
    here = Path(__file__)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parent), str(here.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _POOL_CHILD, str(random.randrange(1 << 30))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["err_one_thread"] < 1e-4 and report["err_parallel"] < 1e-4, report
    assert report["torch_threads_after_pool_start"] == 1, report
    assert report["child_status"] == 0, report
    if _cpu_jit._torch_uses_openmp() and _cpu_jit._omp_layer_importable():
        assert report["layer"] == "omp", report
        assert report["threads_after"] == report["threads_before"], report
