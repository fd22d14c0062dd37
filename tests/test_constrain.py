"""Constrained decoding: every random walk through the token masks is valid JSON for its schema
(checked by an independent validator), K2 tool-call sections parse, and outputs end in budget."""

import functools
import json
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openk2 import build_model, preset
from openk2.data.chat import parse_assistant
from openk2.data.tokenizer import train_tokenizer
from openk2.infer import Engine, SamplingParams
from openk2.infer.constrain import IM_END, MARKER_CHARS, Grammar, TokenVocab, json_grammar, tool_call_grammar
from openk2.infer.schema import Limits, Lit, SchemaError, Seq, schema_node

VOCAB = 640




@functools.cache
def tokenizer():
    rng = random.Random(1)
    words = "alpha beta gamma city paris london unit celsius count items name value true false null".split()
    texts = []
    for _ in range(80):
        obj = {
            rng.choice(words): rng.choice(
                [rng.choice(words), rng.randint(-50, 5000), rng.random(), [1, "a"], None]
            )
            for _ in range(3)
        }
        texts.append(
            " ".join(rng.choices(words, k=15))
            + " "
            + json.dumps(obj)
            + json.dumps(obj, separators=(",", ":"))
            + ' "esc\\n\\"q\\u00e9" é ü'
        )
    return train_tokenizer(texts, VOCAB, num_special=64)


# ---- an independent validator for the supported subset -------------------------------------------
TYPES = {
    "dict": "object",
    "float": "number",
    "int": "integer",
    "bool": "boolean",
    "str": "string",
    "list": "array",
    "tuple": "array",
}


def validate(value, schema, root=None, path="$"):
    root = root if root is not None else schema
    if schema is True or schema is None or schema == {}:
        return
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return validate(value, target, root, path)
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != const"
        return
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in enum"
        return
    for key in ("anyOf", "oneOf"):
        if key in schema:
            base = {k: v for k, v in schema.items() if k != key}
            errors = []
            for alt in schema[key]:
                try:
                    validate(value, {**base, **alt}, root, path)
                    return
                except AssertionError as e:
                    errors.append(str(e))
            raise AssertionError(f"{path}: no alternative matched: {errors}")
    kind = schema.get("type")
    if isinstance(kind, list):
        errors = []
        for t in kind:
            try:
                validate(value, {**schema, "type": t}, root, path)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: no type matched: {errors}")
    if kind is None:
        kind = (
            "object"
            if "properties" in schema
            else "array"
            if "items" in schema or "prefixItems" in schema
            else "any"
        )
    kind = TYPES.get(kind, kind)
    if kind == "any":
        return
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    assert checks[kind](value), f"{path}: {value!r} is not {kind}"
    if kind == "string":
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9), f"{path}: length"
    if kind == "array":
        items = schema.get(
            "prefixItems", schema.get("items") if isinstance(schema.get("items"), list) else None
        )
        if items is not None:
            assert len(value) == len(items), f"{path}: tuple length"
            for i, (v, s) in enumerate(zip(value, items)):
                validate(v, s, root, f"{path}[{i}]")
            return
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), (
            f"{path}: items count"
        )
        for i, v in enumerate(value):
            validate(v, schema.get("items", True), root, f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties") or {}
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing required {key!r}"
        if props:
            assert set(value) <= set(props) | set(schema.get("required", [])), (
                f"{path}: extra keys {set(value) - set(props)}"
            )
        for key, v in value.items():
            sub = props.get(key, schema.get("additionalProperties", True))
            validate(v, sub if isinstance(sub, dict) else True, root, f"{path}.{key}")


def walk(grammar, rng, budget):
    """Sample uniformly among allowed tokens until the grammar is done or the budget is spent."""
    matcher = grammar.start()
    ids = []
    for i in range(budget):
        allowed = matcher.allowed(budget - i).nonzero().squeeze(1).tolist()
        assert allowed, "a state with no allowed token"
        ids.append(rng.choice(allowed))
        matcher.advance(ids[-1])
        assert not matcher.dead
        if matcher.done:
            return ids, True
    return ids, False


def json_text(ids):
    text = tokenizer().decode(ids)
    assert text.endswith("<|im_end|>") and text.count("<|im_end|>") == 1
    return text[: -len("<|im_end|>")]


# ---- schemas -------------------------------------------------------------------------------------
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2, "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "none": {"type": "null"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "nested": {
            "type": "object",
            "properties": {
                "a": {"type": ["integer", "null"]},
                "b": {"type": "object", "properties": {"c": {"type": "number"}}, "required": ["c"]},
            },
            "required": ["a", "b"],
        },
        "free": {"type": "object"},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}]},
        "choice": {
            "anyOf": [{"type": "string", "maxLength": 3}, {"type": "array", "items": {"type": "boolean"}}]
        },
    },
    "required": ["city", "unit", "nested"],
}
BFCL = {
    "type": "dict",
    "properties": {
        "x": {"type": "float"},
        "points": {"type": "tuple", "items": {"type": "integer"}},
        "meta": {"type": "any"},
        "opts": {"type": "dict", "properties": {"flag": {"type": "boolean"}}},
    },
    "required": ["x", "points"],
}
REFS = {
    "type": "object",
    "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
    "properties": {
        "a": {"$ref": "#/$defs/pt"},
        "b": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 2},
    },
    "required": ["a"],
}


