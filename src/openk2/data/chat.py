"""K2's chat format: render, token-level loss masks, tool-call parsing (K2_SPEC §7).

The one place that knows the format; SFT, RL, the server and the chat CLI all go through it.

    <|im_system|>tool_declare<|im_middle|>{tools JSON, compact}<|im_end|>      only with tools
    <|im_system|>system<|im_middle|>{default_system}<|im_end|>\\n              only if the first
                                                                              message is not system
    <|im_{class}|>{name or role}<|im_middle|>{body}<|im_end|>                 every message
    <|im_assistant|>assistant<|im_middle|>                                    generation prompt

An assistant body is its content, then (with tool calls) the section
`<|tool_calls_section_begin|>` + `<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}
<|tool_call_end|>` per call + `<|tool_calls_section_end|>`. A tool result body is
`## Return of {tool_call_id}\\n{content}`.

`render` reproduces the released Kimi-K2-Instruct template as transformers renders it
(trim_blocks, lstrip_blocks), including one whitespace artefact: the released template leaves a
"\\n" after the inserted default system turn (its `{% endif %}` keeps the line break). `render`
keeps it so prompts are byte-identical to `apply_chat_template` on the released template.
`CHAT_TEMPLATE` is the same format as Jinja, written into tokenizer_config.json.

Parsing is one state machine (`ToolCallStreamParser`) used both for streaming and for whole
texts (`parse_assistant`), so the two agree by construction on any split of the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from openk2.data.tokenizer import (
    IM_ASSISTANT,
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    IM_USER,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

DEFAULT_SYSTEM = "You are a helpful assistant."
K2_DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."  # the released template's
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"

# Variants seen from deployed models, accepted by the parser but never rendered.
TOOL_CALL_SECTION_BEGIN_SINGULAR = "<|tool_call_section_begin|>"
TOOL_CALL_SECTION_END_SINGULAR = "<|tool_call_section_end|>"


class ChatFormatError(ValueError):
    """A message list cannot be rendered; the message says which message and why."""


# ---- render ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A run of rendered text: one special marker, or plain text between markers."""

    text: str
    special: bool  # a single special token
    assistant: bool  # produced by the assistant (trained on in SFT)


def _jinja_str(value: Any) -> str:
    """How `{{ value }}` prints a present value (a missing key prints as "")."""
    return value if isinstance(value, str) else str(value)


def _content_text(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"message {index}: content must be a string, a list of parts or None")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise ChatFormatError(f"message {index}: content part {part!r} is not a dict")
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            raise ChatFormatError(f"message {index}: openk2 renders text only, got an image part")
        texts.append(_jinja_str(part["text"]) if "text" in part else "")
    return "".join(texts)


