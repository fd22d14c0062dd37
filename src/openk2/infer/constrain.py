"""Schema-constrained decoding: the "enforcer" of K2_SPEC §4 (tool calls and JSON output).

A grammar is a character-level pushdown automaton; at every step the engine asks its `Matcher`
for a token mask over the vocabulary and masks the logits with it, so every sampled token keeps
the output a prefix of a valid one. Special tokens that the K2 format needs (<|im_end|>,
<|tool_calls_section_begin|>, ...) are mapped to private-use characters, so the whole tool-call
section is one character grammar:

    <|tool_calls_section_begin|>
      ( <|tool_call_begin|> functions.{name}:{i} <|tool_call_argument_begin|>
        {JSON arguments valid for the named tool's schema} <|tool_call_end|> )+
    <|tool_calls_section_end|> <|im_end|>

Masks are computed by walking a trie of the tokenizer's decoded token strings while stepping
the automaton, so a subtree is pruned at its first rejected character; the candidates of each
automaton state are cached. Inside free strings (where almost every token fits) a precomputed
index answers directly: plain tokens (no quote, backslash or control character) by length, and
only the few tokens holding a quote or backslash are simulated. Tokens that are not complete
UTF-8 on their own are never allowed, nor are special tokens the grammar does not name.

Termination: strings, arrays, numbers and free-form objects have length caps (`Limits`), and
every state knows the fewest characters that complete the output; a token is only allowed if
what remains can still be completed within the remaining token budget (a character is always a
token of a byte-level vocabulary), so a randomly initialised model closes its JSON in time.

The JSON Schema subset and its compilation into grammar nodes live in infer/schema.py.
Literal text (enum values, keys, tool names) must be spellable with tokens that are whole UTF-8
characters: always true of ASCII in a byte-level vocabulary, not guaranteed for other scripts.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from openk2.data import tokenizer as tokens
from openk2.infer.schema import (
    Arr, Branch, Dict, Limits, Lit, Node, Num, Obj, SchemaError, Seq, Str, Union, schema_node,
)


# ---- token strings ------------------------------------------------------------------------------
# Marker tokens of the K2 format, as private-use characters inside grammars.
MARKERS = (
    tokens.IM_END, tokens.TOOL_CALLS_SECTION_BEGIN, tokens.TOOL_CALLS_SECTION_END, tokens.TOOL_CALL_BEGIN,
    tokens.TOOL_CALL_ARGUMENT_BEGIN, tokens.TOOL_CALL_END,
)
MARKER_CHARS = {name: chr(0xE000 + i) for i, name in enumerate(MARKERS)}
IM_END, SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END = (MARKER_CHARS[m] for m in MARKERS)
_PRIVATE_LO, _PRIVATE_HI = "\ue000", "\ue0ff"


def _bytes_to_unicode() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, reversed: printable char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of one token (a special token's marker text for specials)."""
    piece = tokenizer.id_to_token(token_id) if hasattr(tokenizer, "id_to_token") else None
    special = getattr(tokenizer, "is_special", lambda _: False)(token_id)
    if piece is not None and not special and all(ch in _BYTE_OF for ch in piece):
        return bytes(_BYTE_OF[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


class _TrieNode:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.ids: list[int] = []


class TokenVocab:
    """Decoded strings of a tokenizer's tokens (None: never allowed), a trie over them, and the
    plain-string index. Built once per tokenizer (`TokenVocab.of`)."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, strings: Sequence[str | None]):
        self.strings = list(strings)
        self.size = len(self.strings)
        self.trie = _TrieNode()
        plain_len = torch.zeros(self.size, dtype=torch.long)
        self.quote_tokens: list[tuple[int, str]] = []  # plain prefix, then '"' or '\'
        for tid, s in enumerate(self.strings):
            if not s:
                continue
            node = self.trie
            for ch in s:
                node = node.children.setdefault(ch, _TrieNode())
            node.ids.append(tid)
            cut = next((i for i, ch in enumerate(s) if not _plain_char(ch)), len(s))
            if cut == len(s):
                plain_len[tid] = len(s)
            elif s[cut] in '"\\':
                self.quote_tokens.append((tid, s))
        longest = int(plain_len.max()) if self.size else 0
        # plain_upto[k]: plain tokens of at most k characters (k = 0 .. longest)
        self.plain_upto = torch.stack([(plain_len > 0) & (plain_len <= k) for k in range(longest + 1)])
        self.longest_plain = longest

    @classmethod
    def of(cls, tokenizer: Any) -> TokenVocab:
        """The vocabulary of a K2Tokenizer (or anything with vocab_size and decode)."""
        vocab = cls._cache.get(tokenizer)
        if vocab is None:
            vocab = cls(_token_strings(tokenizer))
            cls._cache[tokenizer] = vocab
        return vocab

    def marker_id(self, char: str) -> int | None:
        node = self.trie.children.get(char)
        return node.ids[0] if node is not None and node.ids else None


def _plain_char(ch: str) -> bool:
    return ch >= " " and ch not in '"\\' and not (_PRIVATE_LO <= ch <= _PRIVATE_HI)


def _token_strings(tokenizer: Any) -> list[str | None]:
    """Each token's text; None for special tokens other than the K2 markers, for tokens that
    are not complete UTF-8 on their own, and for text that collides with the marker characters."""
    size = tokenizer.vocab_size
    specials = {}
    for name in MARKERS:
        try:
            specials[tokenizer.token_id(name)] = MARKER_CHARS[name]
        except (KeyError, AttributeError):
            pass
    byte_of = _BYTE_OF
    id_to_token = getattr(tokenizer, "id_to_token", None)
    is_special = getattr(tokenizer, "is_special", None)
    out: list[str | None] = []
    for tid in range(size):
        if tid in specials:
            out.append(specials[tid])
            continue
        if is_special is not None and is_special(tid):
            out.append(None)
            continue
        piece = id_to_token(tid) if id_to_token is not None else None
        if piece is not None and all(ch in byte_of for ch in piece):  # byte-level BPE
            try:
                text = bytes(byte_of[ch] for ch in piece).decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character
                text = None
        else:
            decoded = tokenizer.decode([tid])
            text = None if "\ufffd" in decoded else decoded
        if text is not None and any(_PRIVATE_LO <= ch <= _PRIVATE_HI for ch in text):
            text = None
        out.append(text or None)
    return out


# ---- the automaton ----------------------------------------------------------------------------------
# A state is a stack (tuple) of frames; frames are tuples whose first item is their kind:
#   ("T", root, done)              bottom of every stack
#   ("V", node, space_ok)          a value of `node` is expected next
#   ("S", node, count, esc)        inside a string: count characters so far; esc 1 after '\', 2..5 in \uXXXX
#   ("N", node, phase, digits)     inside a number
#   ("L", trie)                    inside a literal, at a trie node
#   ("Q", seq, i)                  items[i:] of a sequence are still to come
#   ("B", branch)                  under the literal that picks a branch
#   ("A", node, count, phase)      inside an array
#   ("O", node, done_keys, phase, key) / ("D", node, count, phase)   inside an object / free-form dict
_SIGN, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(8)
_OPEN, _ITEM, _AFTER, _COMMA, _KEY, _COLON, _VALUE, _COMMA_SP = range(8)
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"


def _start(rest: tuple, node: Node, space_ok: bool, ch: str) -> list[tuple]:
    """Begin a value of `node` with character ch on top of stack `rest`."""
    if ch == " " and space_ok:
        return [rest + (("V", node, False),)]
    kind = type(node)
    if kind is Str:
        return [rest + (("S", node, 0, 0),)] if ch == '"' else []
    if kind is Lit:
        child = node.trie.children.get(ch)
        return [rest + (("L", child),)] if child is not None else []
    if kind is Num:
        if ch == "-":
            return [rest + (("N", node, _SIGN, 0),)]
        if ch == "0":
            return [rest + (("N", node, _ZERO, 1),)]
        if "1" <= ch <= "9":
            return [rest + (("N", node, _INT, 1),)]
        return []
    if kind is Seq:
        return _start(rest + (("Q", node, 1),), node.items[0], False, ch)
    if kind is Union:
        out: list[tuple] = []
        for alt in node.alts:
            out += _start(rest, alt, False, ch)
        return out
    if kind is Branch:
        child = node.lit.trie.children.get(ch)
        return [rest + (("B", node), ("L", child))] if child is not None else []
    if ch == "[" and kind is Arr:
        return [rest + (("A", node, 0, _OPEN),)]
    if ch == "{" and kind is Obj:
        return [rest + (("O", node, frozenset(), _OPEN, None),)]
    if ch == "{" and kind is Dict:
        return [rest + (("D", node, 0, _OPEN),)]
    return []


def _pop(rest: tuple, value: str | None = None) -> list[tuple]:
    """The value on top of `rest` is complete (`value`: a literal's text): update the parent."""
    parent = rest[-1]
    below = rest[:-1]
    kind = parent[0]
    if kind == "T":
        return [below + (("T", parent[1], True),)]
    if kind == "Q":
        seq, i = parent[1], parent[2]
        if i < len(seq.items):
            return [below + (("Q", seq, i + 1), ("V", seq.items[i], False))]
        return _pop(below)
    if kind == "B":
        return [below + (("V", parent[1].branches[value], False),)]
    if kind == "A":
        return [below + (("A", parent[1], parent[2] + 1, _AFTER),)]
    if kind == "O":
        node, done, phase = parent[1], parent[2], parent[3]
        if phase == _KEY:
            key = node.key_trie(done).keys[value]
            return [below + (("O", node, done | {key}, _COLON, key),)]
        return [below + (("O", node, done, _AFTER, None),)]
    if kind == "D":
        node, count, phase = parent[1], parent[2], parent[3]
        if phase == _KEY:
            return [below + (("D", node, count, _COLON),)]
        return [below + (("D", node, count + 1, _AFTER),)]
    raise AssertionError(f"frame {kind} cannot hold a value")


def _step(stack: tuple, ch: str) -> list[tuple]:
    """All stacks reachable from `stack` by reading ch (empty: ch is not allowed)."""
    top = stack[-1]
    rest = stack[:-1]
    kind = top[0]
    if kind == "S":
        node, count, esc = top[1], top[2], top[3]
        if esc == 0:
            if ch == '"':
                return _pop(rest) if count >= node.min_chars else []
            if count >= node.max_chars:
                return []
            if ch == "\\":
                return [rest + (("S", node, count, 1),)]
            return [rest + (("S", node, count + 1, 0),)] if _plain_char(ch) else []
        if esc == 1:
            if ch in '"\\/bfnrt':
                return [rest + (("S", node, count + 1, 0),)]
            return [rest + (("S", node, count, 2),)] if ch == "u" else []
        if ch in _HEX:
            return [rest + ((("S", node, count + 1, 0) if esc == 5 else ("S", node, count, esc + 1)),)]
        return []
    if kind == "V":
        return _start(rest, top[1], top[2], ch)
    if kind == "L":
        trie = top[1]
        out = []
        child = trie.children.get(ch)
        if child is not None:
            out.append(rest + (("L", child),))
        if trie.value is not None:  # the literal may also end here
            for s in _pop(rest, trie.value):
                out += _step(s, ch)
        return out
    if kind == "N":
        return _step_number(stack, top, rest, ch)
    if kind == "A":
        node, count, phase = top[1], top[2], top[3]
        if phase == _OPEN:
            if ch == "]" and node.min_items == 0:
                return _pop(rest)
            return _start(rest + (("A", node, count, _ITEM),), node.item, False, ch) if node.max_items else []
        if phase == _AFTER:
            if ch == "," and count < node.max_items:
                return [rest + (("A", node, count, _COMMA),)]
            return _pop(rest) if ch == "]" and count >= node.min_items else []
        if phase == _COMMA:
            return _start(rest + (("A", node, count, _ITEM),), node.item, True, ch)
        return []
    if kind == "O":
        return _step_object(top, rest, ch)
    if kind == "D":
        node, count, phase = top[1], top[2], top[3]
        if phase in (_OPEN, _COMMA, _COMMA_SP):
            if phase == _OPEN and ch == "}":
                return _pop(rest)
            if phase == _COMMA and ch == " ":
                return [rest + (("D", node, count, _COMMA_SP),)]
            return [rest + (("D", node, count, _KEY), ("S", node.key, 0, 0))] if ch == '"' else []
        if phase == _COLON:
            return [rest + (("D", node, count, _VALUE), ("V", node.value, True))] if ch == ":" else []
        if phase == _AFTER:
            if ch == "," and count < node.max_props:
                return [rest + (("D", node, count, _COMMA),)]
            return _pop(rest) if ch == "}" else []
        return []
    return []  # "T" (finished) accepts nothing


def _step_number(stack: tuple, top: tuple, rest: tuple, ch: str) -> list[tuple]:
    node, phase, digits = top[1], top[2], top[3]
    digit = ch in _DIGITS

    def to(p: int, d: int) -> list[tuple]:
        return [rest + (("N", node, p, d),)]

    def end() -> list[tuple]:  # the number is complete; ch belongs to the parent
        out: list[tuple] = []
        for s in _pop(rest):
            out += _step(s, ch)
        return out

    if phase == _SIGN:
        return to(_ZERO, 1) if ch == "0" else to(_INT, 1) if digit else []
    if phase in (_ZERO, _INT):
        if digit:
            return to(_INT, digits + 1) if phase == _INT and digits < node.int_digits else []
        if not node.integer and ch == ".":
            return to(_DOT, 0)
        if not node.integer and ch in "eE":
            return to(_EXP, 0)
        return end()
    if phase == _DOT:
        return to(_FRAC, 1) if digit else []
    if phase == _FRAC:
        if digit:
            return to(_FRAC, digits + 1) if digits < node.frac_digits else []
        return to(_EXP, 0) if ch in "eE" else end()
    if phase == _EXP:
        return to(_EXP_SIGN, 0) if ch in "+-" else to(_EXP_DIGITS, 1) if digit else []
    if phase == _EXP_SIGN:
        return to(_EXP_DIGITS, 1) if digit else []
    if digit:
        return to(_EXP_DIGITS, digits + 1) if digits < 2 else []
    return end()


def _step_object(top: tuple, rest: tuple, ch: str) -> list[tuple]:
    node, done, phase, key = top[1], top[2], top[3], top[4]
    if phase in (_OPEN, _COMMA, _COMMA_SP):
        if phase == _OPEN and ch == "}":
            return _pop(rest) if node.required <= done else []
        if phase == _COMMA and ch == " ":
            return [rest + (("O", node, done, _COMMA_SP, None),)]
        child = node.key_trie(done).trie.children.get(ch)
        return [rest + (("O", node, done, _KEY, None), ("L", child))] if child is not None else []
    if phase == _COLON:
        return [rest + (("O", node, done, _VALUE, key), ("V", node.props[key], True))] if ch == ":" else []
    if phase == _AFTER:
        if ch == "," and len(done) < len(node.props):
            return [rest + (("O", node, done, _COMMA, None),)]
        return _pop(rest) if ch == "}" and node.required <= done else []
    return []


def _remaining(frame: tuple) -> int:
    """Fewest characters that complete this frame (not counting frames above it)."""
    kind = frame[0]
    if kind == "V":
        return frame[1].min_len
    if kind == "S":
        node, count, esc = frame[1], frame[2], frame[3]
        if esc == 0:
            return max(0, node.min_chars - count) + 1
        pending = 1 if esc == 1 else 6 - esc
        return pending + max(0, node.min_chars - count - 1) + 1
    if kind == "L":
        return frame[1].rem
    if kind == "N":
        return 1 if frame[2] in (_SIGN, _DOT, _EXP, _EXP_SIGN) else 0
    if kind == "Q":
        return sum(item.min_len for item in frame[1].items[frame[2]:])
    if kind == "A":
        node, count, phase = frame[1], frame[2], frame[3]
        need = max(0, node.min_items - count)
        item = node.item.min_len
        if phase == _OPEN:
            return need * item + max(0, need - 1) + 1
        if phase == _ITEM:
            return max(0, need - 1) * (1 + item) + 1
        if phase == _AFTER:
            return need * (1 + item) + 1
        need = max(1, need)
        return need * item + need - 1 + 1
    if kind == "O":
        node, done, phase, key = frame[1], frame[2], frame[3], frame[4]
        missing = node.required - done
        if phase == _OPEN:
            return sum(node.key_len[k] for k in missing) + max(0, len(missing) - 1) + 1 if missing else 1
        if phase == _KEY:
            return 0  # the key trie's weights carry the rest of the object
        if phase == _COLON:
            return 1 + node.props[key].min_len + node.rest_after(done)
        if phase in (_VALUE, _AFTER):
            return node.rest_after(done)
        if missing:
            return sum(node.key_len[k] for k in missing) + len(missing) - 1 + 1
        return min(node.key_len[k] + 1 for k in node.props if k not in done)
    if kind == "D":
        node, phase = frame[1], frame[3]
        if phase in (_KEY, _COLON):
            return 1 + node.value.min_len + 1
        if phase in (_COMMA, _COMMA_SP):
            return node.key.min_len + 1 + node.value.min_len + 1
        return 1
    return 0  # "T", "B" (its literal's trie carries the branch)


def _min_complete(stack: tuple) -> int:
    return sum(_remaining(frame) for frame in stack)


def _step_all(stacks: list[tuple], ch: str) -> list[tuple]:
    if len(stacks) == 1:
        out = _step(stacks[0], ch)
    else:
        out = [s for stack in stacks for s in _step(stack, ch)]
    return list(dict.fromkeys(out)) if len(out) > 1 else out


def _finished(stack: tuple) -> bool:
    """True if the input may end here and nothing else may follow."""
    while True:
        top = stack[-1]
        if top[0] == "T":
            return top[2]
        if top[0] == "L" and top[1].value is not None and not top[1].children:
            popped = _pop(stack[:-1], top[1].value)
            if not popped:
                return False
            stack = popped[0]
            continue
        return False


# ---- grammar + matcher -----------------------------------------------------------------------------
class Grammar:
    """A compiled constraint over one vocabulary; `start()` gives each sequence its Matcher.
    Grammars are immutable and share a cache of per-state token candidates, so reuse them."""

    def __init__(self, root: Node, vocab: TokenVocab, cache_size: int = 20000):
        self.root, self.vocab = root, vocab
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # engines in several threads may share a grammar
        self.min_len = root.min_len

    def start(self) -> Matcher:
        return Matcher(self)

    def candidates(self, stack: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Tokens allowed from `stack`: (ids [K], fewest characters left after each [K], mask [V],
        max of those). Cached per stack."""
        with self._lock:
            hit = self._cache.get(stack)
            if hit is not None:
                self._cache.move_to_end(stack)
                return hit
        ids: list[int] = []
        costs: list[int] = []

        def visit(node: _TrieNode, states: list[tuple]) -> None:
            if node.ids:
                cost = min(_min_complete(s) for s in states)
                ids.extend(node.ids)
                costs.extend([cost] * len(node.ids))
            for ch, child in node.children.items():
                nxt = _step_all(states, ch)
                if nxt:
                    visit(child, nxt)

        visit(self.vocab.trie, [stack])
        entry = _entry(ids, costs, self.vocab.size)
        with self._lock:
            self._cache[stack] = entry
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry


def _entry(ids: list[int], costs: list[int], size: int) -> tuple:
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[ids_t] = True
    return ids_t, torch.tensor(costs, dtype=torch.long), mask, max(costs, default=0)


class Matcher:
    """The state of one constrained sequence: `allowed(remaining)` -> bool mask [V];
    `advance(token_id)`; `done` once the grammar is complete."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        root = grammar.root
        self.states: list[tuple] = [(("T", root, False), ("V", root, False))]
        self.dead = False

    @property
    def done(self) -> bool:
        return self.dead or any(_finished(s) for s in self.states)

    def min_complete(self) -> int:
        return min((_min_complete(s) for s in self.states), default=0)

    def allowed(self, remaining: int) -> torch.Tensor:
        """Tokens that keep the output valid and still completable within `remaining` tokens
        (this one included); if none is, tokens that keep it valid."""
        budget = remaining - 1
        mask = self._mask(budget)
        if not bool(mask.any()):
            mask = self._mask(1 << 30)
            if not bool(mask.any()):  # cannot happen for a well-formed grammar; never return nothing
                mask = torch.ones(self.grammar.vocab.size, dtype=torch.bool)
        return mask

    def _mask(self, budget: int) -> torch.Tensor:
        masks = []
        for stack in self.states:
            top = stack[-1]
            if top[0] == "S" and top[3] == 0:
                masks.append(self._string_mask(stack, top, budget))
                continue
            ids, costs, full, worst = self.grammar.candidates(stack)
            if worst <= budget:
                masks.append(full)
            else:
                m = torch.zeros(self.grammar.vocab.size, dtype=torch.bool)
                m[ids[costs <= budget]] = True
                masks.append(m)
        mask = masks[0]
        for m in masks[1:]:
            mask = mask | m
        return mask

    def _string_mask(self, stack: tuple, top: tuple, budget: int) -> torch.Tensor:
        """Inside a free string: plain tokens by length from the index, quote/backslash tokens simulated."""
        vocab = self.grammar.vocab
        node, count = top[1], top[2]
        room = min(node.max_chars - count, vocab.longest_plain)
        cost = _min_complete(stack)
        need = max(0, node.min_chars - count)  # characters that still lower the cost
        deficit = cost - budget  # how much the cost must drop with this token
        if deficit <= 0:
            mask = vocab.plain_upto[room].clone() if room > 0 else torch.zeros(vocab.size, dtype=torch.bool)
        elif need >= deficit and room >= deficit:
            mask = vocab.plain_upto[room] & ~vocab.plain_upto[deficit - 1]
        else:
            mask = torch.zeros(vocab.size, dtype=torch.bool)
        for tid, text in vocab.quote_tokens:
            states = [stack]
            for ch in text:
                states = _step_all(states, ch)
                if not states:
                    break
            if states and min(_min_complete(s) for s in states) <= budget:
                mask[tid] = True
        return mask

    def advance(self, token_id: int) -> None:
        text = self.grammar.vocab.strings[token_id] if 0 <= token_id < self.grammar.vocab.size else None
        states = self.states
        if text is None or self.dead:
            self.dead = True
            return
        for ch in text:
            states = _step_all(states, ch)
            if not states:
                self.dead = True
                return
        self.states = states


# ---- grammars for the server ------------------------------------------------------------------------
def json_grammar(tokenizer: Any, schema: Any = None, limits: Limits = Limits()) -> Grammar:
    """JSON matching `schema` (None: any JSON object) followed by <|im_end|>."""
    node = schema_node(schema if schema is not None else {"type": "object"}, limits)
    return Grammar(Seq([node, Lit([IM_END])]), TokenVocab.of(tokenizer))


def tool_call_grammar(tokenizer: Any, tools: Sequence[dict], names: Sequence[str] | None = None,
                      first_index: int = 0, max_calls: int | None = None,
                      limits: Limits = Limits()) -> Grammar:
    """A K2 tool-call section of 1..max_calls calls to `names` (default: every tool), ids
    `functions.{name}:{first_index + j}`, arguments valid for each tool's `parameters`; then <|im_end|>."""
    schemas: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not name or not isinstance(name, str):
            raise SchemaError(f"tools[{i}] is not a function tool with a name: {tool!r}")
        schemas[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    names = list(names) if names is not None else list(schemas)
    for name in names:
        if name not in schemas:
            raise SchemaError(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(schemas)})")
    if not names:
        raise SchemaError("a tool call was required but no tools were given")
    args = {}
    for name in names:
        try:
            args[name] = schema_node(schemas[name], limits)
        except SchemaError as e:
            raise SchemaError(f"tool {name!r} parameters: {e}") from None
    max_calls = max_calls or limits.tool_calls

    def call(j: int) -> Branch:
        return Branch({f"{CALL_BEGIN}functions.{name}:{first_index + j}{ARG_BEGIN}":
                       Seq([args[name], Lit([CALL_END])]) for name in names})

    tail: Node = Lit([SECTION_END])
    for j in range(max_calls - 1, 0, -1):
        tail = Union([Lit([SECTION_END]), Seq([call(j), tail])])
    root = Seq([Lit([SECTION_BEGIN]), call(0), tail, Lit([IM_END])])
    vocab = TokenVocab.of(tokenizer)
    for char in (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END):
        if vocab.marker_id(char) is None:
            raise SchemaError("the tokenizer lacks the K2 tool-call special tokens")
    return Grammar(root, vocab)
