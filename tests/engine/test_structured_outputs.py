"""Structured outputs: a tiny random-weight model (garbage when unconstrained) follows every grammar.

The model is conftest's random Llama over SmolLM2's real tokenizer, so the grammars are compiled
against a real vocabulary. Every output is checked by an independent judge: ``jsonschema`` for
schemas, ``json.loads`` for JSON objects, ``re.fullmatch`` for regexes, set membership for choices.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from minipaged import LLM, SamplingParams
from minipaged.errors import InvalidSamplingParamsError
from minipaged.models import build_model_from_hf
from minipaged.sampling_params import StructuredOutputsParams

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["ok", "tags", "color"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)!", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"]
CHOICES = ["Paris", "London", "New York", "東京"]
SEEDS = range(3)
PROMPTS = ["Give me JSON:", "hello", "1 2 3"]


def make_llm(hf, tokenizer, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 256)
    kwargs.setdefault("block_size", 8)
    return LLM(build_model_from_hf(hf, attention_backend="torch"), tokenizer=tokenizer, **kwargs)


def params(so: StructuredOutputsParams, seed: int, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs=so, **kw)


def assert_clean(llm: LLM) -> None:
    stats = llm.engine_core.stats()
    assert stats.used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
    assert llm.engine_core.structured_output.num_matchers == 0


@pytest.fixture(scope="module")
def llm(hf, tokenizer):
    engine = make_llm(hf, tokenizer)
    yield engine
    engine.shutdown()


def test_unconstrained_output_is_not_json(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=0, max_tokens=30, ignore_eos=True))
    for out in outs:
        with pytest.raises(ValueError):
            json.loads(out.outputs[0].text)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enums", "int_array"])
def test_every_seeded_output_validates_against_its_schema(llm, schema):
    for seed in SEEDS:
        outs = llm.generate(PROMPTS, params(StructuredOutputsParams(json=schema), seed))
        for out in outs:
            completion = out.outputs[0]
            assert completion.finish_reason == "stop", completion
            jsonschema.validate(json.loads(completion.text), schema)
    assert_clean(llm)


def test_json_object_and_n_samples_each_follow_the_grammar(llm):
    outs = llm.generate(PROMPTS, params(StructuredOutputsParams(json_object=True), 7, n=3, max_tokens=200))
    for out in outs:
        assert len(out.outputs) == 3
        for completion in out.outputs:
            if completion.finish_reason == "stop":
                assert isinstance(json.loads(completion.text), dict)
            else:  # a random model may open objects until max_tokens; the prefix is still JSON-shaped
                assert completion.finish_reason == "length" and completion.text.startswith("{")
    assert_clean(llm)


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_outputs_match(llm, regex):
    for seed in SEEDS:
        for out in llm.generate(PROMPTS, params(StructuredOutputsParams(regex=regex), seed)):
            assert out.outputs[0].finish_reason == "stop"
            assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text
    assert_clean(llm)


def test_compiled_grammar_cache_is_bounded(llm):
    manager = llm.engine_core.structured_output
    limit, manager.max_cached_grammars = manager.max_cached_grammars, 2
    try:
        regexes = [f"[a-c]{{{n}}}" for n in range(1, 6)]  # five distinct grammars
        for regex in regexes + regexes[:1]:  # the first one again, after it was evicted
            (out,) = llm.generate(PROMPTS[:1], params(StructuredOutputsParams(regex=regex), SEEDS[0]))
            assert re.fullmatch(regex, out.outputs[0].text), (regex, out.outputs[0].text)
            assert manager.num_cached_grammars <= 2
    finally:
        manager.max_cached_grammars = limit
    assert_clean(llm)


def test_choice_outputs_are_one_of_the_choices(llm):
    seen = set()
    for seed in range(8):
        for out in llm.generate(PROMPTS, params(StructuredOutputsParams(choice=CHOICES), seed, n=2)):
            for completion in out.outputs:
                assert completion.text in CHOICES and completion.finish_reason == "stop"
                seen.add(completion.text)
    assert len(seen) > 1  # sampling still samples: the mask restricts, it does not decide
    assert_clean(llm)


def test_ebnf_grammar(llm):
    grammar = 'root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] "+" expr'
    for seed in SEEDS:
        out = llm.generate("calc", params(StructuredOutputsParams(grammar=grammar), seed))[0].outputs[0]
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", out.text), out.text
    assert_clean(llm)


def test_stop_strings_and_streaming_keep_the_grammar(llm):
    so = StructuredOutputsParams(regex=r"[a-c]{10}x[0-9]{5}")
    p = params(so, 3, stop=["x"])
    out = llm.generate("s", p)[0].outputs[0]
    assert re.fullmatch(r"[a-c]{10}", out.text) and out.stop_reason == "x"
    chunks = list(llm.stream(["s", "t"], params(so, 3, n=2)))
    for prompt_index in (0, 1):
        for index in (0, 1):
            mine = [c for c in chunks if c.prompt_index == prompt_index and c.index == index]
            assert re.fullmatch(r"[a-c]{10}x[0-9]{5}", "".join(c.text for c in mine))
            assert mine[-1].finish_reason == "stop"
    assert_clean(llm)


def test_preemption_keeps_outputs_valid(hf, tokenizer):
    # 12 blocks of 4 slots cannot hold 6 sequences that each grow to ~16 tokens: the scheduler preempts.
    engine = make_llm(hf, tokenizer, num_kv_blocks=12, block_size=4)
    schema = SCHEMAS[2]
    try:
        p = params(StructuredOutputsParams(json=schema), 5, max_tokens=40)
        outs = engine.generate(["a", "b", "c", "d", "e", "f"], p)
        assert engine.num_preemptions > 0
        for out in outs:
            if out.outputs[0].finish_reason == "stop":
                jsonschema.validate(json.loads(out.outputs[0].text), schema)
        assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 4
        assert_clean(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "structured_outputs"),
        ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": ["a", 3]}, "structured_outputs.choice"),
        ({"json": 5}, "structured_outputs.json"),
        ({"regex": ""}, "structured_outputs.regex"),
    ],
)
def test_malformed_params_are_typed_errors(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError) as err:
        StructuredOutputsParams(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    "so, field",
    [
        (StructuredOutputsParams(json="{not json"), "structured_outputs.json"),
        (StructuredOutputsParams(json={"type": "no-such-type"}), "structured_outputs.json"),
        (StructuredOutputsParams(regex="(unclosed"), "structured_outputs.regex"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
    ],
)
def test_invalid_specs_are_rejected_before_queueing(llm, so, field):
    with pytest.raises(InvalidSamplingParamsError) as err:
        llm.generate("x", params(so, 0))
    assert err.value.field == field
    assert_clean(llm)


def test_speculation_leaves_grammar_sequences_alone(hf, tokenizer):
    # Verification samples without the grammar's bitmask, so a constrained sequence must get no drafts,
    # while an unconstrained one beside it still speculates on its repetitive prompt.
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    engine = make_llm(hf, tokenizer, speculative_config=spec)
    regex = REGEXES[2]
    try:
        constrained = params(StructuredOutputsParams(regex=regex), 3)
        free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        outs = engine.generate(["a b a b a b a b", "a b a b a b a b"], [constrained, free])
        assert re.fullmatch(regex, outs[0].outputs[0].text), outs[0].outputs[0].text
        assert outs[0].metrics.num_drafts == 0
        assert outs[1].metrics.num_drafts > 0
        assert_clean(engine)
    finally:
        engine.shutdown()
