"""Training data: a UTF-8 text becomes tokens, a train/validation split, and batches of
windows for the training loop.

Reading. The file must be UTF-8 (strictly: a bad byte is an error naming the file and the
byte offset, never silently replaced, so the model does not learn replacement characters).

Normalisation (`normalize_text`), the only changes made to the text, all of them to
encoding artifacts, so generated text looks like the corpus:
  1. a leading byte-order mark (U+FEFF) is dropped;
  2. Windows and old Mac line ends (`\\r\\n`, lone `\\r`) become `\\n`;
  3. Unicode NFC: a character typed as base + combining mark ("e" U+0301) becomes its
     composed form ("é"), so one text typed two ways gives the same tokens.
Case, spacing, tabs, punctuation and every other character stay as they are; decoding
the tokens gives back the normalised text exactly.

Default corpus (`default_corpus`): the topics of Python's interactive `help()`, the
`topics` dict of the standard library's `pydoc_data.topics` (about 465 kB of English
reference prose with code examples, in the module's order, one blank line between
topics). Every CPython installation carries it, so training runs with no download and no
data file; its wording follows the Python version that runs (a BPE tokenizer trained on it
is saved, see below, so a run reuses its own).

Tokenizers, both over the UTF-8 bytes so any text can be encoded:
  - `byte`: token = byte value, vocabulary 256 (model.vocab_size may be larger; the
    extra ids are never produced, and decode as U+FFFD).
  - `bpe`: byte-level BPE (GPT-2's scheme: the GPT-2 pre-tokenizer regex, all 256 byte
    symbols in the initial alphabet, no special tokens) trained with the Hugging Face
    `tokenizers` library on the whole corpus to exactly model.vocab_size tokens, and
    saved as `tokenizer.json` in the directory the caller names (a run's output
    directory). When that file exists it is loaded instead of training again.
Decoding bytes that are not valid UTF-8 (a sampled sequence can be) gives U+FFFD for them.

Split (`split_tokens`): the first 1 - val_fraction of the token stream trains, the tail
validates. A contiguous split keeps every validation window out of every training window
(random windows overlap) and needs no seed. The tokenizer sees the whole corpus, as GPT-2's
saw its whole dataset; only windows are held out.

Windows: seq_len + 1 consecutive tokens; a model reads window[:-1] and predicts
window[1:]. The training batch of step s (`training_batch`) takes batch_size windows at
uniformly random starts drawn from `numpy.random.default_rng([seed, 2, s])` (streams 0
and 1 are the reference's weights and synthetic batch): a batch depends only on the seed
and the step number, so a resumed run draws the batches the uninterrupted run would have.
Validation windows (`validation_batches`) start every seq_len tokens, so each validation
token after the first is predicted exactly once; they are grouped in order into batches of
batch_size, the last one completed with the first windows (the wafer's batch shape is
fixed).

Errors a user can cause (a missing or non-UTF-8 file, a text too short for one training or
one validation window, a vocabulary the tokenizer cannot have, a saved tokenizer of another
size) raise `wse_sim.errors.UserError` with one line naming the file or config field.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from compiler.config import RunConfig
from wse_sim.errors import UserError
from wse_sim.userinput import read_user_file

BYTE_VOCAB = 256
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_CORPUS = "pydoc_data.topics (default corpus)"
_BATCH_STREAM = 2  # numpy seed stream of the training batches; see the module docstring


def normalize_text(text: str) -> str:
    """The text with the normalisation of the module docstring applied (idempotent)."""
    text = text.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def read_text(path: str | Path) -> str:
    """A UTF-8 file's normalised text; a UserError naming the file if it cannot be read or
    is not UTF-8 (with the offset of the first bad byte)."""
    return normalize_text(read_user_file(path, "data"))


def default_corpus() -> str:
    """The normalised Python help topics (see the module docstring)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation data
        raise UserError(
            f"{DEFAULT_CORPUS}: not in this Python installation; name a text file "
            "(data.path or --data)"
        ) from None
    return normalize_text("\n".join(topics.values()))


# -- tokenizers ---------------------------------------------------------------------------


class Tokenizer(Protocol):
    """Text <-> token ids. `encode` gives int32 ids in [0, vocab_size)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """Token = UTF-8 byte."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # 0xFF never occurs in UTF-8, so an id past the bytes decodes to U+FFFD like any
        # invalid byte.
        raw = bytes(int(i) if 0 <= i < BYTE_VOCAB else 0xFF for i in ids)
        return raw.decode("utf-8", errors="replace")