@pytest.mark.parametrize(
    "schema",
    [
        WEATHER,
        BFCL,
        REFS,
        {"type": "object"},
        {"type": "array"},
        {"type": "string"},
        {"type": "integer"},
        {"enum": [1, "two", None, [3]]},
        True,
    ],
)
def test_random_walks_give_valid_json(schema):
    grammar = json_grammar(tokenizer(), schema)
    rng = random.Random(0)
    for _ in range(25):
        ids, done = walk(grammar, rng, 400)
        assert done, "not finished within 400 tokens"
        value = json.loads(json_text(ids))
        validate(value, schema if schema is not True else {})


@pytest.mark.parametrize("budget_extra", [0, 1, 5, 30])
def test_outputs_finish_within_the_token_budget(budget_extra):
    grammar = json_grammar(tokenizer(), WEATHER)
    budget = grammar.min_len + budget_extra  # characters needed at least; a token is at least one
    rng = random.Random(budget_extra)
    for _ in range(10):
        ids, done = walk(grammar, rng, budget)
        assert done and len(ids) <= budget
        validate(json.loads(json_text(ids)), WEATHER)


def test_tool_call_sections_parse_and_validate():
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
        {
            "type": "function",
            "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
        },
        {"type": "function", "function": {"name": "bfcl.search", "parameters": BFCL}},
    ]
    grammar = tool_call_grammar(tokenizer(), tools, first_index=3)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    rng = random.Random(0)
    names_seen = set()
    for _ in range(30):
        ids, done = walk(grammar, rng, 300)
        assert done
        text = tokenizer().decode(ids)
        assert text.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.")
        assert text.endswith("<|tool_calls_section_end|><|im_end|>")
        content, calls = parse_assistant(text)
        assert content == "" and 1 <= len(calls) <= Limits().tool_calls
        for j, call in enumerate(calls):
            name = call["function"]["name"]
            names_seen.add(name)
            assert call["id"] == f"functions.{name}:{3 + j}"
            args = json.loads(call["function"]["arguments"])
            validate(args, schemas[name])
            if name == "clock":
                assert args == {}
    assert names_seen == set(schemas)
    # a named tool_choice and a single call
    grammar = tool_call_grammar(tokenizer(), tools, names=["clock"], max_calls=1)
    ids, done = walk(grammar, rng, 60)
    assert tokenizer().decode(ids) == (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.clock:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"
        "<|im_end|>"
    )


# ---- random schemas (hypothesis) -----------------------------------------------------------------
scalars = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("string")}, optional={"minLength": st.integers(0, 3), "maxLength": st.integers(3, 8)}
    ),
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda vs: {"enum": vs},
        st.lists(
            st.one_of(
                st.integers(-9, 99), st.text('abcxy"\\', min_size=1, max_size=4), st.booleans(), st.none()
            ),
            min_size=1,
            max_size=4,
            unique=True,
        ),
    ),
    st.just({"type": ["string", "null"], "maxLength": 4}),
)


