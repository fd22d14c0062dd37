"""K2Tokenizer: special-token layout, atomic specials, byte-level round trips, transformers parity."""

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from openk2.data.tokenizer import (
    BOS,
    IM_END,
    K2_NUM_SPECIAL,
    MIN_NUM_SPECIAL,
    NAMED_SPECIAL_OFFSETS,
    PAD,
    PRETOKENIZE_PATTERN,
    K2Tokenizer,
    special_block,
    train_tokenizer,
)

VOCAB = 2048
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def corpus() -> list[str]:
    """A small mixed corpus: made-up English-like prose, code, JSON tool calls, numbers, Chinese."""
    rng = random.Random(0)
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "tor",
        "sha",
        "ren",
        "vi",
        "qu",
        "dal",
        "is",
        "an",
        "the",
        "ing",
        "er",
    ]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)]
    english = (
        "She said it's raining, but we'll go anyway; they're sure I'd come and you've seen HTTPServer logs."
    )
    code = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n"
    chinese = "今天天气很好，我们去公园散步。人工智能正在改变世界。"
    texts = []
    for i in range(400):
        prose = " ".join(
            rng.choice(words).capitalize() if j % 9 == 0 else rng.choice(words) for j in range(60)
        )
        payload = json.dumps({"city": rng.choice(words), "day": i, "temp_c": rng.randint(-20, 45)})
        texts.append(f"{prose}. {english} get_weather({payload}) -> {i * 37 % 1000}. {chinese}\n{code}")
    return texts


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return train_tokenizer(corpus(), VOCAB)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tok.save(tmp_path_factory.mktemp("tokenizer"))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


MARKERS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "[BOS]",
    "[EOS]",
    "[PAD]",
    "[reserved_5]",
]
soup = st.lists(st.one_of(st.sampled_from(MARKERS), st.text(max_size=12)), max_size=12).map("".join)


# ---- layout -----------------------------------------------------------------------------------
def test_vocab_size_is_exact_and_specials_sit_at_k2_offsets(tok):
    assert tok.vocab_size == VOCAB
    assert tok.num_learned == VOCAB - K2_NUM_SPECIAL
    for name, offset in NAMED_SPECIAL_OFFSETS.items():
        assert tok.token_id(name) == tok.num_learned + offset
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == tuple(tok.num_learned + k for k in (0, 1, 2))
    assert (tok.im_user_id, tok.im_assistant_id, tok.im_system_id, tok.im_middle_id) == tuple(
        tok.num_learned + k for k in (3, 4, 10, 17)
    )
    assert tok.tool_call_begin_id == tok.num_learned + 13
    assert tok.pad_id == VOCAB - 1
    reserved = [t for t in tok.special_tokens if t.startswith("[reserved_")]
    assert len(reserved) >= 16
    for name in reserved:  # [reserved_k] is named by its offset in the block
        assert tok.token_id(name) == tok.num_learned + int(name[len("[reserved_") : -1])


def test_k2_sized_block_gives_k2_ids():
    block = special_block(K2_NUM_SPECIAL)
    k2_ids = {
        "[BOS]": 163584,
        "[EOS]": 163585,
        "<|im_end|>": 163586,
        "<|im_user|>": 163587,
        "<|im_assistant|>": 163588,
        "<|im_system|>": 163594,
        "<|tool_calls_section_begin|>": 163595,
        "<|tool_calls_section_end|>": 163596,
        "<|tool_call_begin|>": 163597,
        "<|tool_call_argument_begin|>": 163598,
        "<|tool_call_end|>": 163599,
        "<|im_middle|>": 163601,
    }
    for name, k2_id in k2_ids.items():
        assert 163584 + block.index(name) == k2_id
    assert len(block) == 256 and len(set(block)) == 256


def test_small_corpus_grows_the_reserved_run_to_keep_vocab_exact():
    small = train_tokenizer(["ab ab ab abc"] * 10, 1024, num_special=MIN_NUM_SPECIAL)
    assert small.vocab_size == 1024
    assert small.vocab_size - small.num_learned > MIN_NUM_SPECIAL
    assert small.token_id(IM_END) == small.num_learned + 2 and small.pad_id == 1023


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_special"):
        special_block(MIN_NUM_SPECIAL - 1)
    with pytest.raises(ValueError, match="byte alphabet"):
        train_tokenizer(["x"], 300)


# ---- specials -----------------------------------------------------------------------------------
def test_specials_are_atomic(tok):
    for offset, name in enumerate(tok.special_tokens):
        assert tok.encode(name, allow_special=True) == [tok.num_learned + offset]
        assert tok.decode([tok.num_learned + offset]) == name
    text = f"hi{IM_END}{BOS}there"
    assert tok.encode(text, allow_special=True).count(tok.im_end_id) == 1
    assert tok.decode(tok.encode(text, allow_special=True), skip_special=True) == "hithere"


@PROPERTY
@given(text=soup)
def test_plain_text_never_yields_special_ids(tok, text):
    ids = tok.encode(text)
    assert all(i < tok.num_learned for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


# ---- byte-level round trip ----------------------------------------------------------------------
@PROPERTY
@given(text=st.text(max_size=200))
def test_utf8_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_utf8_round_trip_examples(tok):
    for text in [
        "",
        " ",
        "\r\n\t",
        "\x00",
        "naïve café",
        "日本語と中文",
        "🙂👍🏽",
        "a\u0301",
        "  leading",
        "x  \n\n  y",
    ]:
        assert tok.decode(tok.encode(text)) == text


def test_pretokenizer_rules():
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")

    def pieces(text):
        return [p for p, _ in split.pre_tokenize_str(text)]

    assert pieces("hello中文world") == ["hello", "中文", "world"]  # Han runs are their own pieces
    assert pieces("1234567") == ["123", "456", "7"]  # digits in groups of at most three
    assert pieces("we'll DON'T x's") == ["we'll", " DON'T", " x's"]  # contractions stay on the word
    assert pieces("it'sy") == ["it's", "y"]
    assert pieces("camelCase") == ["camel", "Case"]  # case-aware letter runs
    assert pieces("a  !!! b") == ["a", " ", " !!!", " b"]  # punctuation runs, the space before a word
    assert pieces("x\n\n  y") == ["x", "\n\n", " ", " y"]


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, "[EOS]", PAD)
    assert "<|tool_calls_section_begin|>" in config["chat_template"]
    loaded = K2Tokenizer.load(tmp_path)
    text = "Loaded: it's 42°C in Paris 巴黎 <|im_end|>"
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    with pytest.raises(FileNotFoundError):
        K2Tokenizer.load(tmp_path / "missing")


# ---- transformers ------------------------------------------------------------------------------
def test_auto_tokenizer_special_ids(tok, hf_tok):
    assert len(hf_tok) == tok.vocab_size
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    for name in tok.special_tokens:
        assert hf_tok.convert_tokens_to_ids(name) == tok.token_id(name)


@PROPERTY
@given(text=st.text(max_size=120).filter(lambda t: not any(m in t for m in MARKERS)))
def test_auto_tokenizer_parity(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok(text)["input_ids"] == ids  # no BOS/EOS added by default
    assert hf_tok.decode(ids) == tok.decode(ids)


def test_auto_tokenizer_parity_on_chat_text(tok, hf_tok):
    text = "<|im_user|>user<|im_middle|>What's 12345 + 1?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
