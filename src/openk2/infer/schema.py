"""JSON Schema -> grammar nodes: the schema half of schema-constrained decoding (K2_SPEC §4).

`schema_node(schema, limits)` compiles a schema into a tree of `Node`s (strings, numbers,
literal choices, sequences, unions, branches, arrays, objects, free-form dicts), each knowing
the fewest characters of a complete match; infer/constrain.py runs that tree as a pushdown
automaton over the tokenizer's vocabulary.

Supported JSON Schema subset (other keywords are ignored; an unknown `type` is a SchemaError):
- `type`: string, number, integer, boolean, null, object, array, or a list of them; BFCL
  aliases dict (object), float (number), int, bool, str, list/tuple (array), any.
- `enum` and `const` (any JSON values, matched literally in compact form); `anyOf` / `oneOf`
  (treated as anyOf); `allOf` (properties and required merged); local `$ref` to `#/$defs/...`
  or `#/definitions/...` (expanded, recursion cut at `Limits.ref_depth`).
- strings: `minLength`, `maxLength` (default cap `Limits.string_chars`); `pattern` and `format`
  are not enforced. Keys and strings may use JSON escapes.
- numbers: JSON number syntax with digit caps; `minimum` / `maximum` / `multipleOf` are not
  enforced. integer: no fraction or exponent.
- objects: `properties` in any order, each at most once, every `required` key before `}`; no
  keys outside `properties`. `"properties": {}` alone means exactly `{}` (a tool without
  arguments); an object without `properties` is a free-form dict (string keys, values from
  `additionalProperties` if it is a schema, else any JSON), at most `Limits.object_props` keys.
- arrays: `items`, `minItems`, `maxItems` (default cap `Limits.array_items`); `prefixItems` or a
  list-valued `items` as a fixed tuple.
- no schema / `true` / `{}`: any JSON value, nested at most `Limits.any_depth` deep.
Output is compact JSON; a single space is allowed after ':' and ',' (json.dumps' default style).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class SchemaError(ValueError):
    """A schema or tool list cannot be compiled into a grammar (the message says where)."""


@dataclass(frozen=True)
class Limits:
    string_chars: int = 64  # maxLength when a string schema gives none
    array_items: int = 8  # maxItems when an array schema gives none
    object_props: int = 8  # keys of a free-form object
    int_digits: int = 12
    frac_digits: int = 6
    any_depth: int = 2  # nesting of schema-less values
    ref_depth: int = 4
    tool_calls: int = 4  # calls in one tool-call section


# ---- grammar nodes -------------------------------------------------------------------------------
class Node:
    """A compiled grammar element; `min_len` is the fewest characters of a complete match."""

    min_len: int = 1


class Str(Node):
    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars, self.max_chars = min_chars, max(min_chars, max_chars)
        self.min_len = 2 + min_chars


class Num(Node):
    def __init__(self, integer: bool, limits: Limits):
        self.integer, self.int_digits, self.frac_digits = integer, limits.int_digits, limits.frac_digits
        self.min_len = 1


class _LitTrie:
    __slots__ = ("children", "value", "rem")

    def __init__(self) -> None:
        self.children: dict[str, _LitTrie] = {}
        self.value: str | None = None  # the complete literal ending here
        self.rem = 0


class Lit(Node):
    """One of a set of literal strings. `weights[s]` adds a cost after s (used so that key and
    branch tries know what each choice commits the rest of the output to)."""

    def __init__(self, choices: Sequence[str], weights: dict[str, int] | None = None):
        if not choices or any(not c for c in choices):
            raise SchemaError("a literal choice list must hold non-empty strings")
        self.trie = _LitTrie()
        for choice in choices:
            node = self.trie
            for ch in choice:
                node = node.children.setdefault(ch, _LitTrie())
            node.value = choice
        weights = weights or {}

        def fill(node: _LitTrie) -> int:
            best = weights.get(node.value, 0) if node.value is not None else 1 << 30
            for child in node.children.values():
                best = min(best, 1 + fill(child))
            node.rem = best
            return best

        self.min_len = fill(self.trie)


class Seq(Node):
    def __init__(self, items: Sequence[Node]):
        if not items:
            raise SchemaError("an empty sequence")
        self.items = tuple(items)
        self.min_len = sum(item.min_len for item in items)


class Union(Node):
    def __init__(self, alts: Sequence[Node]):
        if not alts:
            raise SchemaError("anyOf/oneOf/type list with no alternatives")
        self.alts = tuple(alts)
        self.min_len = min(a.min_len for a in alts)


class Branch(Node):
    """A literal choice that decides what follows: {literal: node}."""

    def __init__(self, branches: dict[str, Node]):
        self.branches = dict(branches)
        self.lit = Lit(list(branches), {k: v.min_len for k, v in branches.items()})
        self.min_len = self.lit.min_len


class Arr(Node):
    def __init__(self, item: Node, min_items: int, max_items: int):
        self.item, self.min_items, self.max_items = item, min_items, max(min_items, max_items)
        self.min_len = 2 + min_items * item.min_len + max(0, min_items - 1)


class Obj(Node):
    def __init__(self, props: dict[str, Node], required: Sequence[str]):
        self.props = dict(props)
        self.required = frozenset(required)
        # characters of `"key":value` at its shortest
        self.key_len = {k: len(json.dumps(k, ensure_ascii=False)) + 1 + v.min_len for k, v in props.items()}
        self._key_tries: dict[frozenset, Lit] = {}
        missing = sorted(self.required)
        self.min_len = 2 + sum(self.key_len[k] for k in missing) + max(0, len(missing) - 1)

    def rest_after(self, done: frozenset) -> int:
        """Fewest characters to close the object after a value, with `done` keys present."""
        return sum(1 + self.key_len[k] for k in self.required - done) + 1

    def key_trie(self, done: frozenset) -> Lit:
        lit = self._key_tries.get(done)
        if lit is None:
            keys = {json.dumps(k, ensure_ascii=False): k for k in self.props if k not in done}
            weights = {s: 1 + self.props[k].min_len + self.rest_after(done | {k}) for s, k in keys.items()}
            lit = self._key_tries[done] = Lit(list(keys), weights)
            lit.keys = keys  # type: ignore[attr-defined]
        return lit


class Dict(Node):
    def __init__(self, value: Node, limits: Limits):
        self.value, self.max_props = value, limits.object_props
        self.key = Str(0, min(32, limits.string_chars))
        self.min_len = 2


def any_value(depth: int, limits: Limits) -> Node:
    scalars = [Str(0, limits.string_chars), Num(False, limits), Lit(["true", "false", "null"])]
    if depth <= 0:
        return Union(scalars)
    inner = any_value(depth - 1, limits)
    return Union([Dict(inner, limits), Arr(inner, 0, limits.array_items)] + scalars)


# ---- schema -> node -------------------------------------------------------------------------------
_TYPE_ALIASES = {
    "dict": "object", "float": "number", "double": "number", "int": "integer", "bool": "boolean",
    "str": "string", "list": "array", "tuple": "array", "any": "any",
}


def schema_node(schema: Any, limits: Limits = Limits(), root: Any = None, depth: int = 0) -> Node:
    """Compile a JSON Schema (the subset in the module docstring) into a grammar node."""
    root = schema if root is None else root
    if schema is True or schema is None or schema == {}:
        return any_value(limits.any_depth, limits)
    if schema is False:
        raise SchemaError("schema `false` matches nothing")
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object, got {type(schema).__name__}: {schema!r}")
    if "$ref" in schema:
        if depth >= limits.ref_depth:
            return any_value(0, limits)
        return schema_node(_resolve_ref(schema["$ref"], root), limits, root, depth + 1)
    if "const" in schema:
        return Lit([json.dumps(schema["const"], ensure_ascii=False)])
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"enum must be a non-empty list, got {values!r}")
        return Lit(list(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in values)))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            alts = schema[key]
            if not isinstance(alts, list):
                raise SchemaError(f"{key} must be a list of schemas")
            base = {k: v for k, v in schema.items() if k != key}
            return Union([schema_node({**base, **alt} if isinstance(alt, dict) else alt, limits, root, depth)
                          for alt in alts])
    if "allOf" in schema:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                part = _resolve_ref(part["$ref"], root) if "$ref" in part else part
                merged.setdefault("properties", {}).update(part.get("properties", {}))
                merged["required"] = list(merged.get("required", [])) + list(part.get("required", []))
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
        return schema_node(merged, limits, root, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        if not kind:
            raise SchemaError("type list is empty")
        return Union([schema_node({**schema, "type": t}, limits, root, depth) for t in kind])
    if kind is None:
        arrayish = "items" in schema or "prefixItems" in schema
        kind = "object" if "properties" in schema else "array" if arrayish else "any"
    if not isinstance(kind, str):
        raise SchemaError(f"type must be a string or a list, got {kind!r}")
    kind = _TYPE_ALIASES.get(kind.lower(), kind.lower())
    if kind == "any":
        return any_value(limits.any_depth, limits)
    if kind == "string":
        low = _int(schema, "minLength", 0)
        return Str(low, _int(schema, "maxLength", max(limits.string_chars, low)))
    if kind in ("number", "integer"):
        return Num(kind == "integer", limits)
    if kind == "boolean":
        return Lit(["true", "false"])
    if kind == "null":
        return Lit(["null"])
    if kind == "array":
        items = schema.get("items")
        tuple_items = schema.get("prefixItems", items if isinstance(items, list) else None)
        if tuple_items is not None:
            if not tuple_items:
                return Lit(["[]"])
            parts: list[Node] = [Lit(["["])]
            for i, item in enumerate(tuple_items):
                parts += ([Lit([","])] if i else []) + [schema_node(item, limits, root, depth)]
            return Seq(parts + [Lit(["]"])])
        item = schema_node(schema.get("items", True), limits, root, depth)
        low = _int(schema, "minItems", 0)
        return Arr(item, low, _int(schema, "maxItems", max(limits.array_items, low)))
    if kind == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if not props:
            if extra is False or (props == {} and not isinstance(extra, dict)):
                return Lit(["{}"])  # declared without properties: no arguments
            return Dict(schema_node(extra if isinstance(extra, dict) else True, limits, root, depth), limits)
        if not isinstance(props, dict):
            raise SchemaError(f"properties must be an object, got {props!r}")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise SchemaError(f"required must be a list, got {required!r}")
        nodes = {str(k): schema_node(v, limits, root, depth) for k, v in props.items()}
        for k in required:  # required but undeclared: any value
            nodes.setdefault(str(k), any_value(limits.any_depth, limits))
        return Obj(nodes, [str(k) for k in required])
    raise SchemaError(f"unsupported type {schema.get('type')!r}")


def _int(schema: dict, key: str, default: int) -> int:
    value = schema.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SchemaError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _resolve_ref(ref: Any, root: Any) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise SchemaError(f"only local $ref ('#/$defs/...') is supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node
