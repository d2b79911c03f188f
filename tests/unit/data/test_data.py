"""Tests for `unmask.data.dataset`: the vocabulary, loading prepared datasets, and window sampling."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask.data.dataset import (
    MASK_GLYPH,
    Dataset,
    Vocab,
    check_split_length,
    gather_windows,
    load_dataset,
    sample_windows,
    verify_dataset,
    window_starts,
)
from unmask.data.prepare import prepare
from unmask.errors import UserError

MIRROR_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
TINY = MIRROR_DIR / "tinyshakespeare.txt"

# Paragraphs of varying length so that paragraph starts are irregular.
CORPUS = "".join(f"SPEAKER {i}:\n" + "word " * (i % 7 + 1) + "\nend.\n\n" for i in range(60))


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return load_dataset(prepare(None, corpus, None, tmp_path / "data", val_fraction=0.25, log=lambda _: None))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Vocab


def test_vocab_sizes_and_round_trip() -> None:
    vocab = Vocab(("\n", " ", "a", "b", "é"))
    assert (vocab.n_chars, vocab.mask_id, vocab.size) == (5, 5, 6)
    ids = vocab.encode("ab é\nba")
    assert ids == [2, 3, 1, 4, 0, 3, 2]
    assert vocab.decode(ids) == "ab é\nba"
    assert vocab.decode(torch.tensor(ids)) == "ab é\nba"
    assert vocab.decode(np.array(ids, dtype=np.uint8)) == "ab é\nba"
    assert vocab.decode([]) == ""


def test_vocab_renders_mask_as_full_block() -> None:
    vocab = Vocab(("a", "b"))
    assert MASK_GLYPH == "\u2588"
    assert vocab.decode([0, vocab.mask_id, 1]) == "a\u2588b"


def test_vocab_encode_unknown_characters_lists_them() -> None:
    vocab = Vocab(("a", "b"))
    with pytest.raises(UserError) as info:
        vocab.encode("abxzx", source="--prompt")
    message = str(info.value)
    assert message.startswith("--prompt: 2 character(s)") and "'x'" in message and "'z'" in message


def test_vocab_decode_rejects_bad_ids() -> None:
    vocab = Vocab(("a", "b"))
    with pytest.raises(ValueError, match="ids must be in"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="ids must be in"):
        vocab.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        Vocab(("a", "a"))


# ---------------------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_fields(dataset: Dataset) -> None:
    n_train = int(len(CORPUS) * 0.75)
    assert dataset.name == "corpus"
    assert dataset.vocab.itos == tuple(sorted(set(CORPUS)))
    assert isinstance(dataset.train, np.memmap) and dataset.train.dtype == np.uint8
    assert len(dataset.train) == n_train and len(dataset.val) == len(CORPUS) - n_train
    assert dataset.split("train") is dataset.train and dataset.split("val") is dataset.val
    assert dataset.vocab.decode(dataset.train) + dataset.vocab.decode(dataset.val) == CORPUS
    assert set(dataset.paragraphs) == {"train", "val"}
    assert dataset.paragraphs["train"].dtype == np.int64
    with pytest.raises(ValueError):
        dataset.train[0] = 1  # read-only mapping: a bug elsewhere cannot corrupt the prepared data
    with pytest.raises(UserError, match="^--split=test: "):
        dataset.split("test")


def test_importing_data_does_not_import_download_code() -> None:
    # torch itself imports urllib.request and tarfile, so what counts is what `unmask.data.dataset` adds on top of
    # numpy + torch: reading a dataset must not drag in the fetchers (and their pip/network machinery).
    probe = (
        "import sys, numpy, torch\n"
        "before = set(sys.modules)\n"
        "import unmask.data.dataset\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert "unmask.data.dataset" in out
    forbidden = {
        "unmask.data.prepare",
        "unmask.data.sources",
        "urllib",
        "urllib.request",
        "tarfile",
        "subprocess",
        "tempfile",
    }
    assert forbidden.isdisjoint(out), sorted(forbidden.intersection(out))


def test_prepare_does_not_import_torch() -> None:
    # `unmask prepare` never touches a tensor; torch would cost seconds of start-up and ~200 MB resident.
    probe = "import sys, unmask.data.prepare\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_dataset_missing_tells_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_dataset(tmp_path / "nothing")
    # The command that exists: `unmask prepare shakespeare_char` (there is no --dataset flag).
    assert "`unmask prepare shakespeare_char`" in str(info.value) and "--dataset" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="meta.json: missing.*unmask prepare"):
        load_dataset(tmp_path / "empty")


def test_load_dataset_detects_truncated_split(dataset: Dataset) -> None:
    (dataset.dir / "val.bin").write_bytes(b"\x00" * 3)
    with pytest.raises(UserError, match=r"val\.bin: has 3 bytes"):
        load_dataset(dataset.dir)


def test_load_dataset_rejects_bad_meta(dataset: Dataset) -> None:
    meta_path = dataset.dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "format_version": 99}), encoding="utf-8")
    with pytest.raises(UserError, match="format_version"):
        load_dataset(dataset.dir)
    meta_path.write_text(json.dumps({**meta, "paragraph_starts": {"train": "../x.npy", "val": "v.npy"}}))
    with pytest.raises(UserError, match="plain file names"):
        load_dataset(dataset.dir)
    meta_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="meta.json: unreadable"):
        load_dataset(dataset.dir)


def test_check_split_length_names_both_numbers(dataset: Dataset) -> None:
    n_val = len(dataset.val)
    check_split_length(dataset, "val", n_val - 1)  # exactly block_size + 1 characters is enough
    with pytest.raises(UserError) as info:
        check_split_length(dataset, "val", n_val)
    message = str(info.value)
    assert message.startswith(f"--block_size={n_val} is too long for {dataset.dir / 'val.bin'}")
    assert f"the split has {n_val:,} characters, need at least {n_val + 1:,}" in message


# ---------------------------------------------------------------------------------------------------------
# window sampling


def test_window_starts_are_deterministic_and_in_bounds() -> None:
    a = window_starts(1000, 64, None, 512, gen(1))
    b = window_starts(1000, 64, None, 512, gen(1))
    c = window_starts(1000, 64, None, 512, gen(2))
    assert a.dtype == torch.int64 and a.shape == (512,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) <= 1000 - 64
    # The last offset is reachable: with one possible window every start is 0, with two both appear.
    assert window_starts(64, 64, None, 8, gen(0)).tolist() == [0] * 8
    assert set(window_starts(65, 64, None, 200, gen(0)).tolist()) == {0, 1}


def test_paragraph_windows_start_right_after_blank_line(dataset: Dataset) -> None:
    tokens, starts_all = dataset.train, dataset.paragraphs["train"]
    newline = dataset.vocab.itos.index("\n")
    block = 48
    starts = window_starts(len(tokens), block, starts_all, 400, gen(3))
    assert set(starts.tolist()) <= set(starts_all[starts_all <= len(tokens) - block].tolist())
    assert len(set(starts.tolist())) > 10  # draws really spread over the paragraphs
    for s in starts.tolist():
        assert tokens[s - 2] == tokens[s - 1] == newline and tokens[s] != newline
    batch = sample_windows(tokens, block, 16, gen(3), starts_all)
    assert batch.shape == (16, block) and batch.dtype == torch.int64
    assert all(dataset.vocab.decode(row).startswith("SPEAKER ") for row in batch)


def test_paragraph_starts_too_late_fall_back_to_uniform() -> None:
    late = np.array([990, 995], dtype=np.int64)
    with_late = window_starts(1000, 64, late, 256, gen(4))
    uniform = window_starts(1000, 64, None, 256, gen(4))
    assert torch.equal(with_late, uniform)
    empty = window_starts(1000, 64, np.zeros(0, dtype=np.int64), 256, gen(4))
    assert torch.equal(empty, uniform)
    only_usable = window_starts(1000, 64, np.array([10, 990]), 64, gen(4))
    assert set(only_usable.tolist()) == {10}


def test_gather_windows_matches_slices() -> None:
    tokens = (np.arange(300) % 251).astype(np.uint8)
    starts = torch.tensor([0, 5, 236, 100])
    windows = gather_windows(tokens, starts, 64)
    assert windows.dtype == torch.int64 and windows.shape == (4, 64)
    for row, s in zip(windows, starts.tolist(), strict=True):
        assert row.tolist() == tokens[s : s + 64].tolist()
    with pytest.raises(ValueError, match="out of range"):
        gather_windows(tokens, torch.tensor([237]), 64)


def test_sample_windows_is_deterministic(dataset: Dataset) -> None:
    a = sample_windows(dataset.val, 16, 8, gen(7))
    b = sample_windows(dataset.val, 16, 8, gen(7))
    assert torch.equal(a, b)
    assert int(a.max()) < dataset.vocab.n_chars  # real characters only: masking is the trainer's job


def test_window_starts_refuses_impossible_windows() -> None:
    with pytest.raises(ValueError):
        window_starts(10, 11, None, 1, gen(0))


@pytest.mark.skipif(not TINY.is_file(), reason=f"{TINY} not available")
def test_tiny_shakespeare_paragraph_windows(tmp_path: Path) -> None:
    ds = load_dataset(prepare("shakespeare_char", TINY, None, tmp_path, log=lambda _: None))
    check_split_length(ds, "val", 256)
    batch = sample_windows(ds.train, 256, 32, gen(0), ds.paragraphs["train"])
    # Every tiny Shakespeare paragraph opens with a speaker line such as "First Citizen:".
    for row in batch:
        first_line = ds.vocab.decode(row).split("\n", 1)[0]
        assert first_line.endswith(":"), first_line


# ---------------------------------------------------------------------------------------------------------
# checked data: corrupted ids and inconsistent meta.json are refused at load time, one line each


def _poke(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = value
    path.write_bytes(bytes(raw))


def _rewrite_meta(dataset: Dataset, **changes: object) -> None:
    meta_path = dataset.dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.update(changes)
    meta_path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _one_line_error(dataset_dir: Path) -> str:
    with pytest.raises(UserError) as info:
        load_dataset(dataset_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_id_beyond_vocabulary_is_refused_with_file_id_and_offset(dataset: Dataset) -> None:
    n_chars = dataset.vocab.n_chars
    _poke(dataset.dir / "train.bin", 1234, n_chars + 7)
    message = _one_line_error(dataset.dir)
    assert message.startswith(str(dataset.dir / "train.bin"))
    assert f"id {n_chars + 7} at offset 1,234" in message


def test_mask_id_in_split_is_refused(dataset: Dataset) -> None:
    # [MASK] = n_chars is a valid model input but never a character of the corpus: training on it as a
    # target would teach the model to emit [MASK].
    n_val = len(dataset.val)
    _poke(dataset.dir / "val.bin", n_val - 1, dataset.vocab.mask_id)
    message = _one_line_error(dataset.dir)
    assert message.startswith(str(dataset.dir / "val.bin"))
    assert f"id {dataset.vocab.mask_id} at offset {n_val - 1:,}" in message and "[MASK]" in message


def test_consistently_shortened_vocabulary_is_refused(dataset: Dataset) -> None:
    # Drop the last character from itos and shift vocab_size and [MASK] along: meta.json is self-consistent,
    # but the ids of the dropped character are now the [MASK] id.
    itos = list(dataset.vocab.itos)
    assert (dataset.train == len(itos) - 1).any()
    short = itos[:-1]
    _rewrite_meta(dataset, itos=short, vocab_size=len(short), special_tokens={"[MASK]": len(short)})
    message = _one_line_error(dataset.dir)
    assert f"id {len(short)} at offset" in message and "train.bin" in message


def test_first_bad_id_is_reported_across_chunks(dataset: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from unmask.data import dataset as data_module

    monkeypatch.setattr(data_module, "RANGE_CHECK_CHUNK", 64)  # many chunks even on a tiny split
    _poke(dataset.dir / "train.bin", 700, 250)
    _poke(dataset.dir / "train.bin", 900, 251)
    assert "id 250 at offset 700" in _one_line_error(dataset.dir)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: {"vocab_size": m["vocab_size"] + 1}, "vocab_size is {n1} but itos has {n} characters"),
        (lambda m: {"itos": [m["itos"][0], *m["itos"][:-1]]}, "'itos' has repeated characters"),
        (lambda m: {"itos": ["ab", *m["itos"][1:]]}, "'itos' must be a list of single characters"),
        (lambda m: {"dtype": "uint32"}, "dtype 'uint32' is not one of uint8, uint16"),
        (lambda m: {"n_chars": m["n_chars"] + 1}, "n_chars is {c1} but n_train + n_val is {c}"),
        (lambda m: {"n_train": m["n_train"] - 1, "n_chars": m["n_chars"] - 1}, "train.bin: has"),
    ],
)
def test_inconsistent_meta_is_one_specific_line(dataset: Dataset, change: object, expected: str) -> None:
    meta = json.loads((dataset.dir / "meta.json").read_text(encoding="utf-8"))
    assert callable(change)
    _rewrite_meta(dataset, **change(meta))
    message = _one_line_error(dataset.dir)
    n, c = meta["vocab_size"], meta["n_chars"]
    assert expected.format(n=n, n1=n + 1, c=c, c1=c + 1) in message, message


def test_dtype_too_small_for_vocabulary_is_refused(tmp_path: Path) -> None:
    text = "".join(chr(0x100 + i) for i in range(300)) * 2
    corpus = tmp_path / "wide.txt"
    corpus.write_text(text, encoding="utf-8")
    out = prepare(None, corpus, None, tmp_path / "data", log=lambda _: None)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    meta["dtype"] = "uint8"
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match="301 ids do not fit in uint8"):
        load_dataset(out)


def test_prepare_records_split_checksums_and_verify_detects_changes(dataset: Dataset) -> None:
    files = dataset.meta["files"]
    assert set(files) == {"train.bin", "val.bin", "train_paragraphs.npy", "val_paragraphs.npy"}
    for filename, record in files.items():
        raw = (dataset.dir / filename).read_bytes()
        assert record == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    verify_dataset(dataset.dir)  # freshly prepared: intact

    # A byte flipped to another valid character id passes the range check at load time (loading does not
    # hash: see load_dataset) but not verification.
    old = dataset.train[10]
    _poke(dataset.dir / "train.bin", 10, (int(old) + 1) % dataset.vocab.n_chars)
    load_dataset(dataset.dir)
    with pytest.raises(UserError) as info:
        verify_dataset(dataset.dir)
    message = str(info.value)
    assert message.startswith(str(dataset.dir / "train.bin")) and "sha256" in message and "\n" not in message


def test_verify_without_recorded_checksums_says_so(dataset: Dataset) -> None:
    meta = json.loads((dataset.dir / "meta.json").read_text(encoding="utf-8"))
    del meta["files"]
    (dataset.dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    load_dataset(dataset.dir)  # datasets prepared before checksums were recorded still load
    with pytest.raises(UserError, match="records no checksums"):
        verify_dataset(dataset.dir)
