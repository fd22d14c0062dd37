"""The OpenAI-compatible server, driven by the official `openai` client over loopback, and the
terminal chat's tools."""

import json
import random
import threading

import openai
import pytest

from openk2 import build_model, preset, save_model
from openk2.data.chat import encode_chat, parse_assistant
from openk2.data.tokenizer import K2Tokenizer, train_tokenizer
from openk2.infer import SamplingParams
from openk2.infer.chat_cli import BUILTIN_TOOLS, CalculatorError, ChatSession, calculate, run_tool
from openk2.infer.server import BackgroundServer, create_app, load_engine, wait_until_serving

VOCAB = 640




API_KEY = "test-key"
MAX_LEN = 1024

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "dict",
            "properties": {
                "query": {"type": "string", "maxLength": 12},
                "limit": {"type": "integer"},
                "filters": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
            },
            "required": ["query"],
        },
    },
}


def corpus() -> list[str]:
    rng = random.Random(0)
    words = "the weather in paris is mild and london rain city unit celsius search query limit hello".split()
    out = []
    for _ in range(60):
        call = {"city": rng.choice(words), "unit": "celsius", "days": rng.randint(1, 9)}
        out.append(
            " ".join(rng.choices(words, k=25))
            + " "
            + json.dumps(call)
            + json.dumps(call, separators=(",", ":"))
        )
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chat")
    model = build_model(
        preset(
            "tiny",
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
        ),
        seed=0,
    )
    save_model(model, folder)
    train_tokenizer(corpus(), VOCAB, num_special=64).save(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    engine, tokenizer = load_engine(checkpoint, max_batch=16, max_len=MAX_LEN)
    app = create_app(engine, tokenizer, model_name="tiny", api_key=API_KEY)
    with BackgroundServer(app, host="127.0.0.1") as running:
        running.engine, running.tokenizer = engine, tokenizer
        yield running
    assert not engine.running_in_background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def http(url, content=None, json=None, headers=None):
    """(status, decoded JSON body) of a GET, or of a POST when there is a body."""
    import json as json_module
    import urllib.error
    import urllib.request

    data = json_module.dumps(json).encode() if json is not None else content
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json_module.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json_module.loads(e.read())


def test_models_health_and_loopback(server, client):
    assert server.host == "127.0.0.1"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, body = http(server.url + "/health")
    assert status == 200 and body["status"] == "ok"


def test_plain_and_streamed_chat_agree(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    plain = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0.8, seed=4, logprobs=True, top_logprobs=2
    )
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    prompt, _ = encode_chat(server.tokenizer, messages, add_generation_prompt=True)
    assert plain.usage.prompt_tokens == len(prompt)
    assert 1 <= plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            temperature=0.8,
            seed=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    if not calls:  # a random model may emit tool-call markers; then content differs by design
        assert text == (choice.message.content or "")
        assert finish == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # n choices and stop strings
    many = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, n=3, seed=1, stop=["a", "e"]
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    for c in many.choices:
        assert "a" not in (c.message.content or "") and "e" not in (c.message.content or "")


def test_required_tool_calls_always_validate(client):
    """>= 50 sampled requests with tool_choice="required": every call parses and fits its schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, SEARCH_TOOL)}
    results = []

    def one(i):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"request {i}: weather in paris?"}],
            tools=[WEATHER_TOOL, SEARCH_TOOL],
            tool_choice="required",
            max_tokens=90,
            temperature=1.0,
            seed=i,
            parallel_tool_calls=i % 2 == 0,
        )
        results.append((i, r))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(52)]
    for start in range(0, 52, 13):
        for t in threads[start : start + 13]:
            t.start()
        for t in threads[start : start + 13]:
            t.join()
    assert len(results) == 52
    for i, r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (i, choice)
        calls = choice.message.tool_calls
        assert calls and (len(calls) == 1 or i % 2 == 0)
        for j, call in enumerate(calls):
            assert call.id == f"functions.{call.function.name}:{j}"
            check_schema(json.loads(call.function.arguments), schemas[call.function.name])


def check_schema(args, schema):
    assert isinstance(args, dict)
    props = schema["properties"]
    assert set(schema["required"]) <= set(args) <= set(props)
    types = {"string": str, "integer": int, "boolean": bool, "array": list}
    for key, value in args.items():
        spec = props[key]
        assert isinstance(value, types[spec["type"]]) and not (
            spec["type"] == "integer" and isinstance(value, bool)
        )
        if "enum" in spec:
            assert value in spec["enum"]
        if "maxLength" in spec:
            assert len(value) <= spec["maxLength"]
        if spec["type"] == "array":
            assert len(value) <= spec["maxItems"] and all(isinstance(v, str) and len(v) <= 6 for v in value)


def test_multi_turn_tool_loop(client, server):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        seed=0,
    )
    assert first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    assert calls[0].function.name == "get_weather"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18})})
    # the second turn's ids continue the dialogue's count
    second = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=60,
        seed=1,
        parallel_tool_calls=False,
    )
    assert second.choices[0].message.tool_calls[0].id == f"functions.get_weather:{len(calls)}"
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=16, seed=2
    )
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert isinstance(choice.message.content, str)
    prompt, _ = encode_chat(server.tokenizer, messages, [WEATHER_TOOL], add_generation_prompt=True)
    assert final.usage.prompt_tokens == len(prompt)
    assert "## Return of " + calls[0].id in server.tokenizer.decode(prompt)
    # streamed tool calls arrive as deltas that add up to the same call
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages[:1],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=60,
        seed=0,
        stream=True,
    )
    parts, finish = {}, None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = parts.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] = (tc.function.name if tc.function else None) or entry["name"]
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(p["id"], p["name"], p["arguments"]) for p in parts.values()] == [
        (c.id, c.function.name, c.function.arguments) for c in calls
    ]


def test_json_response_format(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "why": {"type": "string", "maxLength": 10}},
        "required": ["answer", "why"],
    }
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "2+2?"}],
            seed=seed,
            max_tokens=50,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        value = json.loads(r.choices[0].message.content)
        assert (
            set(value) == {"answer", "why"} and isinstance(value["answer"], int) and len(value["why"]) <= 10
        )
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json"}],
        max_tokens=60,
        response_format={"type": "json_object"},
        seed=0,
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_requests_get_openai_errors_and_server_keeps_serving(client, server):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url + "/v1/chat/completions"

    def error(status, **kwargs):
        got, body = http(url, headers=kwargs.pop("headers", headers), **kwargs)
        assert got == status, body
        body = body["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    error(400, content=b'{"model": "tiny", "messages": [')
    error(400, content=b"[1, 2]")
    assert error(400, json={**ok, "messages": "hi"})["param"] == "messages"
    assert error(400, json={**ok, "temperature": "hot"})["param"] == "temperature"
    assert error(400, json={**ok, "n": 0})["param"] == "n"
    assert (
        error(400, json={**ok, "messages": [{"role": "wizard", "content": "x"}]})["param"]
        == "messages[0].role"
    )
    error(
        400,
        json={
            **ok,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
    )
    error(400, json={**ok, "tool_choice": "required"})
    error(400, json={**ok, "response_format": {"type": "xml"}})
    error(400, json={**ok, "max_tokens": MAX_LEN})
    assert error(404, json={**ok, "model": "gpt-4"})["code"] == "model_not_found"
    assert error(401, json=ok, headers={"Authorization": "Bearer wrong"})["code"] == "invalid_api_key"
    assert error(401, json=ok, headers={})["code"] == "invalid_api_key"
    long = error(400, json={**ok, "messages": [{"role": "user", "content": "weather " * 1100}]})
    assert long["code"] == "context_length_exceeded" and str(MAX_LEN) in long["message"]
    # the official client maps them to its exception types
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=ok["messages"])
    with pytest.raises(openai.BadRequestError, match=str(MAX_LEN)):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "paris " * 1100}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[VOCAB + 5], max_tokens=2)
    # and it still serves
    r = client.chat.completions.create(**ok)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_sixteen_concurrent_clients_get_their_own_answers(client, server, checkpoint):
    """Each client's reply equals what an offline engine samples for the same prompt and seed."""
    prompts = [
        [{"role": "user", "content": f"client {i} asks about {'paris' if i % 2 else 'london'}"}]
        for i in range(16)
    ]
    replies = {}

    def one(i):
        r = client.chat.completions.create(
            model="tiny", messages=prompts[i], max_tokens=10 + i, seed=100 + i, temperature=1.0
        )
        replies[i] = r.choices[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine, tokenizer = load_engine(checkpoint, max_batch=4, max_len=MAX_LEN)
    for i in range(16):
        prompt, _ = encode_chat(tokenizer, prompts[i], add_generation_prompt=True)
        offline = engine.generate([prompt], SamplingParams(max_tokens=10 + i, seed=100 + i, temperature=1.0))[
            0
        ]
        content, calls = parse_assistant(offline.text)
        assert (replies[i].message.content or "") == content
        assert replies[i].finish_reason == (
            "tool_calls" if calls and offline.finish_reason != "length" else offline.finish_reason
        )


def test_completions_endpoint(client):
    r = client.completions.create(
        model="tiny", prompt=["the weather", "in paris"], max_tokens=5, seed=3, temperature=0, logprobs=2
    )
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 10
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
    streamed = client.completions.create(
        model="tiny", prompt="the weather", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


# ---- the terminal chat ---------------------------------------------------------------------------
def test_calculator_is_safe_arithmetic():
    assert calculate("2 * (3 + 4) ** 2") == 98
    assert calculate("sqrt(16) + 10 // 3 - 7 % 4") == 4.0
    assert abs(calculate("sin(pi / 2) + log(e)") - 2.0) < 1e-12
    assert calculate("2^10") == 1024
    for bad in [
        "__import__('os').system('true')",
        "open('x')",
        "(1).__class__",
        "[1, 2]",
        "lambda: 1",
        "a + 1",
        "9 ** 9 ** 9",
        "1 / 0",
        "factorial(10**6)",
        "x" * 600,
        "1e308 * 10",  # inf: not valid JSON for the model
        "1e400 - 1e400",
        "1" * 400,
        "2 ** -100000",
    ]:
        with pytest.raises(CalculatorError):
            calculate(bad)
    assert json.loads(run_tool("calculator", '{"expression": "6 * 7"}')) == {"result": 42}
    assert "error" in json.loads(run_tool("calculator", "{not json"))
    assert "missing \"expression\"" in json.loads(run_tool("calculator", '{"expr": "1 + 1"}'))["error"]
    assert "now" in json.loads(run_tool("clock", "{}"))
    assert "error" in json.loads(run_tool("clock", '{"timezone": "Mars/Olympus"}'))
    assert "error" in json.loads(run_tool("rm", "{}"))


def test_chat_session_runs_tool_calls(checkpoint):
    """Force the model's first reply to be a calculator call; the session runs it and continues."""
    engine, tokenizer = load_engine(checkpoint, max_batch=2, max_len=MAX_LEN)
    shown = []
    session = ChatSession(engine, tokenizer, max_tokens=20, seed=0, write=shown.append)
    real_submit = engine.submit
    forced = tokenizer.encode('{"expression": "6 * 7"}')
    section = [
        tokenizer.tool_calls_section_begin_id,
        tokenizer.tool_call_begin_id,
        *tokenizer.encode("functions.calculator:0"),
        tokenizer.tool_call_argument_begin_id,
        *forced,
        tokenizer.tool_call_end_id,
        tokenizer.tool_calls_section_end_id,
        tokenizer.im_end_id,
    ]
    calls = {"n": 0}

    def submit(prompt, params, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # script the first reply through logit biases, one token at a time
            from openk2.infer.constrain import Grammar, TokenVocab
            from openk2.infer.schema import Lit

            vocab = TokenVocab.of(tokenizer)
            text = "".join(vocab.strings[t] for t in section)
            params = SamplingParams(
                max_tokens=len(section), temperature=0, constraint=Grammar(Lit([text]), vocab)
            )
        return real_submit(prompt, params, **kwargs)

    engine.submit = submit
    session.send("what is 6 times 7?")
    assert shown[0] == '-> calculator({"expression": "6 * 7"})'
    assert shown[1] == '<- {"result": 42}'
    roles = [m["role"] for m in session.messages]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
    assert session.messages[2]["content"] == '{"result": 42}'
    assert {t["function"]["name"] for t in BUILTIN_TOOLS} == {"calculator", "clock"}


def test_chat_one_shot(checkpoint, capsys):
    from openk2.infer.chat_cli import chat

    reply = chat(checkpoint, message="hello", max_tokens=8, seed=0)
    assert isinstance(reply, str)
    assert reply in capsys.readouterr().out  # streamed to the terminal as it was generated


def test_openk2_serve_steps_the_engine_in_its_main_thread_and_shuts_down_cleanly(checkpoint):
    """The real command: serves, refuses a port in use with a clear error, and on SIGTERM
    finishes the request in flight before exiting 0."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "openk2", "serve", str(checkpoint), "--port", str(port),
               "--model-name", "m"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        taken = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert taken.returncode != 0 and "is the port in use" in taken.stdout + taken.stderr
        tokenizer = K2Tokenizer.load(checkpoint)
        never_stop = {str(t): -100 for t in {tokenizer.eos_id, tokenizer.im_end_id}}  # runs to max_tokens
        replies = []
        request = threading.Thread(target=lambda: replies.append(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1000, logit_bias=never_stop)))
        request.start()
        time.sleep(0.3)
        in_flight = request.is_alive()
        proc.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert in_flight and replies and replies[0].choices[0].finish_reason == "length"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_wait_until_serving_names_a_server_that_exited():
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_until_serving(f"http://127.0.0.1:{port}", gone)
    with pytest.raises(RuntimeError, match="did not answer within"):
        wait_until_serving(f"http://127.0.0.1:{port}", timeout=0.3)
