"""The package layout keeps its promises: imports point one way, down the request's path, and the
kernels' import name shadows nobody.

Layers, top to bottom: benchmarks and memsim -> entrypoints -> the public ``minipaged`` API -> engine
-> worker -> core, models -> config -> attention, distributed -> minipaged_kernels, with errors,
sampling_params and outputs as shared leaves. A module may
import from its own package or from a lower layer, never from a higher one; the kernels import
nothing from the engine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Higher number = higher layer. Every package or top-level module of minipaged has a rank.
RANKS = {
    "minipaged_kernels": 0,
    "minipaged.errors": 1,
    "minipaged.sampling_params": 2,
    "minipaged.outputs": 3,
    "minipaged.distributed": 4,
    "minipaged.attention": 4,
    "minipaged.config": 4.5,  # EngineConfig, read by the layers above it
    "minipaged.models": 5,
    "minipaged.core": 5,
    "minipaged.worker": 6,
    "minipaged.structured_output": 6.5,  # grammars and matchers the engine core consults around the sampler
    "minipaged.spec_decode": 6.5,  # proposers and the rejection sampler, between the worker and the engine
    "minipaged.engine": 7,
    "minipaged": 7.5,  # the public API: lazy re-exports of the engine's front ends
    "minipaged.entrypoints": 8,
    "minipaged.memsim": 9,
    "minipaged.benchmarks": 9,
    "minipaged.__main__": 10,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for minipaged and minipaged_kernels."""
    found = {}
    for base, top in ((ROOT, "minipaged"), (ROOT / "kernels", "minipaged_kernels")):
        for path in (base / top).rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, module_level: bool) -> set[str]:
    """Project modules that ``name`` imports; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    is_package = path.name == "__init__.py"
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            out.update(subs or [base])
    return {m for m in out if m in MODULES and m != name}


def _layer(module: str) -> str:
    """The RANKS key that owns ``module`` (its longest matching prefix)."""
    keys = [k for k in RANKS if module == k or module.startswith(k + ".")]
    assert keys, f"{module} has no layer in RANKS: give its package a rank"
    return max(keys, key=len)


def test_every_package_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_kernels_import_nothing_from_the_engine():
    offenders = {
        name: sorted(m for m in _imports(name, path, module_level=False) if not m.startswith("minipaged_kernels"))
        for name, path in MODULES.items()
        if name.startswith("minipaged_kernels")
    }
    assert not {k: v for k, v in offenders.items() if v}


def _absolute_imports(path: Path) -> set[str]:
    """The first component of every absolute import anywhere in ``path``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_nothing_imports_the_bare_kernels_name():
    """The project's kernels are ``minipaged_kernels``: a bare ``import kernels`` would load Hugging Face's."""
    files = [*MODULES.values(), *(ROOT / "tests").rglob("*.py")]
    assert not [str(p.relative_to(ROOT)) for p in files if "kernels" in _absolute_imports(p)]


def test_imports_point_down_the_layers():
    upward = []
    for name, path in MODULES.items():
        for target in _imports(name, path, module_level=False):
            src, dst = _layer(name), _layer(target)
            if src != dst and RANKS[dst] >= RANKS[src]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that point up or sideways across layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: _imports(name, path, module_level=True) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                # A package's __init__ importing its own submodules is the normal package pattern.
                if not all(m == cycle[0] or m.startswith(cycle[0] + ".") for m in cycle):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


_FIND_KERNELS = """
import importlib.util, json
spec = importlib.util.find_spec("kernels")
print(json.dumps(spec and spec.origin))
"""


def _kernels_origin(cwd: Path) -> str | None:
    """What ``import kernels`` would load, run from ``cwd``: a file, or None (a namespace or nothing)."""
    proc = subprocess.run(
        [sys.executable, "-c", _FIND_KERNELS], cwd=cwd, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(proc.stdout)


def test_kernels_name_is_not_this_project():
    """``import kernels`` never finds the project's ``kernels/`` folder as a regular package, even from
    the repository root: that name belongs to Hugging Face's package, which transformers imports."""
    installed = _kernels_origin(Path("/"))  # from outside the checkout only an installed package answers
    from_root = _kernels_origin(ROOT)
    if installed is not None:
        assert from_root == installed
    else:
        assert from_root is None  # at most a namespace portion, which any installed package outranks
    assert installed is None or not Path(installed).resolve().is_relative_to(ROOT / "kernels")


def test_transformers_imports_beside_hugging_face_kernels():
    """With Hugging Face's ``kernels`` installed (transformers >= 5.25 requires it), transformers' model
    modules import from the repository root, where the project's ``kernels/`` folder sits."""
    if _kernels_origin(Path("/")) is None:
        pytest.skip("Hugging Face's `kernels` is not installed in this environment")
    code = "import kernels, transformers.activations, transformers.models.llama.modeling_llama; print(kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not Path(proc.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), proc.stdout
