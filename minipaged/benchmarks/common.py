"""What every benchmark needs besides its measurement: the thread count, warm-up, a description of
the machine, and result files written atomically.

    add_threads_argument(parser); add_out_argument(parser)   # --threads N, --out PATH
    threads = apply_threads(args)                             # torch.set_num_threads, returns the count
    warm_up(lambda: run_once(), iterations)
    write_json_atomic(args.out, {"machine": machine_info(), **results})

A number is only comparable with one measured on the same CPU, kernel flags and torch build, so
every JSON result carries ``machine_info()``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# CPU flags that decide which kernels run fast: AVX2 / AVX-512 (oneDNN, numba), AVX-512 bf16/VNNI
# and AMX (oneDNN's bf16 and int8 GEMMs), F16C / FMA.
_KERNEL_FLAGS = re.compile(r"^(avx2|avx512\w*|avx_vnni\w*|amx\w*|fma|f16c)$")


def add_threads_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--threads N``: torch's intra-op threads (default: torch's own choice)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=help or "torch threads (torch.set_num_threads); default: torch's own choice",
    )


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's thread count from ``--threads`` when given; returns the count now in use."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def add_out_argument(parser: argparse.ArgumentParser, default: str | None = None, help: str | None = None) -> None:
    """``--out PATH``: where the benchmark writes its JSON result (written atomically)."""
    parser.add_argument(
        "--out",
        default=default,
        metavar="PATH",
        help=help or "write the results here as JSON" + (" (default: %(default)s)" if default else ""),
    )


def warm_up(fn: Callable[[], Any], iterations: int) -> None:
    """Call ``fn`` ``iterations`` times, untimed: first calls pay for compilation, allocation and caches."""
    for _ in range(iterations):
        fn()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cpuinfo() -> tuple[str | None, list[str]]:
    """``(model name, flags)`` from /proc/cpuinfo (the flags lscpu prints), or ``(None, [])`` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
    return model, flags


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, its kernel-relevant flags, cores, threads,
    torch and Python versions, and the CUDA device when there is one."""
    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": sorted(f for f in flags if _KERNEL_FLAGS.match(f)),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line for a benchmark's output: ``cpu=... flags=avx2,avx512f cores=16 threads=8 torch=2.x``."""
    info = info or machine_info()
    line = (
        f"cpu={info['cpu']} flags={','.join(info['cpu_flags']) or '-'} cores={info['cores']} "
        f"threads={info['threads']} torch={info['torch']}"
    )
    return line + (f" cuda={info['cuda_device']}" if "cuda_device" in info else "")


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command that re-runs this benchmark: ``prog`` and its arguments (``sys.argv`` when ``None``)."""
    return " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


# Where installers put packages; a directory of these names holds a whole environment, not a checkout.
_INSTALL_DIRS = ("site-packages", "dist-packages")


def source_roots() -> list[str]:
    """The checkout directories this process imports ``minipaged`` and ``minipaged_kernels`` from (the
    repository root and its ``kernels/`` folder, in a checkout or an editable install).

    An installed copy's directory (``site-packages``, ``dist-packages``) is left out: put on another
    Python's path, it would bring this environment's torch and every other package with it."""
    roots = []
    for name in ("minipaged", "minipaged_kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            root = Path(spec.origin).resolve().parents[1]  # .../<root>/<name>/__init__.py
            if root.name not in _INSTALL_DIRS and str(root) not in roots:
                roots.append(str(root))
    return roots


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with ``source_roots()`` first on ``PYTHONPATH``,
    so a child process, even under another Python without minipaged installed (vLLM's venv),
    imports the same minipaged checkout as this one. A regular (non-editable) install adds nothing:
    that other Python then needs minipaged installed too."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([*source_roots(), *filter(None, [env.get("PYTHONPATH")])])
    return env


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON so that a reader never sees the file half written: into a temporary
    file beside ``path``, flushed to disk, then renamed over it (a rename within a directory is
    atomic). Creates the parent directory; on any error the old file, if any, is left intact."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the result from other readers
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def weight_memory(model: Any) -> dict[str, Any]:
    """A loaded model's weight bytes by kind (``dense``, ``packed``, ``total``: see
    ``minipaged.models.quantization.weight_bytes``) and its quantization scheme (``None``: dense)."""
    from minipaged.models.quantization import weight_bytes

    layout = model.config.quantization
    return {**weight_bytes(model), "quantization": None if layout is None else layout.scheme_name}


def describe_weight_memory(info: dict[str, Any]) -> str:
    """One line: ``weights 61.2 MiB (dense 36.0 MiB + packed 25.2 MiB, W4A16 g128 (...))``."""
    mib = 2**20
    text = f"weights {info['total'] / mib:.1f} MiB"
    if info["packed"]:
        dense, packed = info["dense"] / mib, info["packed"] / mib
        text += f" (dense {dense:.1f} MiB + packed {packed:.1f} MiB, {info['quantization']})"
    return text


def plain_doc(doc: str | None) -> str:
    """A module docstring as ``--help`` text: RST's double backticks dropped (they are for the docs)."""
    return (doc or "").replace("``", "")
