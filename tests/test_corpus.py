"""Pre-training data: readers, split, packing, loader resume, baselines, generated math and tool use."""

import ast
import json
import math
import operator
import random
import re
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openk2.data import corpus, synthetic
from openk2.data.corpus import DataError, Document, PackedLoader


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes, BOS/EOS after them. Records allow_special per call."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def __init__(self):
        self.calls = []

    def encode(self, text, allow_special=False):
        self.calls.append(allow_special)
        return list(text.encode("utf-8"))


class BatchByteTokenizer(ByteTokenizer):
    def encode_batch(self, texts, allow_special=False):
        self.calls.append(("batch", allow_special))
        return [list(t.encode("utf-8")) for t in texts]


def render(messages, tools):
    """Stand-in chat template with K2-style markers."""
    head = f"<|im_system|>tool_declare<|im_middle|>{json.dumps(tools)}<|im_end|>" if tools else ""
    return head + "".join(f"<|im_{m['role']}|>{json.dumps(m)}<|im_end|>" for m in messages)


def stream_of(rows, seq_len):
    """Undo the stride-seq_len packing: the token stream the rows were cut from."""
    return torch.cat([rows[0, :1], rows[:, 1:].reshape(-1)]) if len(rows) else rows.reshape(-1)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ---- packing ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), max_size=30), min_size=1, max_size=12), st.integers(1, 17))
