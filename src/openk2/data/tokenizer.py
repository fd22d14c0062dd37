"""Byte-level BPE with K2's pre-tokenisation and special tokens (K2_SPEC §7, "Tokenizer").

The vocabulary is the learned BPE tokens followed by a block of special tokens, as in K2
(163,584 learned + 256 specials = 163,840). Inside the block the named tokens sit at K2's own
offsets, so a vocabulary of K2's size gets K2's ids:

    offset  token                          K2 id
    0       [BOS]                          163584
    1       [EOS]                          163585
    2       <|im_end|>                     163586
    3       <|im_user|>                    163587
    4       <|im_assistant|>               163588
    5-9     [reserved_5] .. [reserved_9]   (K2: reserved, <|start_header_id|>, <|end_header_id|>,
                                           reserved, [EOT]; openk2 uses none of them)
    10      <|im_system|>                  163594
    11      <|tool_calls_section_begin|>   163595
    12      <|tool_calls_section_end|>     163596
    13      <|tool_call_begin|>            163597
    14      <|tool_call_argument_begin|>   163598
    15      <|tool_call_end|>              163599
    16      [reserved_16]
    17      <|im_middle|>                  163601
    18..    [reserved_18] .. [reserved_{n-2}]
    n-1     [PAD]

`[reserved_k]` is named by its offset k, so its id is `bos_id + k`. The block has `num_special`
slots (default 256, K2's; at least 34, which leaves 16 reserved). If the corpus supports fewer
merges than asked for, the learned vocabulary is smaller and the reserved run grows, so the total
is always exactly `vocab_size`.

Special tokens are atomic and never come out of plain text: `encode(text)` treats marker text
such as "<|im_end|>" as ordinary characters; only `encode(text, allow_special=True)` (used for
rendered chat strings) maps marker text to special ids. The pre-tokeniser is a cl100k/o200k-style
regex with a Han clause: Han runs, case-aware letter runs with English contractions, 1-3 digit
groups, punctuation runs, newlines and other whitespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# ---- pre-tokenisation -------------------------------------------------------------------------
# Letters exclude Han so that Han runs are their own pieces even when glued to Latin text.
_HAN = r"\p{Han}"
_UPPERISH = r"[[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]&&[^\p{Han}]]"  # capitals and caseless letters
_LOWERISH = r"[[\p{Ll}\p{Lm}\p{Lo}\p{M}]&&[^\p{Han}]]"  # small and caseless letters
_CONTRACTION = r"(?i:'(?:s|t|re|ve|m|ll|d))"
_LEAD = r"[^\r\n\p{L}\p{N}]"  # one space or symbol that sticks to the word after it
PRETOKENIZE_PATTERN = "|".join(
    [
        rf"{_HAN}+",
        rf"{_LEAD}?{_UPPERISH}*{_LOWERISH}+{_CONTRACTION}?",  # "Hello", " world", "don't"
        rf"{_LEAD}?{_UPPERISH}+{_LOWERISH}*{_CONTRACTION}?",  # "HTTP", " A"
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation runs, with the newlines that end a line
        r"\s*[\r\n]+",
        r"\s+(?!\S)",  # trailing spaces, leaving the last one to the next word
        r"\s+",
    ]
)

# ---- special tokens ---------------------------------------------------------------------------
BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
)
TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END = (
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
)
TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END = (
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)

# Offsets inside the special block, as in K2 (see the module docstring).
NAMED_SPECIAL_OFFSETS: dict[str, int] = {
    BOS: 0,
    EOS: 1,
    IM_END: 2,
    IM_USER: 3,
    IM_ASSISTANT: 4,
    IM_SYSTEM: 10,
    TOOL_CALLS_SECTION_BEGIN: 11,
    TOOL_CALLS_SECTION_END: 12,
    TOOL_CALL_BEGIN: 13,
    TOOL_CALL_ARGUMENT_BEGIN: 14,
    TOOL_CALL_END: 15,
    IM_MIDDLE: 17,
}
K2_NUM_SPECIAL = 256
MIN_RESERVED = 16
MIN_NUM_SPECIAL = max(NAMED_SPECIAL_OFFSETS.values()) + 1 + MIN_RESERVED + 1  # 34: named, 16 reserved, [PAD]


def special_block(num_special: int) -> list[str]:
    """The special tokens in id order: K2's named ones at their offsets, [reserved_k] between, [PAD] last."""
    if num_special < MIN_NUM_SPECIAL:
        raise ValueError(f"num_special={num_special} is too small: need at least {MIN_NUM_SPECIAL}")
    block = [f"[reserved_{k}]" for k in range(num_special)]
    for name, offset in NAMED_SPECIAL_OFFSETS.items():
        block[offset] = name
    block[-1] = PAD
    return block


