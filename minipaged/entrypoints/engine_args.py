"""Engine options of the command line, generated from ``EngineConfig``'s fields.

``add_engine_arguments`` adds one ``--flag`` per field (type from the annotation, help text and
choices from the field's metadata, default shown from the dataclass) and ``engine_kwargs`` turns
the parsed ones back into ``LLM(...)`` / ``AsyncLLM(...)`` keywords. ``generate``, ``serve`` and
the benchmarks all call these two, so a new ``EngineConfig`` field is a new flag everywhere.

Every flag's argparse default is ``None``: a flag left unset passes no keyword, and the engine
keeps its own default (some, like ``max_model_len``, are resolved from the loaded model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch

from minipaged.config import EngineConfig, dtype_name

# The namespace attribute that lists which fields this parser turned into flags, so that
# ``engine_kwargs`` never mistakes a subcommand's own option of the same name (``generate``'s
# per-request ``--seed``) for an engine keyword.
ENGINE_FIELDS_DEST = "engine_fields"


def byte_size(text: str) -> int:
    """``1073741824``, ``512M``, ``1G``, ``2GiB`` -> bytes (binary multiples)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number * units[unit] < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes, or with K/M/G/T, e.g. 512M)")
    return int(number * units[unit])


def json_object(text: str) -> dict[str, Any]:
    """``'{"method": "ngram"}'`` -> a dict (a dict-valued engine option on the command line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def layer_counts(text: str) -> tuple[int, ...]:
    """``"10,12,10"`` -> ``(10, 12, 10)`` (layers per pipeline stage)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid layer counts {text!r} (comma-separated, e.g. 10,12,10)") from None


# Fields whose command-line text needs a parser other than their annotation's type.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "kv_cache_memory": byte_size,
    "speculative_config": json_object,
    "pipeline_layer_partition": layer_counts,
}
_METAVARS = {
    "kv_cache_memory": "BYTES",
    "model": "PATH",
    "dtype": "DTYPE",
    "device": "DEVICE",
    "speculative_config": "JSON",
    "pipeline_layer_partition": "N,N,...",
}
_TYPE_METAVARS = {int: "N", float: "X", str: "TEXT"}


def flag_name(name: str) -> str:
    """``max_num_seqs`` -> ``--max-num-seqs``."""
    return "--" + name.replace("_", "-")


def _flag_names(f: dataclasses.Field) -> list[str]:
    """A bool ``enable_<x>`` also answers to ``--<x>`` (so ``--no-prefix-caching`` works, as in vLLM)."""
    names = [flag_name(f.name)]
    if _cli_type(f) is bool and f.name.startswith("enable_"):
        names.append(flag_name(f.name.removeprefix("enable_")))
    return names


def _cli_type(f: dataclasses.Field) -> type:
    """The first of int, float, bool, str in the field's annotation (``str | torch.dtype`` -> str)."""
    if f.name in _PARSERS:
        return str  # parsed from text by its own parser
    hint = typing.get_type_hints(EngineConfig)[f.name]
    members = typing.get_args(hint) or (hint,)
    for candidate in (bool, int, float, str):
        if candidate in members:
            return candidate
    raise TypeError(f"EngineConfig.{f.name}: no command-line type for {hint!r}; add one to engine_args._PARSERS")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.default is None:
        return text  # the help text says what "unset" means
    shown = f.default
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    return f"{text} (default: {shown})"


def engine_fields() -> tuple[dataclasses.Field, ...]:
    """``EngineConfig``'s fields, in declaration order."""
    return dataclasses.fields(EngineConfig)


def add_engine_arguments(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """Add an ``engine`` group with one flag per ``EngineConfig`` field, less those named in ``exclude``
    (a caller that has its own option of that name, e.g. a benchmark's sweep over ``--kv-cache-dtype``).

    Each option's dest is the field's name; unset options parse to ``None``.
    """
    skip = set(exclude)
    unknown = skip - {f.name for f in engine_fields()}
    if unknown:
        raise ValueError(f"exclude names no EngineConfig field: {sorted(unknown)}")
    group = parser.add_argument_group("engine", "options of the engine (EngineConfig); unset ones keep its defaults")
    added = []
    for f in engine_fields():
        if f.name in skip:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"EngineConfig.{f.name} has no metadata['help']: give it one")
        kind = _cli_type(f)
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _PARSERS.get(f.name, kind)
            if "choices" in f.metadata:
                options["choices"] = tuple(f.metadata["choices"])
            else:
                options["metavar"] = _METAVARS.get(f.name, _TYPE_METAVARS[kind])
        group.add_argument(*_flag_names(f), **options)
        added.append(f.name)
    parser.set_defaults(**{ENGINE_FIELDS_DEST: tuple(added)})
    return group


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM(...)`` keywords of the engine flags set on the command line; unset ones are left out,
    so the engine keeps its defaults."""
    names = getattr(args, ENGINE_FIELDS_DEST, ())
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def engine_argv(kwargs: dict[str, Any]) -> list[str]:
    """The command-line flags that ``add_engine_arguments`` parses back into ``kwargs`` (for a child
    process or a launched server); the inverse of ``engine_kwargs``."""
    known = {f.name for f in engine_fields()}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"not EngineConfig fields: {unknown}")
    argv: list[str] = []
    for name, value in kwargs.items():
        if isinstance(value, bool):
            argv.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        elif isinstance(value, torch.dtype):
            argv += [flag_name(name), dtype_name(value)]
        elif dataclasses.is_dataclass(value) or isinstance(value, dict):
            fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            argv += [flag_name(name), json.dumps(fields)]
        elif isinstance(value, (tuple, list)):  # a per-stage list: the comma-separated form the config parses
            argv += [flag_name(name), ",".join(map(str, value))]
        elif value is not None:
            argv += [flag_name(name), str(value)]
    return argv