def _arguments_text(tool_call: dict, index: int) -> str:
    function = tool_call.get("function")
    if not isinstance(function, dict) or "arguments" not in function:
        raise ChatFormatError(f"message {index}: tool call {tool_call!r} has no function.arguments")
    arguments = function["arguments"]
    # A string is the model's raw JSON text; anything else is dumped as transformers' `tojson` does.
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def render_pieces(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> list[Piece]:
    """The rendered dialogue as pieces; `render` joins them, `encode_chat` tokenizes them."""
    pieces: list[Piece] = []

    def turn(opener: str, name: str, body: list[Piece], assistant: bool = False) -> None:
        pieces.extend([Piece(opener, True, False), Piece(name, False, False), Piece(IM_MIDDLE, True, False)])
        pieces.extend(body)
        pieces.append(Piece(IM_END, True, assistant))

    if tools:
        declaration = json.dumps(list(tools), separators=(",", ":"), ensure_ascii=False)
        turn(IM_SYSTEM, "tool_declare", [Piece(declaration, False, False)])
    for index, message in enumerate(messages):
        if "role" not in message:
            raise ChatFormatError(f"message {index} has no 'role': {message!r}")
        role = message["role"]
        if index == 0 and role != "system" and default_system is not None:
            turn(IM_SYSTEM, "system", [Piece(default_system, False, False)])
            pieces.append(Piece("\n", False, False))  # the released template's artefact, see docstring
        name = _jinja_str(message.get("name") or role)
        opener = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
        is_assistant = role == "assistant"
        body: list[Piece] = []
        if is_assistant and message.get("tool_calls"):
            body.append(Piece(_content_text(message, index), False, True))
            body.append(Piece(TOOL_CALLS_SECTION_BEGIN, True, True))
            for tool_call in message["tool_calls"]:
                call_id = _jinja_str(tool_call["id"]) if "id" in tool_call else ""
                body += [
                    Piece(TOOL_CALL_BEGIN, True, True),
                    Piece(call_id, False, True),
                    Piece(TOOL_CALL_ARGUMENT_BEGIN, True, True),
                    Piece(_arguments_text(tool_call, index), False, True),
                    Piece(TOOL_CALL_END, True, True),
                ]
            body.append(Piece(TOOL_CALLS_SECTION_END, True, True))
        elif role == "tool":
            call_id = _jinja_str(message["tool_call_id"]) if "tool_call_id" in message else ""
            body.append(Piece(f"## Return of {call_id}\n{_content_text(message, index)}", False, False))
        else:
            body.append(Piece(_content_text(message, index), False, is_assistant))
        turn(opener, name, body, assistant=is_assistant)
    if add_generation_prompt:
        pieces += [
            Piece(IM_ASSISTANT, True, False),
            Piece("assistant", False, False),
            Piece(IM_MIDDLE, True, False),
        ]
    return pieces


def render(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> str:
    """The K2 chat string of `messages` (OpenAI-style dicts). `default_system=None` inserts no
    system turn. Tool-call ids are rendered as given: see `assign_tool_call_ids`."""
    return "".join(p.text for p in render_pieces(messages, tools, add_generation_prompt, default_system))


# The same format as Jinja, for tokenizer_config.json: transformers' `apply_chat_template`
# produces exactly `render`'s string. `default_system` may be passed as a template variable.
CHAT_TEMPLATE = (
    "{%- if default_system is not defined -%}{%- set default_system = " + json.dumps(DEFAULT_SYSTEM) + " -%}"
    "{%- endif -%}"
    """
{%- macro text_of(message) -%}
  {%- set c = message.get('content') -%}
  {%- if c is string -%}{{ c }}
  {%- elif c is not none -%}
    {%- for part in c -%}
      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
        {{- raise_exception('openk2 renders text only, got an image part') -}}
      {%- else -%}{{ part['text'] }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' and default_system is not none -%}
    <|im_system|>system<|im_middle|>{{ default_system }}<|im_end|>{{ '\\n' }}
  {%- endif -%}
  {%- set name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}<|im_user|>
  {%- elif message['role'] == 'assistant' -%}<|im_assistant|>
  {%- else -%}<|im_system|>
  {%- endif -%}
  {{ name }}<|im_middle|>
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{ text_of(message) }}<|tool_calls_section_begin|>
    {%- for call in message['tool_calls'] -%}
      <|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>
      {%- if call['function']['arguments'] is string -%}{{ call['function']['arguments'] }}
      {%- else -%}{{ call['function']['arguments'] | tojson }}
      {%- endif -%}
      <|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message['tool_call_id'] }}{{ '\\n' }}{{ text_of(message) }}
  {%- else -%}
    {{ text_of(message) }}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""
)


# ---- tool-call ids -----------------------------------------------------------------------------
def assign_tool_call_ids(messages: Sequence[dict]) -> list[dict]:
    """A copy of `messages` where tool calls without an id get `functions.{name}:{index}`, the
    index counting calls across the whole dialogue (K2 paper, Appendix B) and skipping ids already
    taken; tool results without a `tool_call_id` get the id of the earliest unanswered call of the
    assistant turn before them (the one with the same `name` if the result has a name)."""
    taken = {str(call["id"]) for m in messages for call in (m.get("tool_calls") or []) if call.get("id")}
    out: list[dict] = []
    counter = 0
    pending: list[tuple[str, Any]] = []  # (id, name) of calls not yet answered
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls, pending = [], []
            for call in message["tool_calls"]:
                call = dict(call)
                name = (call.get("function") or {}).get("name")
                if not call.get("id"):
                    while f"functions.{name}:{counter}" in taken:
                        counter += 1
                    call["id"] = f"functions.{name}:{counter}"
                    taken.add(call["id"])
                counter += 1
                calls.append(call)
                pending.append((str(call["id"]), name))
            message["tool_calls"] = calls
        elif message.get("role") == "tool":
            if message.get("tool_call_id"):
                pending = [p for p in pending if p[0] != str(message["tool_call_id"])]
            elif pending:
                wanted = message.get("name")
                k = next((i for i, (_, name) in enumerate(pending) if wanted and name == wanted), 0)
                message["tool_call_id"] = pending.pop(k)[0]
        out.append(message)
    return out


# ---- encode with loss masks --------------------------------------------------------------------
class SupportsChatEncoding(Protocol):
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def token_id(self, name: str) -> int: ...


def encode_chat(
    tokenizer: SupportsChatEncoding,
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered dialogue and a mask that is True exactly on the assistant's
    tokens: its content, its tool-call section and its closing <|im_end|> (not its header).

    Markers are encoded as their special ids and text between them as plain text, so marker
    text inside a message never becomes a special token. For text without marker strings the ids
    equal `tokenizer.encode(render(...), allow_special=True)`: every piece boundary touches a
    special token, where the tokenizer splits anyway.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for piece in _merge_plain(render_pieces(messages, tools, add_generation_prompt, default_system)):
        piece_ids = [tokenizer.token_id(piece.text)] if piece.special else tokenizer.encode(piece.text)
        ids += piece_ids
        mask += [piece.assistant] * len(piece_ids)
    return ids, mask


def _merge_plain(pieces: Iterable[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if not piece.special and merged and not merged[-1].special:
            if merged[-1].assistant != piece.assistant:
                raise AssertionError("a mask boundary fell between two plain-text pieces")
            merged[-1] = Piece(merged[-1].text + piece.text, False, piece.assistant)
        else:
            merged.append(piece)
    return merged


# ---- parse -------------------------------------------------------------------------------------
_SECTION_BEGINS = (TOOL_CALLS_SECTION_BEGIN, TOOL_CALL_SECTION_BEGIN_SINGULAR)
_SECTION_ENDS = (TOOL_CALLS_SECTION_END, TOOL_CALL_SECTION_END_SINGULAR)
_MARKERS = (
    IM_END,
    *_SECTION_BEGINS,
    *_SECTION_ENDS,
    TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_END,
)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS))
_NAME = r"[\w.\-]+"
_ID_FORMS = [  # tried in order; the first full match gives the function name
    re.compile(rf"functions\.(?P<name>{_NAME}?):\d+"),  # functions.get_weather:0 (K2)
    re.compile(rf"functions_(?P<name>{_NAME}?)_\d+"),  # functions_get_weather_0 (sanitised by clients)
    re.compile(rf"(?P<name>{_NAME}?):\d+"),  # get_weather:0
    re.compile(rf"functions\.(?P<name>{_NAME})"),  # functions.get_weather
    re.compile(rf"(?P<name>{_NAME})"),  # get_weather
]


def function_name_from_id(call_id: str) -> str | None:
    """The function name inside a tool-call id, or None if the id has none of the known forms."""
    for form in _ID_FORMS:
        match = form.fullmatch(call_id)
        if match:
            return match.group("name")
    return None


@dataclass
class ChatDelta:
    """What one chunk of generated text added: content text and OpenAI-style tool-call deltas
    (`{"index", "id", "type", "function": {"name", "arguments"}}` when a call starts, then
    `{"index", "function": {"arguments"}}` as its arguments grow)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


_CONTENT, _SECTION, _CALL_ID, _CALL_ARGS, _CALL_SKIP, _DONE = range(6)


class ToolCallStreamParser:
    """Splits an assistant's generated text into content and tool calls, chunk by chunk.

    `feed(text)` returns the `ChatDelta` that the new text settles; a trailing piece that could
    still grow into a marker is held back until the next chunk or `finish()`. Tolerant by design,
    it never raises: text outside tool-call sections is content; a section opens at
    <|tool_calls_section_begin|>, its singular variant, or a bare <|tool_call_begin|>, and closes at
    a section end marker (or never); a call counts once its id (any form `function_name_from_id`
    knows) is followed by <|tool_call_argument_begin|>, and its arguments are the raw text up to
    <|tool_call_end|>, the next call, the section end or the end of the text; <|im_end|> ends the
    message. Stray markers are dropped.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state = _CONTENT
        self._call_id = ""
        self._content: list[str] = []
        self._calls: list[dict] = []
        self._delta = ChatDelta()

    # aggregated results so far
    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[dict]:
        return [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": "".join(c["args"])},
            }
            for c in self._calls
        ]

    def feed(self, text: str) -> ChatDelta:
        self._buffer += text
        while True:
            match = _MARKER_RE.search(self._buffer)
            if match is None:
                break
            self._text(self._buffer[: match.start()])
            self._marker(match.group())
            self._buffer = self._buffer[match.end() :]
        keep = _partial_marker_start(self._buffer)
        self._text(self._buffer[:keep])
        self._buffer = self._buffer[keep:]
        return self._take_delta()

    def finish(self) -> ChatDelta:
        """Flush held-back text: the generation has ended, so no marker can complete."""
        self._text(self._buffer)
        self._buffer = ""
        return self._take_delta()

    def _take_delta(self) -> ChatDelta:
        delta, self._delta = self._delta, ChatDelta()
        return delta

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state == _CONTENT:
            self._content.append(text)
            self._delta.content += text
        elif self._state == _CALL_ID:
            self._call_id += text
        elif self._state == _CALL_ARGS:
            index = len(self._calls) - 1
            self._calls[index]["args"].append(text)
            last = self._delta.tool_calls[-1] if self._delta.tool_calls else None
            if last is not None and last["index"] == index:
                last["function"]["arguments"] += text
            else:
                self._delta.tool_calls.append({"index": index, "function": {"arguments": text}})
        # _SECTION, _CALL_SKIP, _DONE: text there is not part of the message

    def _marker(self, marker: str) -> None:
        state = self._state
        if state == _DONE:
            return
        if marker == IM_END:
            self._state = _DONE
        elif marker == TOOL_CALL_BEGIN:
            self._state, self._call_id = _CALL_ID, ""
        elif marker in _SECTION_BEGINS:
            self._state = _SECTION
        elif marker in _SECTION_ENDS:
            self._state = _CONTENT
        elif marker == TOOL_CALL_END:
            if state != _CONTENT:
                self._state = _SECTION
        elif marker == TOOL_CALL_ARGUMENT_BEGIN and state == _CALL_ID:
            call_id = self._call_id.strip()
            name = function_name_from_id(call_id)
            if name is None:
                self._state = _CALL_SKIP
                return
            index = len(self._calls)
            self._calls.append({"id": call_id, "name": name, "args": []})
            self._delta.tool_calls.append(
                {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
            self._state = _CALL_ARGS


def _partial_marker_start(text: str) -> int:
    """Index where a suffix of `text` that is a proper prefix of some marker begins, else len(text)."""
    start = max(0, len(text) - max(map(len, _MARKERS)) + 1)
    while True:
        start = text.find("<", start)
        if start < 0:
            return len(text)
        tail = text[start:]
        if any(m.startswith(tail) for m in _MARKERS):
            return start
        start += 1


def parse_assistant(text: str) -> tuple[str, list[dict]]:
    """Content and OpenAI-style tool calls (`{"id", "type": "function", "function": {"name",
    "arguments": raw JSON text}}`) of one generated assistant message. Never raises; see
    `ToolCallStreamParser` for what it tolerates."""
    parser = ToolCallStreamParser()
    parser.feed(text if isinstance(text, str) else "" if text is None else str(text))
    parser.finish()
    return parser.content, parser.tool_calls