def _empty_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class K2Tokenizer:
    """A trained byte-level BPE plus K2's special block. Wraps a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        self._with_specials = tokenizer
        # A second handle whose added tokens are plain text: encode() must never emit a special
        # id from user text, and toggling one shared object would not be thread-safe.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._with_specials.encode_special_tokens = False
        self._special_ids: dict[str, int] = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self._check_layout()

    def _check_layout(self) -> None:
        bos = self._special_ids.get(BOS)
        if bos is None:
            raise ValueError("tokenizer has no [BOS] special token: not a K2Tokenizer vocabulary")
        block = special_block(self.vocab_size - bos)
        for offset, name in enumerate(block):
            if self._special_ids.get(name) != bos + offset:
                raise ValueError(
                    f"special token {name!r} should have id {bos + offset}, has {self._special_ids.get(name)}"
                )

    # ---- sizes and ids -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._with_specials.get_vocab_size(with_added_tokens=True)

    @property
    def num_learned(self) -> int:
        """Ids below this are learned BPE tokens; the special block starts here."""
        return self._special_ids[BOS]

    @property
    def special_tokens(self) -> list[str]:
        return special_block(self.vocab_size - self.num_learned)

    def token_id(self, name: str) -> int:
        """Id of a special token ("<|im_end|>", "[BOS]", "[reserved_20]") or of any vocabulary token."""
        if name in self._special_ids:
            return self._special_ids[name]
        token_id = self._with_specials.token_to_id(name)
        if token_id is None:
            raise KeyError(f"{name!r} is not a token of this vocabulary")
        return token_id

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_learned

    bos_id = property(lambda self: self._special_ids[BOS])
    eos_id = property(lambda self: self._special_ids[EOS])
    pad_id = property(lambda self: self._special_ids[PAD])
    im_end_id = property(lambda self: self._special_ids[IM_END])
    im_user_id = property(lambda self: self._special_ids[IM_USER])
    im_assistant_id = property(lambda self: self._special_ids[IM_ASSISTANT])
    im_system_id = property(lambda self: self._special_ids[IM_SYSTEM])
    im_middle_id = property(lambda self: self._special_ids[IM_MIDDLE])
    tool_calls_section_begin_id = property(lambda self: self._special_ids[TOOL_CALLS_SECTION_BEGIN])
    tool_calls_section_end_id = property(lambda self: self._special_ids[TOOL_CALLS_SECTION_END])
    tool_call_begin_id = property(lambda self: self._special_ids[TOOL_CALL_BEGIN])
    tool_call_argument_begin_id = property(lambda self: self._special_ids[TOOL_CALL_ARGUMENT_BEGIN])
    tool_call_end_id = property(lambda self: self._special_ids[TOOL_CALL_END])

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Marker text becomes special ids only with `allow_special=True`."""
        tokenizer = self._with_specials if allow_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        tokenizer = self._with_specials if allow_special else self._plain
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._with_specials.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._with_specials.id_to_token(token_id)

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) for transformers."""
        from openk2.data.chat import CHAT_TEMPLATE

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._with_specials.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> K2Tokenizer:
        path = Path(directory)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {path}: train one with `train_tokenizer` and save it"
            )
        return cls(Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"K2Tokenizer(vocab_size={self.vocab_size}, learned={self.num_learned})"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, num_special: int = K2_NUM_SPECIAL
) -> K2Tokenizer:
    """Train byte-level BPE on `texts`; the result has exactly `vocab_size` ids, the last
    `num_special` (or more, if the corpus runs out of merges) being the special block."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    num_learned = vocab_size - num_special
    if num_learned < len(byte_alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} leaves {num_learned} learned tokens after {num_special} specials; "
            f"need at least {len(byte_alphabet)} for the byte alphabet (raise vocab_size, lower num_special)"
        )
    tokenizer = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        min_frequency=min_frequency,
        initial_alphabet=byte_alphabet,
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    learned = tokenizer.get_vocab_size(with_added_tokens=False)
    block = special_block(vocab_size - learned)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in block])
    return K2Tokenizer(tokenizer)
