"""The engine's command-line options are generated from ``EngineConfig``: every field is a flag with a
help text, a parsed flag builds the same config as the keyword, and an unset flag keeps the default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from minipaged.config import EngineConfig
from minipaged.entrypoints.engine_args import add_engine_arguments, engine_argv, engine_kwargs

FIELDS = dataclasses.fields(EngineConfig)

# For every field: command-line text and the keyword value it must parse to, neither one the default.
# A new EngineConfig field without a row here fails test_every_field_round_trips.
NON_DEFAULT = {
    "model": (["--model", "/some/model/dir"], "/some/model/dir"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "block_size": (["--block-size", "32"], 32),
    "num_kv_blocks": (["--num-kv-blocks", "100"], 100),
    "kv_cache_memory": (["--kv-cache-memory", "512M"], 512 * 1024 * 1024),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "max_num_seqs": (["--max-num-seqs", "7"], 7),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "4096"], 4096),
    "max_model_len": (["--max-model-len", "256"], 256),
    "enable_prefix_caching": (["--no-prefix-caching"], False),
    "attention_backend": (["--attention-backend", "triton"], "triton"),
    "seed": (["--seed", "123"], 123),
    "device": (["--device", "cpu"], "cpu"),
    "kv_cache_dtype": (["--kv-cache-dtype", "int8"], "int8"),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
    "speculative_config": (
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}'],
        {"method": "ngram", "num_speculative_tokens": 5},
    ),
    "pipeline_parallel_size": (["--pipeline-parallel-size", "2"], 2),
    "pipeline_layer_partition": (["--pipeline-layer-partition", "2,1"], (2, 1)),
    "max_concurrent_batches": (["--max-concurrent-batches", "1"], 1),
    "max_trace_steps": (["--max-trace-steps", "500"], 500),
    "peer_timeout_s": (["--peer-timeout-s", "7.5"], 7.5),
}


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_engine_arguments(p, **kwargs)
    return p


def actions_by_dest(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions}


def test_every_field_has_a_help_text_and_a_flag():
    actions = actions_by_dest(parser())
    for f in FIELDS:
        text = f.metadata.get("help")
        assert isinstance(text, str) and len(text) > 10, f"EngineConfig.{f.name} needs metadata['help']"
        action = actions.get(f.name)
        assert action is not None, f"no flag for EngineConfig.{f.name}"
        assert "--" + f.name.replace("_", "-") in action.option_strings
        assert action.help.startswith(text)
        assert action.default is None  # unset -> no keyword -> the engine's default


def test_defaults_in_the_help_come_from_the_dataclass():
    actions = actions_by_dest(parser())
    for f in FIELDS:
        if f.default is None or isinstance(f.default, bool):
            continue
        assert f"(default: {f.default})" in actions[f.name].help, f.name
    assert "(default: on)" in actions["enable_prefix_caching"].help


def test_every_field_round_trips():
    assert set(NON_DEFAULT) == {f.name for f in FIELDS}, "add the new field to NON_DEFAULT"
    p = parser()
    for f in FIELDS:
        argv, value = NON_DEFAULT[f.name]
        assert value != f.default
        kwargs = engine_kwargs(p.parse_args(argv))
        assert kwargs == {f.name: value}, f.name
        assert EngineConfig(**kwargs) == EngineConfig(**{f.name: value})
    all_argv = [token for argv, _ in NON_DEFAULT.values() for token in argv]
    everything = {name: value for name, (_, value) in NON_DEFAULT.items()}
    assert EngineConfig(**engine_kwargs(p.parse_args(all_argv))) == EngineConfig(**everything)


def test_unset_flags_keep_the_engine_defaults():
    kwargs = engine_kwargs(parser().parse_args([]))
    assert kwargs == {}
    assert EngineConfig(**kwargs) == EngineConfig()


@pytest.mark.parametrize(
    "argv, value",
    [
        (["--no-prefix-caching"], False),
        (["--no-enable-prefix-caching"], False),
        (["--prefix-caching"], True),
        (["--enable-prefix-caching"], True),
        (["--no-prefix-caching", "--prefix-caching"], True),  # the last one wins
    ],
)
def test_bool_flags_both_ways(argv, value):
    assert engine_kwargs(parser().parse_args(argv)) == {"enable_prefix_caching": value}


def test_engine_argv_is_the_inverse_of_engine_kwargs():
    p = parser()
    everything = {name: value for name, (_, value) in NON_DEFAULT.items()}
    assert engine_kwargs(p.parse_args(engine_argv(everything))) == everything
    assert engine_kwargs(p.parse_args(engine_argv({"enable_prefix_caching": True}))) == {"enable_prefix_caching": True}
    # A torch dtype (LLM accepts one) goes back to its name; the config built from it is the same.
    parsed = engine_kwargs(p.parse_args(engine_argv({"dtype": torch.bfloat16})))
    assert EngineConfig(**parsed).torch_dtype == torch.bfloat16
    with pytest.raises(TypeError, match="not EngineConfig fields"):
        engine_argv({"max_tokens": 3})


def test_choices_and_byte_sizes_are_checked_by_the_parser():
    p = parser()
    bad_sizes = [["--kv-cache-memory", size] for size in ("12Q", "inf", "nan", "-1G", "0", "0.1")]
    for argv in (["--kv-cache-dtype", "int4"], ["--attention-backend", "cuda"], *bad_sizes):
        with pytest.raises(argparse.ArgumentError):
            p.parse_args(argv)
    assert engine_kwargs(p.parse_args(["--kv-cache-memory", "2GiB"])) == {"kv_cache_memory": 2 << 30}
    assert engine_kwargs(p.parse_args(["--kv-cache-memory", "1048576"])) == {"kv_cache_memory": 1 << 20}


def test_excluded_fields_leave_a_command_s_own_option_alone():
    """``generate``'s --seed is the per-request sampling seed: never an engine keyword."""
    p = parser(exclude=("seed",))
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(["--seed", "5", "--block-size", "8"])
    assert args.seed == 5 and engine_kwargs(args) == {"block_size": 8}
    with pytest.raises(ValueError, match="no EngineConfig field"):
        parser(exclude=("max_tokens",))


def test_generate_and_serve_take_every_engine_flag():
    from minipaged.entrypoints.cli import _parser

    top = _parser()
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    gen, serve = actions_by_dest(subcommands["generate"]), actions_by_dest(subcommands["serve"])
    for f in FIELDS:
        assert f.name in serve, f.name
        if f.name != "seed":  # generate's --seed is SamplingParams.seed
            assert f.name in gen and gen[f.name].help == serve[f.name].help, f.name
    args = top.parse_args(["serve", "--seed", "9", "--no-prefix-caching", "--max-num-seqs", "4"])
    assert engine_kwargs(args) == {"seed": 9, "enable_prefix_caching": False, "max_num_seqs": 4}
    args = top.parse_args(["generate", "hi", "--seed", "9", "--kv-cache-memory", "1M"])
    assert engine_kwargs(args) == {"kv_cache_memory": 1 << 20} and args.seed == 9