class BpeTokenizer:
    """Byte-level BPE, a thin wrapper of a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BpeTokenizer:
        """BPE merges learnt on `text` until `vocab_size` tokens (or no pair is left)."""
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator([text], trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def make_tokenizer(
    kind: str, vocab_size: int, text: str, directory: str | Path, source: str
) -> Tokenizer:
    """The tokenizer `kind` ("byte" or "bpe") for a model of `vocab_size` tokens. BPE loads
    `directory/tokenizer.json` if it exists, else trains on `text` (named `source` in
    errors) and saves it there. Impossible sizes are UserErrors naming model.vocab_size."""
    if vocab_size < BYTE_VOCAB:
        what = "byte-level tokens need" if kind == "byte" else "byte-level BPE needs"
        raise UserError(
            f"model.vocab_size: {what} at least {BYTE_VOCAB} ids (one per byte), got {vocab_size}"
        )
    if kind == "byte":
        return ByteTokenizer()
    path = Path(directory) / TOKENIZER_FILE
    if path.exists():
        tokenizer = _load_bpe(path)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(
                f"{path}: vocabulary of {tokenizer.vocab_size} tokens, but model.vocab_size is "
                f"{vocab_size} (delete the file to train a new tokenizer)"
            )
        return tokenizer
    tokenizer = BpeTokenizer.train(text, vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"model.vocab_size: BPE on {source} stops at {tokenizer.vocab_size} tokens, "
            f"short of {vocab_size} (the text repeats too little; use a longer text or a "
            "smaller vocabulary)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # an interrupted save leaves no file
    tokenizer.tokenizer.save(str(partial))
    os.replace(partial, path)
    return tokenizer


def saved_tokenizer(kind: str, vocab_size: int, directory: str | Path) -> Tokenizer:
    """The tokenizer a training run in `directory` used: bytes, or the BPE tokenizer it
    saved there (a UserError naming the file if it is missing or of another size)."""
    if kind == "byte":
        return make_tokenizer(kind, vocab_size, "", directory, "")
    path = Path(directory) / TOKENIZER_FILE
    if not path.exists():
        raise UserError(f"{path}: missing: the BPE tokenizer of the run that wrote the "
                        "checkpoint is saved beside it")
    return make_tokenizer(kind, vocab_size, "", directory, str(path))


def _load_bpe(path: Path) -> BpeTokenizer:
    try:
        return BpeTokenizer(HFTokenizer.from_file(str(path)))
    except Exception as err:  # the library raises plain Exceptions for bad files
        reason = (str(err).splitlines() or ["unreadable"])[0]
        raise UserError(f"{path}: not a tokenizer file: {reason}") from None


# -- split and windows --------------------------------------------------------------------


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the head and the last round(val_fraction * n) tokens."""
    n_val = round(val_fraction * len(tokens))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def training_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> np.ndarray:
    """The windows of training step `step`: `(batch_size, seq_len + 1)` int32 at random
    starts, a function of (seed, step) only."""
    rng = np.random.default_rng([seed, _BATCH_STREAM, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> list[np.ndarray]:
    """Every validation window (stride seq_len) in order, as `(batch_size, seq_len + 1)`
    int32 batches; the last batch is completed with the first windows."""
    count = (len(tokens) - 1) // seq_len
    starts = np.arange(count) * seq_len
    batches = -(-count // batch_size)
    rows = starts[np.arange(batches * batch_size) % count]
    windows = tokens[rows[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return list(windows.reshape(batches, batch_size, seq_len + 1))


# -- the whole stage ----------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A corpus ready for training: its name, its tokenizer and its two token streams."""

    source: str
    tokenizer: Tokenizer
    train: np.ndarray
    validation: np.ndarray


def load_dataset(cfg: RunConfig, directory: str | Path, path: str | Path | None = None) -> Dataset:
    """Read, normalise, tokenize and split the text for `cfg`: the file `path` if given
    (a command line's --data), else `cfg.data.path`, else the default corpus. A BPE
    tokenizer is loaded from or saved to `directory`. Raises a one-line UserError when
    the text cannot give one training and one validation window."""
    path = path if path is not None else cfg.data.path
    source = str(path) if path is not None else DEFAULT_CORPUS
    text = read_text(path) if path is not None else default_corpus()
    tokenizer = make_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size, text, directory, source)
    tokens = tokenizer.encode(text)
    train, validation = split_tokens(tokens, cfg.data.val_fraction)
    window = cfg.training.seq_len + 1
    if len(train) < window:
        raise UserError(
            f"{source}: too short: {len(tokens)} tokens leave {len(train)} for training, "
            f"fewer than one window of training.seq_len + 1 = {window}"
        )
    if len(validation) < window:
        raise UserError(
            f"{source}: too short for validation: data.val_fraction {cfg.data.val_fraction} "
            f"of {len(tokens)} tokens is {len(validation)}, fewer than one window of "
            f"training.seq_len + 1 = {window}"
        )
    return Dataset(source, tokenizer, train, validation)
