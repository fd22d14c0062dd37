"""Procedurally generated pre-training text: math with worked answers, and tool-use dialogues.

The offline default corpus (corpus.py, K2_SPEC §3's "mathematics" domain and the agentic data of
§4 at toy scale) mixes these with Shakespeare. They are real data with exact answers, not
placeholders: every worked step is an equation `a op b = c` over integers that holds, every
number a step uses comes from the question or from an earlier step, and the answer is the
last step's result. Tool-use dialogues are OpenAI-style message lists with OpenAI tool schemas;
the tool results are computed (calculator, unit conversions with exact factors) or simulated
consistently (weather), and the final answer restates them. The caller turns a dialogue into
text with its chat template's `render(messages, tools)`, so this module does not fix a format.

Everything is a pure function of a `random.Random`; `math_texts(seed)` and
`tool_use_texts(seed, render)` are endless deterministic streams.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

Render = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]

# ---- math ---------------------------------------------------------------------------------------

# An expression is an int (a leaf) or (op, left, right).
Expr = int | tuple[str, "Expr", "Expr"]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class MathProblem:
    question: str
    steps: tuple[str, ...]  # worked solution, one line per step
    answer: int

    @property
    def text(self) -> str:
        return f"Question: {self.question}\nSolution:\n" + "\n".join(self.steps) + f"\nAnswer: {self.answer}"


def evaluate(expr: Expr) -> int:
    """Exact value of an expression tree; division must be exact."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = evaluate(left), evaluate(right)
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"inexact division {a} / {b}")
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def format_expr(expr: Expr, parent: int = 0, right_side: bool = False) -> str:
    """Infix text with the fewest parentheses that keep left-to-right evaluation order."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    prec = _PRECEDENCE[op]
    text = f"{format_expr(left, prec)} {op} {format_expr(right, prec, True)}"
    return f"({text})" if prec < parent or (prec == parent and right_side) else text


def random_expr(rng: random.Random, n_ops: int) -> Expr:
    """A random expression with `n_ops` operators whose value is a non-negative integer."""
    if n_ops == 0:
        return rng.randint(1, 99) if rng.random() < 0.8 else rng.randint(100, 999)
    op = rng.choice("++--**/")
    if op == "/":  # the divisor is a leaf that divides the dividend exactly
        left = random_expr(rng, n_ops - 1)
        value = evaluate(left)
        divisors = [d for d in range(2, 13) if value > 0 and value % d == 0]
        return ("/", left, rng.choice(divisors)) if divisors else ("+", left, random_expr(rng, 0))
    n_left = rng.randint(0, n_ops - 1)
    left, right = random_expr(rng, n_left), random_expr(rng, n_ops - 1 - n_left)
    if op == "*" and evaluate(left) * evaluate(right) > 50_000:
        op = "+"
    if op == "-" and evaluate(left) < evaluate(right):
        left, right = right, left
    return (op, left, right)


def _reduce_once(expr: Expr) -> tuple[Expr, str]:
    """Evaluate the first operator in evaluation order (post-order); return the new tree and the step."""
    op, left, right = expr  # type: ignore[misc]
    if not isinstance(left, int):
        new_left, step = _reduce_once(left)
        return (op, new_left, right), step
    if not isinstance(right, int):
        new_right, step = _reduce_once(right)
        return (op, left, new_right), step
    value = evaluate(expr)
    return value, f"{left} {op} {right} = {value}"


def arithmetic_problem(rng: random.Random) -> MathProblem:
    expr = random_expr(rng, rng.choice([1, 1, 2, 2, 3, 4]))
    question = rng.choice(["What is {}?", "Compute {}.", "Evaluate {}.", "Calculate {}."]).format(
        format_expr(expr)
    )
    steps = []
    while not isinstance(expr, int):
        expr, step = _reduce_once(expr)
        steps.append(
            step + (f", so the expression becomes {format_expr(expr)}." if not isinstance(expr, int) else ".")
        )
    return MathProblem(question, tuple(steps), expr)


_NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Priya", "Sam", "Elena", "David", "Mei", "Noah"]
_ITEMS = [
    ("notebook", "notebooks"),
    ("pen", "pens"),
    ("apple", "apples"),
    ("book", "books"),
    ("ticket", "tickets"),
    ("sandwich", "sandwiches"),
    ("candle", "candles"),
    ("cup", "cups"),
]


def _step(label: str, a: int, op: str, b: int) -> tuple[int, str]:
    value = evaluate((op, a, b))
    return value, f"{label}: {a} {op} {b} = {value}."


def _shopping(rng: random.Random) -> MathProblem:
    name = rng.choice(_NAMES)
    (_, many), (_, many2) = rng.sample(_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(1, 15), rng.randint(2, 9), rng.randint(1, 15)
    c1, s1 = _step(f"Cost of the {many}", n1, "*", p1)
    c2, s2 = _step(f"Cost of the {many2}", n2, "*", p2)
    total, s3 = _step("Total cost", c1, "+", c2)
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b >= total)
    change, s4 = _step("Change", bill, "-", total)
    q = (
        f"{name} buys {n1} {many} at ${p1} each and {n2} {many2} at ${p2} each, and pays with a "
        f"${bill} bill. How much change, in dollars, does {name} get?"
    )
    return MathProblem(q, (s1, s2, s3, s4), change)


def _travel(rng: random.Random) -> MathProblem:
    vehicle = rng.choice(["train", "car", "bus", "cyclist", "boat"])
    v1, h1, v2, h2 = rng.randint(10, 120), rng.randint(2, 6), rng.randint(10, 120), rng.randint(2, 6)
    d1, s1 = _step("First part", v1, "*", h1)
    d2, s2 = _step("Second part", v2, "*", h2)
    total, s3 = _step("Total distance", d1, "+", d2)
    q = (
        f"A {vehicle} travels at {v1} km per hour for {h1} hours, then at {v2} km per hour for {h2} "
        f"hours. How many kilometres does it travel in total?"
    )
    return MathProblem(q, (s1, s2, s3), total)


def _sharing(rng: random.Random) -> MathProblem:
    name, (_, many) = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each = rng.randint(2, 12), rng.randint(2, 20)
    boxes = rng.choice([d for d in range(2, 13) if (friends * each) % d == 0])  # `friends` is one
    per_box = friends * each // boxes
    total, s1 = _step(f"Total {many}", boxes, "*", per_box)
    share, s2 = _step("Each friend gets", total, "/", friends)
    q = (
        f"{name} has {boxes} boxes with {per_box} {many} in each and shares all of them equally among "
        f"{friends} friends. How many {many} does each friend get?"
    )
    return MathProblem(q, (s1, s2), share)


def _ages(rng: random.Random) -> MathProblem:
    a, b = rng.sample(_NAMES, 2)
    times, age_b, years = rng.randint(2, 5), rng.randint(3, 15), rng.randint(2, 20)
    age_a, s1 = _step(f"{a}'s age now", age_b, "*", times)
    later, s2 = _step(f"{a}'s age in {years} years", age_a, "+", years)
    q = f"{a} is {times} times as old as {b}. {b} is {age_b} years old. How old will {a} be in {years} years?"
    return MathProblem(q, (s1, s2), later)


def _discount(rng: random.Random) -> MathProblem:
    item = rng.choice(["jacket", "lamp", "bicycle", "chair", "watch", "backpack"])
    percent = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
    unit = Fraction(percent, 100).denominator  # price * percent / 100 is whole for multiples of this
    price = unit * rng.randint(1, 300 // unit + 1)
    t, s1 = _step("Price times percent", price, "*", percent)
    off, s2 = _step("Discount", t, "/", 100)
    sale, s3 = _step("Sale price", price, "-", off)
    q = f"A {item} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    return MathProblem(q, (s1, s2, s3), sale)


def _rectangle(rng: random.Random) -> MathProblem:
    thing = rng.choice(["garden", "room", "field", "table top", "poster"])
    length, width = rng.randint(3, 60), rng.randint(2, 40)
    given = f"A rectangular {thing} is {length} metres long and {width} metres wide."
    if rng.random() < 0.5:
        area, s1 = _step("Area", length, "*", width)
        return MathProblem(f"{given} What is its area in square metres?", (s1,), area)
    half, s1 = _step("Length plus width", length, "+", width)
    perimeter, s2 = _step("Perimeter", 2, "*", half)
    return MathProblem(f"{given} What is its perimeter in metres?", (s1, s2), perimeter)


def _savings(rng: random.Random) -> MathProblem:
    name, thing = rng.choice(_NAMES), rng.choice(["a game", "a gift", "shoes", "a concert ticket", "books"])
    weekly, weeks = rng.randint(3, 40), rng.randint(2, 12)
    saved, s1 = _step("Money saved", weekly, "*", weeks)
    spent = rng.randint(1, saved)
    left, s2 = _step("Money left", saved, "-", spent)
    q = (
        f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on {thing}. "
        f"How many dollars does {name} have left?"
    )
    return MathProblem(q, (s1, s2), left)


def _production(rng: random.Random) -> MathProblem:
    thing = rng.choice(["parts", "loaves of bread", "bottles", "toys", "boxes"])
    rate, hours, days = rng.randint(5, 90), rng.randint(2, 10), rng.randint(2, 7)
    per_day, s1 = _step("Per day", rate, "*", hours)
    total, s2 = _step(f"In {days} days", per_day, "*", days)
    q = (
        f"A machine makes {rate} {thing} per hour and runs {hours} hours a day. "
        f"How many {thing} does it make in {days} days?"
    )
    return MathProblem(q, (s1, s2), total)


WORD_PROBLEMS = (_shopping, _travel, _sharing, _ages, _discount, _rectangle, _savings, _production)


def math_problem(rng: random.Random) -> MathProblem:
    """An arithmetic expression (40%) or a word problem (60%), with a worked exact solution."""
    if rng.random() < 0.4:
        return arithmetic_problem(rng)
    return rng.choice(WORD_PROBLEMS)(rng)


def math_texts(seed: int = 0) -> Iterator[str]:
    rng = random.Random(f"openk2-math-{seed}")
    while True:
        yield math_problem(rng).text


# ---- tool use -----------------------------------------------------------------------------------


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


# Unit -> (category, size in the category's base unit, singular, plural). Factors are the exact
# definitions (the international mile, pound and inch, the US gallon).
UNITS: dict[str, tuple[str, Fraction, str, str]] = {
    "km": ("length", Fraction(1000), "kilometre", "kilometres"),
    "m": ("length", Fraction(1), "metre", "metres"),
    "cm": ("length", Fraction(1, 100), "centimetre", "centimetres"),
    "mi": ("length", Fraction("1609.344"), "mile", "miles"),
    "ft": ("length", Fraction("0.3048"), "foot", "feet"),
    "in": ("length", Fraction("0.0254"), "inch", "inches"),
    "kg": ("mass", Fraction(1), "kilogram", "kilograms"),
    "g": ("mass", Fraction(1, 1000), "gram", "grams"),
    "lb": ("mass", Fraction("0.45359237"), "pound", "pounds"),
    "oz": ("mass", Fraction("0.45359237") / 16, "ounce", "ounces"),
    "l": ("volume", Fraction(1), "litre", "litres"),
    "ml": ("volume", Fraction(1, 1000), "millilitre", "millilitres"),
    "gal": ("volume", Fraction("3.785411784"), "US gallon", "US gallons"),
    "celsius": ("temperature", Fraction(1), "degree Celsius", "degrees Celsius"),
    "fahrenheit": ("temperature", Fraction(5, 9), "degree Fahrenheit", "degrees Fahrenheit"),
}

TOOLS: dict[str, dict[str, Any]] = {
    "calculator": _function(
        "calculator",
        "Evaluate an arithmetic expression over integers with + - * / and parentheses; "
        "returns the exact result.",
        {"expression": {"type": "string", "description": "The expression, e.g. (12 + 7) * 3"}},
        ["expression"],
    ),
    "convert_units": _function(
        "convert_units",
        "Convert a value between units of length, mass, volume or temperature.",
        {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "enum": list(UNITS)},
            "to_unit": {"type": "string", "enum": list(UNITS)},
        },
        ["value", "from_unit", "to_unit"],
    ),
    "get_weather": _function(
        "get_weather",
        "Get the current weather in a city.",
        {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        ["city"],
    ),
}
_ABILITIES = {
    "calculator": "do exact arithmetic with a calculator",
    "convert_units": "convert units",
    "get_weather": "look up the current weather in a city",
}
_CITIES = ["Paris", "Oslo", "Tokyo", "Cairo", "Lima", "Toronto", "Sydney", "Mumbai", "Nairobi", "Berlin"]
_CITIES += ["Madrid", "Seoul", "Chicago", "Reykjavik", "Santiago", "Hanoi"]
# Condition -> how a reply says it ("it is 12 °C and ...").
_CONDITIONS = {
    "sunny": "sunny",
    "clear": "clear",
    "partly cloudy": "partly cloudy",
    "cloudy": "cloudy",
    "light rain": "raining lightly",
    "heavy rain": "raining heavily",
    "fog": "foggy",
    "thunderstorms": "stormy",
    "snow": "snowing",
}


def convert_units(value: Fraction, from_unit: str, to_unit: str) -> Fraction:
    """Exact conversion between two units of one category (temperatures are affine)."""
    category, size, _, _ = UNITS[from_unit]
    if UNITS[to_unit][0] != category:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    if category == "temperature":
        celsius = value if from_unit == "celsius" else (value - 32) * Fraction(5, 9)
        return celsius if to_unit == "celsius" else celsius * Fraction(9, 5) + 32
    return value * size / UNITS[to_unit][1]


def _number(x: Fraction | int | float) -> int | float:
    """JSON-friendly value rounded to 2 decimals: an int when whole."""
    rounded = round(Fraction(x), 2)
    return int(rounded) if rounded.denominator == 1 else float(rounded)


@dataclass(frozen=True)
class ToolDialogue:
    messages: list[dict[str, Any]]  # OpenAI chat messages
    tools: list[dict[str, Any]]  # OpenAI tool schemas offered to the assistant

    def text(self, render: Render) -> str:
        return render(self.messages, self.tools)


class _Builder:
    """Accumulates messages; tool-call ids are `functions.{name}:{index}`, unique in the dialogue."""

    def __init__(self, rng: random.Random, user: str):
        self.rng, self.messages, self.calls = rng, [{"role": "user", "content": user}], 0

    def call(self, *calls: tuple[str, dict[str, Any], Any]) -> None:
        """One assistant turn with the given (name, arguments, result) calls, then their results."""
        ids = [f"functions.{name}:{self.calls + i}" for i, (name, _, _) in enumerate(calls)]
        self.calls += len(calls)
        tool_calls = [
            {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for id_, (name, args, _) in zip(ids, calls, strict=True)
        ]
        content = self.rng.choice(["", "", "", "Let me check.", "I'll use a tool for that."])
        self.messages.append({"role": "assistant", "content": content, "tool_calls": tool_calls})
        for id_, (name, _, result) in zip(ids, calls, strict=True):
            self.messages.append(
                {"role": "tool", "tool_call_id": id_, "name": name, "content": json.dumps(result)}
            )

    def answer(self, text: str) -> list[dict[str, Any]]:
        self.messages.append({"role": "assistant", "content": text})
        return self.messages


def _calculator_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    if rng.random() < 0.25:
        percent = rng.choice([5, 10, 12, 15, 20, 25, 40, 75])
        base = Fraction(percent, 100).denominator * rng.randint(1, 200)
        expression, user = f"{base} * {percent} / 100", f"What is {percent}% of {base}?"
        value = base * percent // 100
    else:
        expr = random_expr(rng, rng.randint(1, 3))
        expression, value = format_expr(expr), evaluate(expr)
        user = rng.choice(
            [
                "What is {}?",
                "Can you calculate {} for me?",
                "I need the result of {}.",
                "Quick question: what's {}?",
            ]
        ).format(expression)
    dialogue = _Builder(rng, user)
    dialogue.call(("calculator", {"expression": expression}, {"result": value}))
    reply = rng.choice([f"{expression} = {value}.", f"The result is {value}.", f"It comes to {value}."])
    return dialogue.answer(reply), {"calculator"}


def _unit_name(unit: str, amount: float) -> str:
    return UNITS[unit][2] if amount == 1 else UNITS[unit][3]


def _conversion_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    category = rng.choice(["length", "length", "mass", "volume", "temperature"])
    source, target = rng.sample([u for u, spec in UNITS.items() if spec[0] == category], 2)
    value = rng.randint(-20, 110) if category == "temperature" else rng.randint(1, 500)
    exact = convert_units(Fraction(value), source, target)
    result = _number(exact)
    user = rng.choice(["How many {t} are in {v} {s}?", "Convert {v} {s} to {t}.", "What is {v} {s} in {t}?"])
    dialogue = _Builder(rng, user.format(v=value, s=_unit_name(source, value), t=UNITS[target][3]))
    dialogue.call(
        (
            "convert_units",
            {"value": value, "from_unit": source, "to_unit": target},
            {"value": result, "unit": target},
        )
    )
    about = "" if exact == result else "about "
    reply = f"{value} {_unit_name(source, value)} is {about}{result} {_unit_name(target, result)}."
    return dialogue.answer(reply), {"convert_units"}


def _weather(rng: random.Random, city: str, unit: str) -> dict[str, Any]:
    condition = rng.choice(sorted(_CONDITIONS))
    celsius = rng.randint(-12, 1) if condition == "snow" else rng.randint(-5, 38)
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {
        "city": city,
        "temperature": temperature,
        "unit": unit,
        "condition": condition,
        "humidity": rng.randint(20, 98),
    }


def _degrees(report: dict[str, Any]) -> str:
    return f"{report['temperature']} °{'C' if report['unit'] == 'celsius' else 'F'}"


def _weather_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    city = rng.choice(_CITIES)
    kind = rng.choice(["plain", "plain", "rain", "fahrenheit"])
    unit = "fahrenheit" if kind == "fahrenheit" else "celsius"
    user = {
        "plain": rng.choice([f"What's the weather like in {city}?", f"How is the weather in {city} today?"]),
        "rain": f"Should I take an umbrella in {city} today?",
        "fahrenheit": f"How warm is it in {city} right now, in Fahrenheit?",
    }[kind]
    report = _weather(rng, city, unit)
    dialogue = _Builder(rng, user)
    args = {"city": city, "unit": unit} if unit == "fahrenheit" or rng.random() < 0.5 else {"city": city}
    dialogue.call(("get_weather", args, report))
    sky = _CONDITIONS[report["condition"]]
    if kind == "rain":
        wet = report["condition"] in ("light rain", "heavy rain", "thunderstorms")
        reply = (
            f"Yes: it is {sky} in {city} ({_degrees(report)}), so take an umbrella."
            if wet
            else f"No need: it is {sky} in {city} ({_degrees(report)})."
        )
    else:
        reply = f"In {city} it is {_degrees(report)} and {sky}, with {report['humidity']}% humidity."
    return dialogue.answer(reply), {"get_weather"}


def _comparison_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    first, second = rng.sample(_CITIES, 2)
    dialogue = _Builder(rng, f"Which is warmer right now, {first} or {second}?")
    a, b = _weather(rng, first, "celsius"), _weather(rng, second, "celsius")
    dialogue.call(("get_weather", {"city": first}, a), ("get_weather", {"city": second}, b))
    if a["temperature"] == b["temperature"]:
        reply = f"Neither: both {first} and {second} are at {_degrees(a)}."
    else:
        warm, cold = (a, b) if a["temperature"] > b["temperature"] else (b, a)
        diff = warm["temperature"] - cold["temperature"]
        reply = (
            f"{warm['city']} is warmer: {_degrees(warm)} against {_degrees(cold)} in {cold['city']}, "
            f"a difference of {diff} degree{'s' if diff != 1 else ''}."
        )
    return dialogue.answer(reply), {"get_weather"}


def _chained_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    dialogue = _Builder(
        rng, f"I ran {a} km on Monday and {b} km on Tuesday. How many miles is that in total?"
    )
    dialogue.call(("calculator", {"expression": f"{a} + {b}"}, {"result": a + b}))
    miles = _number(convert_units(Fraction(a + b), "km", "mi"))
    dialogue.call(
        (
            "convert_units",
            {"value": a + b, "from_unit": "km", "to_unit": "mi"},
            {"value": miles, "unit": "mi"},
        )
    )
    reply = f"You ran {a + b} km in total, which is about {miles} miles."
    return dialogue.answer(reply), {"calculator", "convert_units"}


def _no_tool_dialogue(rng: random.Random) -> tuple[list[dict[str, Any]], set[str]]:
    user, reply = rng.choice(
        [
            ("Hi!", "Hello! How can I help you today?"),
            ("Thanks, that's all.", "You're welcome. Have a good day!"),
            ("Good morning.", "Good morning! What can I do for you?"),
            ("What can you do?", None),  # answered from the offered tools by `tool_dialogue`
        ]
    )
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], set()


_SCENARIOS = (
    (_calculator_dialogue, 3),
    (_conversion_dialogue, 2),
    (_weather_dialogue, 2),
    (_comparison_dialogue, 1),
    (_chained_dialogue, 1),
    (_no_tool_dialogue, 1),
)


def tool_dialogue(rng: random.Random) -> ToolDialogue:
    """A user request, the assistant's tool calls with JSON arguments, the results, the answer."""
    scenario = rng.choices([s for s, _ in _SCENARIOS], weights=[w for _, w in _SCENARIOS])[0]
    messages, needed = scenario(rng)
    names = sorted(needed | {name for name in TOOLS if rng.random() < 0.5}) or [rng.choice(sorted(TOOLS))]
    rng.shuffle(names)
    if messages[-1]["content"] is None:
        abilities = [_ABILITIES[n] for n in names]
        listed = ", ".join(abilities[:-1]) + " and " + abilities[-1] if len(abilities) > 1 else abilities[0]
        messages[-1]["content"] = f"I can {listed}."
    if rng.random() < 0.5:
        system = rng.choice(
            ["You are a helpful assistant.", "You are a concise assistant. Use tools when they help."]
        )
        messages = [{"role": "system", "content": system}, *messages]
    return ToolDialogue(messages, [TOOLS[n] for n in names])


def tool_use_texts(seed: int, render: Render) -> Iterator[str]:
    rng = random.Random(f"openk2-tool-use-{seed}")
    while True:
        yield tool_dialogue(rng).text(render)