def test_pack_rows_cover_the_stream_with_boundaries(docs, seq_len):
    rows = corpus.pack(docs, seq_len, bos_id=100, eos_id=101)
    expected = [t for d in docs for t in [100, *d, 101]]
    assert rows.dtype == torch.long and rows.shape == ((len(expected) - 1) // seq_len, seq_len + 1)
    if len(rows):
        assert torch.equal(rows[1:, 0], rows[:-1, -1])  # stride seq_len: each token is a target once
        stream = stream_of(rows, seq_len).tolist()
        assert stream == expected[: len(stream)] and len(expected) - len(stream) < seq_len + 1


def test_document_ids_mark_document_starts():
    rows = corpus.pack([[1, 2], [3], [4, 5, 6]], seq_len=5, bos_id=8, eos_id=9)
    # stream: 8 1 2 9 8 3 9 8 4 5 6 9 -> rows [8 1 2 9 8 3], [3 9 8 4 5 6]
    assert rows.tolist() == [[8, 1, 2, 9, 8, 3], [3, 9, 8, 4, 5, 6]]
    assert corpus.document_ids(rows, 8).tolist() == [[1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]]


def test_tokenize_prefers_batches_and_allows_specials_only_in_chat():
    docs = [Document("plain <|im_end|>", "user", "a"), Document("<|im_end|>", "tool_use", "b", chat=True)]
    batch_tok, plain_tok = BatchByteTokenizer(), ByteTokenizer()
    assert corpus.tokenize(docs, batch_tok) == corpus.tokenize(docs, plain_tok)
    assert batch_tok.calls == [("batch", False), ("batch", True)]
    assert plain_tok.calls == [False, True]


# ---- readers ------------------------------------------------------------------------------------


def test_jsonl_bad_lines_name_file_and_line_or_are_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"body": "x"}\n{"text": 3}\n[1]\n{"text": "six"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: invalid JSON.*skip_bad_lines"):
        corpus.read_file(path)
    docs, skipped = corpus.read_file(path, skip_bad_lines=True)
    assert [d.text for d in docs] == ["one", "six"] and skipped == 4
    path.write_text('{"text": "ok"}\n{"title": "x"}\n')
    with pytest.raises(DataError, match=r'data.jsonl:2: no "text" field \(fields: title\)'):
        corpus.read_file(path)


def test_parquet_and_arrow_text_columns(tmp_path):
    table = pa.table({"text": ["alpha", None, "gamma"], "id": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet:row 1: \"text\" is null"):
        corpus.read_file(tmp_path / "d.parquet")
    docs, skipped = corpus.read_file(tmp_path / "d.parquet", skip_bad_lines=True)
    assert [d.text for d in docs] == ["alpha", "gamma"] and skipped == 1
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.filter(pa.compute.is_valid(table["text"])))  # HF save_to_disk layout
    assert [d.text for d in corpus.read_file(tmp_path / "d.arrow")[0]] == ["alpha", "gamma"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r'no "text" column \(columns: body\)'):
        corpus.read_file(tmp_path / "nocol.parquet")


def test_sources_files_directories_globs_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("First book.\r\n\r\nSecond paragraph.\n")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", ["x", "y"])
    docs, _ = corpus.load_documents(tmp_path)  # a directory: every supported file under it
    assert [d.text for d in docs] == ["First book.\n\nSecond paragraph.", "x", "y"]  # a .txt is one document
    assert [d.text for d in corpus.load_documents(str(tmp_path / "**" / "*.jsonl"))[0]] == ["x", "y"]
    assert len(corpus.load_documents([tmp_path / "a.txt", tmp_path / "sub" / "b.jsonl"])[0]) == 3
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        corpus.load_documents([tmp_path / "a.txt", tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="matches no files"):
        corpus.load_documents(str(tmp_path / "*.parquet"))
    (tmp_path / "c.csv").write_text("text\n")
    with pytest.raises(DataError, match=r"unsupported file type \.csv"):
        corpus.load_documents(tmp_path / "c.csv")
    write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="holds no text"):
        corpus.load_documents(tmp_path / "empty.jsonl")


# ---- split and datasets -------------------------------------------------------------------------


def test_split_is_by_group_stable_and_near_the_fraction():
    rng = random.Random(0)
    docs = [Document(f"doc {i} " + "w" * rng.randint(10, 300), "user", f"g{i // 3}") for i in range(900)]
    train, val = corpus.split_documents(docs, 0.1)
    train_groups, val_groups = {d.group for d in train}, {d.group for d in val}
    assert not train_groups & val_groups and len(train) + len(val) == len(docs)
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.1 <= share < 0.11
    assert corpus.split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # order-free
    assert corpus.split_documents(docs, 0.0)[1] == []
    with pytest.raises(DataError, match="val_fraction"):
        corpus.split_documents(docs, 1.0)


def test_build_datasets_is_deterministic_and_splits_by_document(tmp_path):
    texts = [f"document number {i}:" + " abc" * (i % 17 + 1) for i in range(300)] + ["dup"] * 5
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    train, val, info = corpus.build_datasets(path, BatchByteTokenizer(), seq_len=32, seed=3, val_fraction=0.2)
    train2, val2, _ = corpus.build_datasets(path, BatchByteTokenizer(), seq_len=32, seed=3, val_fraction=0.2)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert (
        train.shape[1] == val.shape[1] == 33 and info.train.rows == len(train) and info.val.rows == len(val)
    )
    assert info.train.documents + info.val.documents == len(texts)
    assert info.train.bytes + info.val.bytes == sum(len(t.encode()) for t in texts)
    assert info.train.tokens == info.train.bytes + 2 * info.train.documents  # bytes + BOS + EOS

    def documents(rows):
        return {bytes(d).decode() for d in _split_stream(stream_of(rows, 32).tolist(), 256, 257)}

    held_out = {d.text for d in corpus.split_documents(corpus.load_documents(path)[0], 0.2)[1]}
    assert documents(val) <= held_out and not documents(train) & held_out
    assert ("dup" in held_out) == ("dup" in documents(val))  # duplicates share a group: one side only
    other, other_val, _ = corpus.build_datasets(
        path, BatchByteTokenizer(), seq_len=32, seed=4, val_fraction=0.2
    )
    assert not torch.equal(other, train) and documents(other_val) <= held_out  # the seed orders, not splits


def _split_stream(stream, bos, eos):
    """Complete [BOS] ... [EOS] documents of a stream."""
    docs, current = [], None
    for t in stream:
        if t == bos:
            current = []
        elif t == eos:
            if current is not None:
                docs.append(current)
            current = None
        elif current is not None:
            current.append(t)
    return docs


def test_build_datasets_reports_too_little_data(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ["only document"])
    with pytest.raises(DataError, match="too few groups"):
        corpus.build_datasets(path, ByteTokenizer(), seq_len=4)
    train, val, info = corpus.build_datasets(path, ByteTokenizer(), seq_len=4, val_fraction=0.0)
    assert len(train) > 0 and val.shape == (0, 5) and info.val.documents == 0
    with pytest.raises(DataError, match="fewer than seq_len"):
        corpus.build_datasets(path, ByteTokenizer(), seq_len=64, val_fraction=0.0)


# ---- loader -------------------------------------------------------------------------------------


def test_loader_resumes_exactly_across_epochs():
    rows = torch.arange(23 * 5).view(23, 5)
    reference = PackedLoader(rows, batch_size=4, seed=7)
    expected = [next(reference) for _ in range(20)]  # 5 batches per epoch: 4 epochs
    first = PackedLoader(rows, batch_size=4, seed=7)
    for batch in expected[:7]:
        assert torch.equal(next(first), batch)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PackedLoader(rows, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for batch in expected[7:]:
        assert torch.equal(next(resumed), batch)
    epoch = torch.cat(expected[:5])
    assert len(set(epoch[:, 0].tolist())) == 20  # an epoch draws rows without replacement
    assert not torch.equal(torch.cat(expected[5:10]), epoch)  # a fresh permutation each epoch
    with pytest.raises(DataError, match="saved state is for 23 rows"):
        PackedLoader(rows[:20], batch_size=4).load_state_dict(state)


def test_loader_ranks_take_disjoint_slices_of_the_global_batch():
    rows = torch.arange(40 * 3).view(40, 3)
    single = PackedLoader(rows, batch_size=8, seed=1)
    ranks = [PackedLoader(rows, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        assert torch.equal(next(single), torch.cat([next(r) for r in ranks]))
    with pytest.raises(DataError, match="cannot fill one batch"):
        PackedLoader(rows[:7], batch_size=4, world_size=2)


# ---- baselines ----------------------------------------------------------------------------------


def test_unigram_loss_and_bits_per_byte():
    train = torch.tensor([[9, 0, 0, 1]])  # targets 0, 0, 1 with vocab 3: counts+1 = 3, 2, 1
    val = torch.tensor([[9, 0, 2]])
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert corpus.unigram_loss(train, val, vocab_size=3) == pytest.approx(expected)
    assert corpus.bits_per_byte(math.log(2), tokens=10, bytes=40) == pytest.approx(0.25)
    with pytest.raises(DataError, match="beyond vocab_size"):
        corpus.unigram_loss(train, val, vocab_size=2)


# ---- generated text -----------------------------------------------------------------------------

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _eval(expression):
    """Independent evaluator of the generated expressions (Python's parser, exact fractions)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def walk(node):
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)

    return walk(ast.parse(expression, mode="eval").body)


def test_math_problems_are_worked_correctly():
    rng = random.Random(0)
    for _ in range(3000):
        problem = synthetic.math_problem(rng)
        known = {int(n) for n in re.findall(r"\d+", problem.question)} | {2, 100}
        results = []
        for step in problem.steps:
            ((a, op, b, c),) = _EQUATION.findall(step)  # exactly one equation per step
            a, b, c = int(a), int(b), int(c)
            assert _OPS[op](a, b) == c, step
            assert a in known and b in known, f"{step!r} uses a number not in the question: {problem.text}"
            known.add(c)
            results.append(c)
        assert problem.answer == results[-1] and problem.text.endswith(f"\nAnswer: {problem.answer}")
        if problem.question.startswith(("What is", "Compute", "Evaluate", "Calculate")):
            assert (
                _eval(
                    problem.question.split(" ", 2)[-1].rstrip("?.")
                    if problem.question.startswith("What")
                    else problem.question.split(" ", 1)[1].rstrip(".")
                )
                == problem.answer
            )


def test_tool_dialogues_are_consistent():
    rng = random.Random(1)
    seen = set()
    for _ in range(600):
        dialogue = synthetic.tool_dialogue(rng)
        offered = {t["function"]["name"] for t in dialogue.tools}
        calls = {}
        for message in dialogue.messages:
            for call in message.get("tool_calls", []):
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
                assert (
                    call["id"] not in calls
                    and call["id"].startswith(f"functions.{name}:")
                    and name in offered
                )
                calls[call["id"]] = (name, args)
            if message["role"] == "tool":
                name, args = calls[message["tool_call_id"]]
                result = json.loads(message["content"])
                seen.add(name)
                if name == "calculator":
                    assert _eval(args["expression"]) == result["result"]
                elif name == "convert_units":
                    _check_conversion(args, result)
        assert dialogue.messages[-1]["role"] == "assistant" and dialogue.messages[-1]["content"]
        assert not dialogue.messages[-1].get("tool_calls")
    assert seen == {"calculator", "convert_units", "get_weather"}


_TO_SI = {
    "km": 1000,
    "m": 1,
    "cm": 0.01,
    "mi": 1609.344,
    "ft": 0.3048,
    "in": 0.0254,
    "kg": 1,
    "g": 0.001,
    "lb": 0.45359237,
    "oz": 0.028349523125,
    "l": 1,
    "ml": 0.001,
    "gal": 3.785411784,
}


def _check_conversion(args, result):
    value, source, target = args["value"], args["from_unit"], args["to_unit"]
    if source in ("celsius", "fahrenheit"):
        celsius = value if source == "celsius" else (value - 32) / 1.8
        expected = celsius if target == "celsius" else celsius * 1.8 + 32
    else:
        expected = value * _TO_SI[source] / _TO_SI[target]
    assert result["unit"] == target and abs(result["value"] - expected) <= 0.005 + 1e-9 * abs(expected)


def test_generated_streams_are_deterministic():
    def take(stream, n):
        return [next(stream) for _ in range(n)]

    assert take(synthetic.math_texts(5), 50) == take(synthetic.math_texts(5), 50)
    assert take(synthetic.math_texts(5), 50) != take(synthetic.math_texts(6), 50)
    assert take(synthetic.tool_use_texts(5, render), 20) == take(synthetic.tool_use_texts(5, render), 20)


# ---- the default corpus -------------------------------------------------------------------------


def test_shakespeare_documents():
    docs = corpus.shakespeare_documents()
    works = {d.group for d in docs}
    assert len(works) == 42 and len(docs) > 1000  # 37 plays (two editions of most) and 5 poems
    text = "\n".join(d.text for d in docs)
    assert "Gutenberg" not in text and "  " not in text and "\n\n\n" not in text
    hamlet = [d.text for d in docs if d.group == "shakespeare/hamlet"]
    assert any("To be, or not to be" in t for t in hamlet) and any(
        "To be, or not to be, that is" in t for t in hamlet
    )
    assert sum("Actus" in t for t in hamlet) >= 2  # the Folio edition of the same work


def test_default_corpus_mixture_and_datasets():
    tokenizer = BatchByteTokenizer()
    mixture = corpus.Mixture(math=0.1, tool_use=0.05)
    train, val, info = corpus.build_datasets(
        "default", tokenizer, seq_len=512, seed=0, mixture=mixture, render=render
    )
    total = {
        k: info.train.bytes_by_kind.get(k, 0) + info.val.bytes_by_kind.get(k, 0)
        for k in ("shakespeare", "math", "tool_use")
    }
    assert sum(total.values()) == info.train.bytes + info.val.bytes > 9_000_000
    assert total["math"] / sum(total.values()) == pytest.approx(0.1, abs=0.002)
    assert total["tool_use"] / sum(total.values()) == pytest.approx(0.05, abs=0.002)
    for split in (info.train, info.val):  # every kind on both sides, near its share
        assert split.bytes_by_kind["math"] / split.bytes == pytest.approx(0.1, abs=0.03)
    assert val.shape[0] > 0 and train.shape[1] == 513
    assert 0.04 < info.val.bytes / (info.train.bytes + info.val.bytes) < 0.08
    head = bytes(t for t in val[:40].reshape(-1).tolist() if t < 256).decode("utf-8", "replace")
    assert "Question:" in head  # shuffled documents: a prefix of the rows already mixes kinds
    assert 0 < corpus.unigram_loss(train, val, tokenizer.vocab_size) < math.log(tokenizer.vocab_size)
    texts = list(corpus.iter_texts("default", mixture=mixture, render=render))
    assert any(t.startswith("Question:") for t in texts) and not any("<|im_end|>" in t for t in texts)
    assert any('"role": "assistant"' in t for t in texts)


def test_train_seed_changes_the_order_not_the_documents():
    """data.seed (text_seed) fixes the generated text; train.seed only reorders the training
    documents, so runs with different train seeds validate on the same rows."""
    mixture = corpus.Mixture(math=0.1, tool_use=0.0)
    runs = [corpus.build_datasets("default", BatchByteTokenizer(), seq_len=256, seed=s, mixture=mixture)
            for s in (0, 1)]
    (train0, val0, info0), (train1, val1, info1) = runs
    assert info0.train == info1.train and not torch.equal(train0, train1)  # same documents, other order
    assert info0.val == info1.val and torch.equal(val0, val1)  # the same validation rows
    _, _, other = corpus.build_datasets("default", BatchByteTokenizer(), seq_len=256, seed=0, mixture=mixture,
                                        text_seed=1)
    assert other.val.bytes_by_kind["shakespeare"] == info0.val.bytes_by_kind["shakespeare"]
    assert other.val.bytes_by_kind["math"] != info0.val.bytes_by_kind["math"]  # other generated problems
