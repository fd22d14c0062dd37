"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, SSE streaming).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
Chat requests are rendered and parsed by `openk2.data.chat` (K2's template and tool-call
tokens); `tool_choice` "required" or a named function, and `response_format` json_object /
json_schema, decode under a grammar from `openk2.infer.constrain`; "none" bans the tool-call
section tokens. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`:
400 for bad JSON or fields and prompts longer than the context, 401 for a wrong API key, 404 for
an unknown model. The engine batches continuously, so concurrent requests share decode steps.
`serve` (`openk2 serve`) steps the engine in the main thread and runs uvicorn in a helper thread:
on CPU, OpenMP runs torch's mid-sized ops about twice as slowly from a non-main thread, and the
event loop's work is light. `create_app` alone (tests, embedding) starts the engine's own thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openk2.data.chat import (
    ChatFormatError,
    ToolCallStreamParser,
    assign_tool_call_ids,
    encode_chat,
    parse_assistant,
)
from openk2.infer.constrain import Grammar, json_grammar, token_bytes, tool_call_grammar
from openk2.infer.engine import Completion, Engine, EngineError, SamplingParams
from openk2.infer.schema import SchemaError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---- request fields ---------------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def _get(body: dict, name: str, types: type | tuple[type, ...], default: Any = None, check=None,
         why: str = "") -> Any:
    """body[name] checked against types (bools are not numbers) and `check`; `why` names the rule."""
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = why or " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types))
        raise _bad(f"'{name}' must be {expected}, got {value!r}", name, "invalid_type")
    if check is not None and not check(value):
        raise _bad(f"'{name}' must be {why}, got {value!r}", name, "invalid_value")
    return value


def _sampling(body: dict, engine: Engine, prompt_len: int) -> SamplingParams:
    at_least_one = (lambda v: v >= 1, "an integer >= 1")
    max_tokens = _get(body, "max_completion_tokens", int, None, *at_least_one)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, None, *at_least_one)
    room = engine.max_len - prompt_len
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise _bad(f"This model's maximum context length is {engine.max_len} tokens. However, you requested "
                   f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                   f"completion). Please reduce the prompt or the completion length.",
                   "max_tokens", "context_length_exceeded")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"'stop' must be a non-empty string or an array of them, got {stop!r}", "stop",
                   "invalid_type")
    logit_bias = None
    if bias := _get(body, "logit_bias", dict):
        try:
            logit_bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise _bad("'logit_bias' must map token ids to numbers", "logit_bias", "invalid_type") from None
        if not all(0 <= k < engine.vocab_size and abs(v) <= 100 for k, v in logit_bias.items()):
            raise _bad(f"'logit_bias' keys must be token ids below {engine.vocab_size} and values in "
                       f"[-100, 100]", "logit_bias", "invalid_value")
    number = (int, float)
    temperature = _get(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(_get(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=_get(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
        seed=_get(body, "seed", int),
        stop=stop,
        logit_bias=logit_bias,
    )


def _n(body: dict) -> int:
    return _get(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")


# ---- the app ----------------------------------------------------------------------------------
class _State:
    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.created = int(time.time())
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.grammar_lock = threading.Lock()

    def grammar(self, key: Any, build) -> Grammar:
        """Grammars are cached: their per-state token candidates carry over between requests."""
        text = json.dumps(key, sort_keys=True, default=str)
        with self.grammar_lock:
            if (grammar := self.grammars.get(text)) is not None:
                self.grammars.move_to_end(text)
                return grammar
        grammar = build()
        with self.grammar_lock:
            self.grammars[text] = grammar
            if len(self.grammars) > 64:
                self.grammars.popitem(last=False)
        return grammar


def create_app(engine: Engine, tokenizer: Any, model_name: str = "openk2",
               api_key: str | None = None, start_engine: bool = True) -> FastAPI:
    """The FastAPI app. With `start_engine` it starts the engine's background thread on startup
    and stops it on shutdown; without, the caller steps the engine (`Engine.run`, as `serve`)."""
    state = _State(engine, tokenizer, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="openk2", lifespan=lifespan)
    app.state.openk2 = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _bad(str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), None, None, kind).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return APIError(500, f"{type(exc).__name__}: {exc}", None, None, "server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return APIError(401, "Incorrect API key provided.", None, "invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "running": engine.num_running,
                "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _chat(state, await _json_body(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completions(state, await _json_body(request))

    return app


def _model_card(state: _State) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "openk2",
            "max_model_len": state.engine.max_len}


def _check_model(state: _State, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise _bad("'model' is required: a model id from GET /v1/models", "model", "invalid_type")
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
                       "model", "model_not_found")


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"The request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object", None, "invalid_json")
    return body


def _context_error(state: _State, prompt_len: int, param: str) -> APIError:
    return _bad(f"This model's maximum context length is {state.engine.max_len} tokens. However, your "
                f"{param} resulted in {prompt_len} tokens, leaving no room for the completion. Please reduce "
                f"the length of the {param}.", param, "context_length_exceeded")


def _submit(state: _State, prompt: list[int], params: SamplingParams, n: int, stream: bool) -> list:
    loop = asyncio.get_running_loop()
    try:
        return [state.engine.submit(prompt, params, index=k, stream=stream, loop=loop) for k in range(n)]
    except ValueError as e:
        raise _bad(str(e)) from None


async def _results(handles: list) -> list[Completion]:
    try:
        return [await h.aresult() for h in handles]
    except asyncio.CancelledError:
        for h in handles:
            h.cancel()
        raise
    except EngineError as e:
        raise APIError(500, f"generation failed: {e}", None, None, "server_error") from None


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _sse_error(error: Exception) -> str:
    return _sse({"error": {"message": str(error), "type": "server_error", "param": None, "code": None}})


async def _merged(handles: list):
    """(choice index, Delta | EngineError) from every handle, as they come, until all end."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for delta in handle:
                await queue.put((i, delta))
        except EngineError as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            item = await queue.get()
            if item[1] is None:  # that handle's end
                remaining -= 1
            else:
                yield item
    finally:  # the client went away, or we are done
        for h in handles:
            if not h.done:
                h.cancel()
        for t in tasks:
            t.cancel()


# ---- chat -------------------------------------------------------------------------------------
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of message objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        if m.get("role") not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}, got {m.get('role')!r}",
                       f"{where}.role", "invalid_value")
        if m.get("content") is not None and not isinstance(m["content"], (str, list)):
            raise _bad(f"{where}.content must be a string, an array of parts or null", f"{where}.content",
                       "invalid_type")
        m = dict(m, role={"developer": "system", "function": "tool"}.get(m["role"], m["role"]))
        for j, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _bad(f"{where}.tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                           f"{{'name', 'arguments'}}}}", f"{where}.tool_calls[{j}]", "invalid_type")
            function.setdefault("arguments", "{}")
        out.append(m)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array of function tools", "tools", "invalid_type")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not name or not isinstance(name, str):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', "
                       f"'parameters'}}}}", f"tools[{i}]", "invalid_type")
        if not isinstance(function.get("parameters", {}), (dict, type(None))):
            raise _bad(f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}]",
                       "invalid_type")
    return tools


def _constraint(state: _State, body: dict, tools: list[dict] | None,
                messages: list[dict]) -> tuple[Grammar | None, dict | None]:
    """The grammar the reply must follow (or None) and a logit bias for tool_choice "none"."""
    choice, tok = body.get("tool_choice"), state.tokenizer
    if choice is not None and tools is None and choice != "none":
        raise _bad("'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
    names = None
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type", "function") == "function" else None
        names = [function.get("name")] if isinstance(function, dict) else [None]
        if not isinstance(names[0], str):
            raise _bad("'tool_choice' must be none, auto, required or {'type': 'function', 'function': "
                       "{'name'}}", "tool_choice", "invalid_value")
    elif choice not in (None, "none", "auto", "required"):
        raise _bad(f"'tool_choice' must be none, auto, required or a named function, got {choice!r}",
                   "tool_choice", "invalid_value")
    if tools is not None and (choice == "required" or names is not None):
        first = sum(len(m.get("tool_calls") or []) for m in messages)  # ids unique in the dialogue
        max_calls = 1 if body.get("parallel_tool_calls", True) is False else None
        key = ("tools", tools, names, first, max_calls)
        try:
            return state.grammar(key, lambda: tool_call_grammar(tok, tools, names, first, max_calls)), None
        except SchemaError as e:
            param = "tool_choice" if "tool_choice" in str(e) else "tools"
            raise _bad(str(e), param, "invalid_value") from None
    bias = None
    if tools is not None and choice == "none":
        bias = {tok.tool_calls_section_begin_id: float("-inf"), tok.tool_call_begin_id: float("-inf")}
    fmt = body.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None, bias
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise _bad("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                   "response_format", "invalid_value")
    schema = None
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise _bad("'response_format.json_schema' must be {'name', 'schema': {...}}", "response_format",
                       "invalid_value")
        schema = spec.get("schema") or True
    try:
        return state.grammar(("json", schema), lambda: json_grammar(tok, schema)), bias
    except SchemaError as e:
        raise _bad(f"response_format schema: {e}", "response_format", "invalid_value") from None


def _logprob_entries(state: _State, ids: list[int], logprobs: list[float],
                     tops: list[list[tuple[int, float]]] | None) -> list[dict]:
    tok = state.tokenizer

    def entry(tid: int, logprob: float) -> dict:
        return {"token": tok.decode([tid]), "logprob": logprob, "bytes": list(token_bytes(tok, tid))}

    return [{**entry(tid, lp), "top_logprobs": [entry(t, v) for t, v in (tops[i] if tops else [])]}
            for i, (tid, lp) in enumerate(zip(ids, logprobs))]


def _chat_finish(completion: Completion, has_calls: bool) -> str:
    if completion.finish_reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


async def _chat(state: _State, body: dict) -> Any:
    _check_model(state, body.get("model"))
    messages = assign_tool_call_ids(_messages(body))
    tools = _tools(body)
    stream = _get(body, "stream", bool, False)
    want_logprobs = _get(body, "logprobs", bool, False)
    top_logprobs = _get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
    n = _n(body)
    try:
        prompt, _ = encode_chat(state.tokenizer, messages, tools, add_generation_prompt=True)
    except (ChatFormatError, KeyError, TypeError) as e:
        raise _bad(f"cannot render messages: {e}", "messages", "invalid_value") from None
    if len(prompt) >= state.engine.max_len:
        raise _context_error(state, len(prompt), "messages")
    params = _sampling(body, state.engine, len(prompt))
    params.constraint, bias = _constraint(state, body, tools, messages)
    if bias:
        params.logit_bias = {**(params.logit_bias or {}), **bias}
    if want_logprobs:
        params.top_logprobs = top_logprobs
    if params.constraint is not None:
        params.stop = []  # the grammar decides where the reply ends
    handles = _submit(state, prompt, params, n, stream)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _chat_stream(state, handles, rid, created, len(prompt), want_logprobs, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    completions = await _results(handles)
    choices = []
    for i, c in enumerate(completions):
        content, tool_calls = parse_assistant(c.text or "")
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
        if tool_calls:
            message["tool_calls"] = tool_calls
        logprobs = None
        if want_logprobs:
            logprobs = {"content": _logprob_entries(state, c.text_token_ids, c.logprobs, c.top_logprobs)}
        choices.append({"index": i, "message": message, "finish_reason": _chat_finish(c, bool(tool_calls)),
                        "logprobs": logprobs})
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(len(prompt), completions), "system_fingerprint": None}


async def _chat_stream(state: _State, handles: list, rid: str, created: int, prompt_len: int,
                       want_logprobs: bool, include_usage: bool):
    def chunk(choices: list[dict], **extra: Any) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": state.model_name, "choices": choices, "system_fingerprint": None, **extra})

    def choice(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
        return chunk([{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}])

    parsers = [ToolCallStreamParser() for _ in handles]
    saw_calls = [False] * len(handles)
    for i in range(len(handles)):
        yield choice(i, {"role": "assistant", "content": ""})
    async for i, delta in _merged(handles):
        if isinstance(delta, Exception):
            yield _sse_error(delta)
            continue
        parsed = parsers[i].feed(delta.text)
        if delta.finish_reason is not None:
            tail = parsers[i].finish()
            parsed.content += tail.content
            parsed.tool_calls += tail.tool_calls
        out: dict[str, Any] = {}
        if parsed.content:
            out["content"] = parsed.content
        if parsed.tool_calls:
            out["tool_calls"] = parsed.tool_calls
            saw_calls[i] = True
        logprobs = None
        if want_logprobs and delta.token_ids and not isinstance(delta.stop_reason, int):
            entries = _logprob_entries(state, delta.token_ids, delta.logprobs, delta.top_logprobs)
            logprobs = {"content": entries}
        if out or logprobs:
            yield choice(i, out, None, logprobs)
        if delta.finish_reason is not None:
            finish = "length" if delta.finish_reason == "length" else "tool_calls" if saw_calls[i] else "stop"
            yield choice(i, {}, finish)
    if include_usage:
        completions = [h.completion for h in handles if h.completion is not None]
        yield chunk([], usage=_usage(prompt_len, completions))
    yield "data: [DONE]\n\n"


# ---- completions ------------------------------------------------------------------------------
def _prompts(state: _State, body: dict) -> list[list[int]]:
    prompt, vocab = body.get("prompt"), state.engine.vocab_size

    def ids_of(p: Any) -> list[int]:
        if isinstance(p, str):
            return state.tokenizer.encode(p)
        if isinstance(p, list) and p and all(type(t) is int for t in p):
            if not all(0 <= t < vocab for t in p):
                raise _bad(f"prompt token ids must be in [0, {vocab})", "prompt", "invalid_value")
            return p
        raise _bad("'prompt' must be a string, an array of token ids, or an array of either",
                   "prompt", "invalid_type")

    batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    prompts = [ids_of(p) for p in prompt] if batch else [ids_of(prompt)]
    for p in prompts:
        if not p:
            raise _bad("the prompt is empty", "prompt", "invalid_value")
        if len(p) >= state.engine.max_len:
            raise _context_error(state, len(p), "prompt")
    return prompts


def _legacy_logprobs(state: _State, ids: list[int], logprobs: list[float], tops) -> dict:
    tokens = [state.tokenizer.decode([t]) for t in ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{state.tokenizer.decode([t]): v for t, v in row} for row in tops[: len(ids)]] if tops else None
    return {"tokens": tokens, "token_logprobs": logprobs[: len(ids)], "top_logprobs": top,
            "text_offset": offsets}


async def _completions(state: _State, body: dict) -> Any:
    _check_model(state, body.get("model"))
    prompts = _prompts(state, body)
    stream = _get(body, "stream", bool, False)
    n = _n(body)
    want = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
    echo = _get(body, "echo", bool, False)
    if echo and stream:
        raise _bad("'echo' is not supported with 'stream'", "echo", "invalid_value")
    handles = []
    for p in prompts:
        params = _sampling(body, state.engine, len(p))
        params.top_logprobs = want or 0
        handles += _submit(state, p, params, n, stream)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
        events = _completion_stream(state, handles, rid, created, want)
        return StreamingResponse(events, media_type="text/event-stream")
    completions = await _results(handles)
    choices = []
    for i, c in enumerate(completions):
        text = (state.tokenizer.decode(c.prompt_token_ids) if echo else "") + (c.text or "")
        logprobs = None
        if want is not None:
            logprobs = _legacy_logprobs(state, c.text_token_ids, c.logprobs, c.top_logprobs)
        choices.append({"index": i, "text": text, "logprobs": logprobs,
                        "finish_reason": "length" if c.finish_reason == "length" else "stop"})
    return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(sum(len(p) for p in prompts) * n, completions)}


async def _completion_stream(state: _State, handles: list, rid: str, created: int, want: int | None):
    async for i, delta in _merged(handles):
        if isinstance(delta, Exception):
            yield _sse_error(delta)
            continue
        finish = {None: None, "length": "length"}.get(delta.finish_reason, "stop")
        logprobs = None
        if want is not None:
            logprobs = _legacy_logprobs(state, delta.token_ids, delta.logprobs, delta.top_logprobs)
        if delta.text or finish:
            choice = {"index": i, "text": delta.text, "logprobs": logprobs, "finish_reason": finish}
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                        "choices": [choice]})
    yield "data: [DONE]\n\n"


# ---- running it -------------------------------------------------------------------------------
def load_engine(path: str | Path, max_batch: int = 32, max_len: int | None = None,
                dtype: Any = None) -> tuple[Engine, Any]:
    """Model and tokenizer from a checkpoint folder (openk2.save_model + K2Tokenizer.save)."""
    from openk2.data.tokenizer import K2Tokenizer
    from openk2.model import load_model

    path = Path(path)
    tokenizer = K2Tokenizer.load(path)
    model = load_model(path, dtype=dtype)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}; save the matching tokenizer into the "
                         f"checkpoint folder")
    return Engine(model, tokenizer, max_batch=max_batch, max_len=max_len), tokenizer


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 32, max_len: int | None = None,
          log_level: str = "info") -> None:
    """`openk2 serve PATH`: serve a checkpoint folder until interrupted. The API key defaults to
    $OPENK2_API_KEY; without one, no key is required (bind to loopback, the default)."""
    import uvicorn

    engine, tokenizer = load_engine(path, max_batch, max_len)
    api_key = api_key or os.environ.get("OPENK2_API_KEY") or None
    app = create_app(engine, tokenizer, model_name or Path(path).resolve().name, api_key, start_engine=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    failed: list[BaseException] = []

    def run_http() -> None:
        try:
            server.run()  # outside the main thread uvicorn leaves the signal handlers alone
        except BaseException as e:  # e.g. SystemExit(1) when the port is taken (uvicorn logged why)
            failed.append(e)
        finally:
            engine.stop()

    http = threading.Thread(target=run_http, name="openk2-http", daemon=True)
    main = threading.current_thread() is threading.main_thread()  # only there may handlers be set
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    http.start()
    try:
        engine.run()  # returns when the HTTP thread ends
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: let uvicorn finish the open requests
        server.should_exit = True
        _drain(engine, server, http)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        http.join(timeout=30)
    if failed or not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the message above): is the port in use?")


def wait_until_serving(url: str, process: Any = None, timeout: float = 120.0) -> None:
    """Block until `GET {url}/health` answers, e.g. for `openk2 serve` started in a subprocess.
    RuntimeError if `process` (a `subprocess.Popen`) exits first or `timeout` seconds pass."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server at {url} exited with code {process.returncode} "
                                   "before it answered") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _drain(engine: Engine, server: Any, http: threading.Thread) -> None:
    """Step the engine while uvicorn finishes the open requests; a second interrupt stops at once."""
    try:
        while http.is_alive():
            if not engine.step():
                http.join(timeout=0.05)
    except KeyboardInterrupt:
        server.force_exit = True


class BackgroundServer:
    """uvicorn in a thread on a free port (tests, benchmarks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
