"""Training data: normalisation, both tokenizers, the split, the windows, and every bad
input ending in one line that names the file or the config field."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.config import RunConfig, load_config
from compiler.data import (
    DEFAULT_CORPUS,
    TOKENIZER_FILE,
    BpeTokenizer,
    ByteTokenizer,
    default_corpus,
    load_dataset,
    make_tokenizer,
    normalize_text,
    read_text,
    split_tokens,
    training_batch,
    validation_batches,
)
from wse_sim.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BPE_VOCAB = 400


def _cfg(vocab_size: int = 256, seq_len: int = 16, **data_section: object) -> RunConfig:
    """gpt_tiny with a byte-sized vocabulary and the given data section."""
    raw = load_config(ROOT / "models" / "gpt_tiny.yaml").model_dump()
    raw["model"]["vocab_size"] = vocab_size
    raw["training"]["seq_len"] = seq_len
    raw["data"] = data_section
    return RunConfig.model_validate(raw)


def _user_error(action: Callable[[], object]) -> str:
    """The message of the UserError `action` raises, checked to be one line."""
    with pytest.raises(UserError) as err:
        action()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message, message
    return message


@pytest.fixture(scope="module")
def corpus() -> str:
    return default_corpus()


@pytest.fixture(scope="module")
def bpe_text(corpus: str) -> str:
    # A 60 kB slice keeps BPE training in the tens of milliseconds.
    return corpus[:60_000]


@pytest.fixture(scope="module")
def bpe(bpe_text: str, tmp_path_factory: pytest.TempPathFactory) -> BpeTokenizer:
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer = make_tokenizer("bpe", BPE_VOCAB, bpe_text, directory, "slice")
    assert isinstance(tokenizer, BpeTokenizer)
    return tokenizer


# -- reading and normalising --------------------------------------------------------------


def test_normalisation_touches_only_encoding_artifacts() -> None:
    raw = "\ufeffCafe\u0301 line\r\nnext\rlast\tTab  \u00a0nbsp\n"
    assert normalize_text(raw) == "Café line\nnext\nlast\tTab  \u00a0nbsp\n"
    assert normalize_text("x\ufeff") == "x\ufeff"  # only a leading mark is an artifact


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalisation_is_idempotent_and_leaves_nfc_lf(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert "\r" not in once and unicodedata.is_normalized("NFC", once)


def test_read_text_normalises(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n".encode())
    assert read_text(path) == "one\ntwo\n"


@pytest.mark.parametrize(
    ("raw", "offset", "byte"),
    [(b"hello\n\xffworld", 6, "0xff"), (b"ok caf\xc3", 6, "0xc3"), (b"\x80", 0, "0x80")],
)
def test_non_utf8_names_file_and_byte_offset(
    tmp_path: Path, raw: bytes, offset: int, byte: str
) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(raw)
    message = _user_error(lambda: read_text(path))
    assert message.startswith(f"{path}: not UTF-8 text: byte {byte} at offset {offset} (")


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    assert _user_error(lambda: read_text(path)).startswith(f"{path}: cannot read data: ")


def test_default_corpus_is_pythons_help_text(corpus: str) -> None:
    from pydoc_data.topics import topics

    assert len(corpus) > 400_000  # about 465 kB in CPython 3.11
    assert corpus.startswith(next(iter(topics.values())))
    assert normalize_text(corpus) == corpus
    assert 'The "assert" statement' in corpus and default_corpus() == corpus


# -- tokenizers ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokens_are_the_utf8_bytes(text: str) -> None:
    tokens = ByteTokenizer().encode(text)
    assert tokens.dtype == np.int32
    assert bytes(tokens.astype(np.uint8)) == text.encode()
    assert ByteTokenizer().decode(tokens) == text


def test_byte_decode_of_impossible_ids_is_replacement_characters() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([104, 300, 105]) == "h\ufffdi"  # a model with vocab > 256
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"  # half a character


def test_bpe_has_the_configured_vocabulary_and_compresses(bpe: BpeTokenizer, bpe_text: str) -> None:
    assert bpe.vocab_size == BPE_VOCAB
    tokens = bpe.encode(bpe_text)
    assert tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < BPE_VOCAB
    assert len(tokens) < 0.7 * len(bpe_text.encode())  # merges learnt on this text pay off
    assert bpe.decode(tokens) == bpe_text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe: BpeTokenizer, text: str) -> None:
    # Every byte is in the initial alphabet, so text never seen in training encodes too.
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_is_trained_once_then_loaded(
    bpe_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_tokenizer("bpe", BPE_VOCAB, bpe_text, tmp_path / "out", "slice")
    saved = tmp_path / "out" / TOKENIZER_FILE
    assert saved.is_file() and list(saved.parent.iterdir()) == [saved]
    stamp = saved.stat().st_mtime_ns

    def no_training(*args: object) -> None:
        raise AssertionError("trained again although tokenizer.json exists")

    monkeypatch.setattr(BpeTokenizer, "train", no_training)
    again = make_tokenizer("bpe", BPE_VOCAB, "other text entirely", tmp_path / "out", "x")
    assert saved.stat().st_mtime_ns == stamp
    sample = bpe_text[1000:3000]
    assert np.array_equal(again.encode(sample), first.encode(sample))


def test_bpe_training_is_deterministic(bpe: BpeTokenizer, bpe_text: str) -> None:
    assert BpeTokenizer.train(bpe_text, BPE_VOCAB).tokenizer.to_str() == bpe.tokenizer.to_str()


def test_saved_tokenizer_of_another_size_is_refused(bpe_text: str, tmp_path: Path) -> None:
    make_tokenizer("bpe", BPE_VOCAB, bpe_text, tmp_path, "slice")
    message = _user_error(lambda: make_tokenizer("bpe", 512, bpe_text, tmp_path, "slice"))
    path = tmp_path / TOKENIZER_FILE
    assert message.startswith(f"{path}: vocabulary of {BPE_VOCAB} tokens, but model.vocab_size")


def test_corrupt_tokenizer_file_is_named(tmp_path: Path) -> None:
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    message = _user_error(lambda: make_tokenizer("bpe", 300, "text", tmp_path, "t"))
    assert message.startswith(f"{tmp_path / TOKENIZER_FILE}: not a tokenizer file: ")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_vocabulary_below_one_byte_each_is_refused(kind: str, tmp_path: Path) -> None:
    message = _user_error(lambda: make_tokenizer(kind, 255, "some text", tmp_path, "t"))
    assert message.startswith("model.vocab_size: ") and "255" in message
    assert not (tmp_path / TOKENIZER_FILE).exists()


def test_vocabulary_bpe_cannot_reach_is_refused(tmp_path: Path) -> None:
    # "abababab" has one pair to merge, then "abab"...: far fewer than 744 merges.
    message = _user_error(lambda: make_tokenizer("bpe", 1000, "ab" * 40, tmp_path, "tiny.txt"))
    assert message.startswith("model.vocab_size: BPE on tiny.txt stops at ")
    assert not (tmp_path / TOKENIZER_FILE).exists()


# -- split and windows --------------------------------------------------------------------


def test_split_is_head_and_tail() -> None:
    tokens = np.arange(1000, dtype=np.int32)
    train, validation = split_tokens(tokens, 0.1)
    assert len(validation) == 100
    assert np.array_equal(np.concatenate([train, validation]), tokens)
    train, validation = split_tokens(tokens[:15], 0.1)
    assert (len(train), len(validation)) == (13, 2)  # round(1.5) = 2


def test_training_windows_are_shifted_slices_inside_the_training_part() -> None:
    # Token value = position, so a window shows where it came from.
    tokens = np.arange(1000, dtype=np.int32)
    train, validation = split_tokens(tokens, 0.2)
    seq_len, batch_size = 7, 5
    starts = set()
    for step in range(300):
        batch = training_batch(train, batch_size, seq_len, seed=3, step=step)
        assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == np.int32
        inputs, targets = batch[:, :-1], batch[:, 1:]
        assert np.array_equal(targets[:, :-1], inputs[:, 1:])
        assert np.all(np.diff(batch, axis=1) == 1)  # consecutive tokens of the stream
        assert batch.max() < validation[0]  # never a validation token
        starts.update(batch[:, 0].tolist())
    assert min(starts) == 0 and max(starts) == len(train) - seq_len - 1  # every start reachable


def test_training_batches_depend_on_seed_and_step_only() -> None:
    tokens = np.arange(5000, dtype=np.int32)
    a = training_batch(tokens, 4, 16, seed=0, step=7)
    assert np.array_equal(a, training_batch(tokens.copy(), 4, 16, seed=0, step=7))
    assert not np.array_equal(a, training_batch(tokens, 4, 16, seed=0, step=8))
    assert not np.array_equal(a, training_batch(tokens, 4, 16, seed=1, step=7))


def test_validation_windows_cover_each_target_once() -> None:
    validation = np.arange(100, 123, dtype=np.int32)  # 23 tokens
    batches = validation_batches(validation, batch_size=2, seq_len=4)
    # Windows start every 4 tokens: 0, 4, 8, 12, 16 (16..20 is the last that fits); the
    # third batch is completed with the first window.
    starts = [batch[:, 0].tolist() for batch in batches]
    assert starts == [[100, 104], [108, 112], [116, 100]]
    assert all(b.shape == (2, 5) and b.dtype == np.int32 for b in batches)
    targets = np.concatenate([b[:, 1:] for b in batches]).ravel()[:-4]  # minus the repeat
    assert sorted(targets.tolist()) == list(range(101, 121))


# -- the whole stage ----------------------------------------------------------------------


def test_load_dataset_from_a_file(tmp_path: Path) -> None:
    text = "Line one.\r\nLine two, caf\u0065\u0301.\n" * 20
    path = tmp_path / "notes.txt"
    path.write_text(text, newline="")
    dataset = load_dataset(_cfg(path=str(path)), tmp_path / "out")
    assert dataset.source == str(path)
    assert isinstance(dataset.tokenizer, ByteTokenizer)
    stream = np.concatenate([dataset.train, dataset.validation])
    assert dataset.tokenizer.decode(stream) == normalize_text(text)
    assert len(dataset.validation) == round(0.1 * len(stream))
    assert not (tmp_path / "out").exists()  # byte-level saves nothing


def test_explicit_path_wins_over_the_config(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.txt"
    chosen.write_text("chosen text " * 40)
    dataset = load_dataset(_cfg(path=str(tmp_path / "absent.txt")), tmp_path, chosen)
    assert dataset.source == str(chosen)


def test_load_dataset_defaults_to_the_python_help_text(corpus: str, tmp_path: Path) -> None:
    dataset = load_dataset(_cfg(), tmp_path)
    assert dataset.source == DEFAULT_CORPUS
    assert len(dataset.train) + len(dataset.validation) == len(corpus.encode())


def test_load_dataset_with_bpe_saves_then_reuses(bpe_text: str, tmp_path: Path) -> None:
    path = tmp_path / "slice.txt"
    path.write_text(bpe_text)
    cfg = _cfg(vocab_size=300, tokenizer="bpe", path=str(path))
    first = load_dataset(cfg, tmp_path / "run")
    assert (tmp_path / "run" / TOKENIZER_FILE).is_file()
    second = load_dataset(cfg, tmp_path / "run")
    assert np.array_equal(first.train, second.train)
    assert first.tokenizer.vocab_size == 300 and first.train.max() < 300


@pytest.mark.parametrize(
    ("length", "val_fraction", "expected"),
    [
        # 30 bytes, half held out: 15 left to train, a window is 17.
        (30, 0.5, "too short: 30 tokens leave 15 for training, fewer than one window"),
        # 100 bytes, 10 held out.
        (100, 0.1, "too short for validation: data.val_fraction 0.1 of 100 tokens is 10"),
    ],
)
def test_text_too_short_for_a_window(
    tmp_path: Path, length: int, val_fraction: float, expected: str
) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * length)
    cfg = _cfg(val_fraction=val_fraction, path=str(path))
    message = _user_error(lambda: load_dataset(cfg, tmp_path))
    assert message.startswith(f"{path}: {expected}")
    assert "training.seq_len + 1 = 17" in message


@pytest.mark.parametrize(
    ("setup", "names"),
    [
        ("missing", "absent.txt"),
        ("latin1", "latin1.txt: not UTF-8 text: byte 0xe9 at offset 3"),
        ("small_vocab", "model.vocab_size"),
    ],
)
def test_load_dataset_bad_input_is_one_named_line(tmp_path: Path, setup: str, names: str) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    paths = {"missing": tmp_path / "absent.txt", "latin1": latin1, "small_vocab": None}
    path = paths[setup]
    cfg = _cfg(vocab_size=64 if setup == "small_vocab" else 256)
    message = _user_error(lambda: load_dataset(cfg, tmp_path, path))
    assert names in message