def objects(children):
    return st.builds(
        lambda props, req: {
            "type": "object",
            "properties": props,
            "required": [k for k in props if k in req],
        },
        st.dictionaries(st.text("abcdkey_", min_size=1, max_size=5), children, min_size=1, max_size=4),
        st.sets(st.text("abcdkey_", min_size=1, max_size=5), max_size=4),
    )


schemas = st.recursive(
    scalars,
    lambda children: st.one_of(
        objects(children),
        st.builds(
            lambda item, lo: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + 2},
            children,
            st.integers(0, 2),
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 1000))
def test_any_schema_of_the_subset(schema, seed):
    grammar = json_grammar(tokenizer(), schema)
    ids, done = walk(grammar, random.Random(seed), 500)
    assert done
    validate(json.loads(json_text(ids)), schema)


def test_schema_errors_are_reported():
    with pytest.raises(SchemaError, match="enum"):
        schema_node({"enum": []})
    with pytest.raises(SchemaError, match="ref"):
        schema_node({"$ref": "http://example.com/x"})
    with pytest.raises(SchemaError, match="unsupported type"):
        schema_node({"type": "matrix"})
    with pytest.raises(SchemaError, match="not among the tools"):
        tool_call_grammar(tokenizer(), [{"type": "function", "function": {"name": "a"}}], names=["b"])


# ---- speed on an 8k vocabulary -------------------------------------------------------------------
def test_mask_speed_on_8k_vocabulary():
    """Masks for a BPE-like 8k vocabulary: cached states are instant, fresh ones a few ms."""
    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    strings = set()
    while len(strings) < 7000:
        word = "".join(rng.choices(letters, k=rng.randint(1, 9)))
        strings.add(rng.choice(["", " ", '"', "_", "."]) + word)
    strings |= {str(i) for i in range(1000)}
    strings |= {
        '{"',
        '":',
        '",',
        '"}',
        '":"',
        ", ",
        ": ",
        "},",
        "]}",
        '["',
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        '"',
        "\\",
        "\\n",
        " {",
        "\n",
        "  ",
        "true",
        "false",
        "null",
        "-",
        ".",
        "e",
        "é",
        "日本",
    }
    tokens = sorted(strings)[: 8192 - len(MARKER_CHARS)] + list(MARKER_CHARS.values())
    vocab = TokenVocab(tokens)
    grammar = Grammar(Seq([schema_node(WEATHER), Lit([IM_END])]), vocab)
    rng = random.Random(1)
    times = []
    for _ in range(6):
        matcher = grammar.start()
        for i in range(300):
            start = time.perf_counter()
            allowed = matcher.allowed(300 - i)
            times.append(time.perf_counter() - start)
            tid = rng.choice(allowed.nonzero().squeeze(1).tolist())
            matcher.advance(tid)
            if matcher.done:
                break
        assert matcher.done
    mean_ms = 1e3 * sum(times) / len(times)
    assert mean_ms < 15, f"{mean_ms:.1f} ms per mask"


# ---- through the engine with a random model ------------------------------------------------------
def test_engine_constrained_outputs_are_always_valid():
    model = build_model(
        preset(
            "tiny",
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
        seed=0,
    )
    engine = Engine(model, tokenizer(), max_batch=8, max_len=256)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    grammar = tool_call_grammar(tokenizer(), tools)
    prompt = tokenizer().encode("weather in paris?")
    assert grammar.min_len > 60  # characters; with <= 1 character per token that is the tightest budget
    for max_tokens in (grammar.min_len, 150):
        outs = engine.generate(
            [prompt] * 6,
            SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=max_tokens, constraint=grammar),
        )
        for out in outs:
            assert out.finish_reason == "stop" and out.token_ids[-1] == tokenizer().im_end_id
            _, calls = parse_assistant(out.text + "<|im_end|>")
            assert calls
            for call in calls:
                validate(json.loads(call["function"]["arguments"]), WEATHER)
    outs = engine.generate(
        [prompt] * 4,
        SamplingParams(max_tokens=80, temperature=1.5, seed=1, constraint=json_grammar(tokenizer(), BFCL)),
    )
    for out in outs:
        validate(json.loads(out.text), BFCL)
