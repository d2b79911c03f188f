"""Reading prepared datasets (see `unmask.data.prepare`) and sampling training windows from them.

A dataset directory holds `train.bin` / `val.bin` (raw uint8 or uint16 character ids), the paragraph-start
arrays and `meta.json`. The id files are memory-mapped read-only, so opening a dataset costs nothing however
large it is and the page cache is shared between processes.

Window sampling draws all its randomness from an explicit CPU `torch.Generator`, so a run's batches depend
only on its seed, not on the device or on what else consumed random numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported by the window functions that need it, not at module level: `unmask prepare` imports
# this module for the format constants and checks, and importing torch would add seconds of start-up and
# about 200 MB of resident memory to a command that never touches a tensor.

from unmask.errors import UserError

# The dataset format, shared with `unmask.data.prepare` (which imports it from here, so that reading a dataset
# never imports the download code). Bump FORMAT_VERSION when a reader of the old version would misread
# the new files; added optional meta.json keys do not need a bump.
FORMAT_VERSION = 1
MASK_TOKEN = "[MASK]"
TRAIN_BIN = "train.bin"
VAL_BIN = "val.bin"
TRAIN_PARAGRAPHS = "train_paragraphs.npy"
VAL_PARAGRAPHS = "val_paragraphs.npy"
META_JSON = "meta.json"

# Ids per slice of the range check in `load_dataset`: 16 Mi ids keep the temporary comparison arrays small
# (16 MiB of bools) while the per-slice overhead stays negligible next to numpy's max over them.
RANGE_CHECK_CHUNK = 1 << 24
# Bytes read at a time when `verify_dataset` hashes a file.
_HASH_CHUNK = 1 << 24

# How `decode` renders [MASK]: one visible, fixed-width glyph per position keeps partially unmasked text
# aligned with the final text, and "█" cannot be confused with a real character of typical corpora.
MASK_GLYPH = "\u2588"
SPLITS = ("train", "val")
_BIN_FILES = {"train": TRAIN_BIN, "val": VAL_BIN}
_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16)}


@dataclass(frozen=True)
class Vocab:
    """Character vocabulary: id i is `itos[i]`; the id after the last character is [MASK]."""

    itos: tuple[str, ...]

    def __post_init__(self) -> None:
        if any(len(ch) != 1 for ch in self.itos) or len(set(self.itos)) != len(self.itos):
            raise ValueError("Vocab.itos must be distinct single characters")

    @property
    def n_chars(self) -> int:
        """Number of real characters."""
        return len(self.itos)

    @property
    def mask_id(self) -> int:
        return len(self.itos)

    @property
    def size(self) -> int:
        """Model vocabulary size: the characters plus [MASK]."""
        return len(self.itos) + 1

    @cached_property
    def _stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.itos)}

    @cached_property
    def _table(self) -> np.ndarray:
        # One UTF-32 code unit per id (mask last), so decoding is a gather plus one bytes.decode.
        return np.array([ord(ch) for ch in (*self.itos, MASK_GLYPH)], dtype="<u4")

    def encode(self, text: str, source: str = "text") -> list[int]:
        """Ids of `text`; characters the model has never seen are a UserError that starts with `source`."""
        stoi = self._stoi
        unknown = sorted({ch for ch in text if ch not in stoi})
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(
                f"{source}: {len(unknown)} character(s) not in the dataset's vocabulary of {self.n_chars}: {shown}"
            )
        return [stoi[ch] for ch in text]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a 1-D id sequence; [MASK] is rendered as MASK_GLYPH ("█")."""
        # Without torch imported, `ids` cannot be a tensor (and decoding must not import it).
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(ids, torch_module.Tensor):
            array = cast("torch.Tensor", ids).detach().cpu().numpy()
        else:
            array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(array.shape)}")
        if array.size == 0:
            return ""
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"decode expects integer ids, got {array.dtype}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.size:
            raise ValueError(f"ids must be in [0, {self.size - 1}], got values in [{low}, {high}]")
        return self._table[array].tobytes().decode("utf-32-le")


@dataclass
class Dataset:
    """A prepared dataset: metadata, vocabulary, read-only memory-mapped splits and paragraph starts."""

    name: str
    dir: Path
    meta: dict[str, Any]
    vocab: Vocab
    train: np.ndarray
    val: np.ndarray
    paragraphs: dict[str, np.ndarray] = field(default_factory=dict)

    def split(self, name: str) -> np.ndarray:
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise UserError(f"--split={name}: unknown split; expected one of {', '.join(SPLITS)}")


def load_dataset(dataset_dir: Path) -> Dataset:
    """Open a directory written by `unmask prepare`, checking it against its meta.json.

    Checked, each with a one-line UserError naming the file: meta.json's consistency (see `_check_meta`),
    each split's size against `n_train` / `n_val`, the paragraph-start files, and every id of both splits:
    an id >= vocab_size (which includes the [MASK] id) would otherwise crash deep inside a run (an index
    error in the embedding) or, worse, train silently on corrupted text. The range check reads the whole
    splits once, vectorised in slices of RANGE_CHECK_CHUNK ids (a max over memory-mapped pages; measured
    on a loaded 2-core VM with the files in the page cache: 0.03 s for 100 MB, 0.65 s for 2 GB; a cold
    cache adds the disk read).

    The sha256 checksums that prepare records in meta.json (`files`) are NOT verified here: hashing took
    about 8x as long as the range check (0.3 s for 100 MB, i.e. ~3 s per GB), and every training, eval and
    sample start would pay it. `verify_dataset` checks them on demand.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    meta_path = dataset_dir / META_JSON
    vocab, dtype = _check_meta(meta, meta_path)

    splits: dict[str, np.ndarray] = {}
    paragraphs: dict[str, np.ndarray] = {}
    for split in SPLITS:
        n = meta[f"n_{split}"]
        path = dataset_dir / _BIN_FILES[split]
        splits[split] = _open_split(path, dtype, n)
        check_id_range(splits[split], vocab.n_chars, path)
        paragraphs[split] = _load_paragraphs(dataset_dir / meta["paragraph_starts"][split], n)
    return Dataset(
        name=str(meta.get("name", dataset_dir.name)),
        dir=dataset_dir,
        meta=meta,
        vocab=vocab,
        train=splits["train"],
        val=splits["val"],
        paragraphs=paragraphs,
    )


def read_meta(dataset_dir: Path) -> Any:
    """The parsed meta.json of a dataset directory (not yet checked), or a UserError saying how to prepare it."""
    dataset_dir = Path(dataset_dir)
    meta_path = dataset_dir / META_JSON
    hint = (
        f"run `unmask prepare shakespeare_char` or `unmask prepare --input=FILE --name={dataset_dir.name}` "
        "(with the matching --data_dir) first"
    )
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: no such dataset directory; {hint}")
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: missing, so {dataset_dir} is not a prepared dataset; {hint}")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_path}: unreadable ({_one_line(exc)}); re-run unmask prepare") from None


def check_id_range(tokens: np.ndarray, n_chars: int, path: Path) -> None:
    """Refuse any id >= n_chars (real characters are 0..n_chars-1; n_chars is [MASK]), naming the first one.

    Vectorised over slices of RANGE_CHECK_CHUNK ids so that a multi-GB memmap is never materialised; only
    a failing slice is searched for the offending offset.
    """
    for lo in range(0, len(tokens), RANGE_CHECK_CHUNK):
        chunk = tokens[lo : lo + RANGE_CHECK_CHUNK]
        if int(chunk.max()) < n_chars:
            continue
        offset = lo + int(np.argmax(chunk >= n_chars))
        bad = int(tokens[offset])
        what = f"the {MASK_TOKEN} id" if bad == n_chars else "beyond the vocabulary"
        raise UserError(
            f"{path}: id {bad} at offset {offset:,} is {what} (meta.json has {n_chars} characters, ids "
            f"0..{n_chars - 1}); the split or meta.json is corrupted: re-run unmask prepare"
        )


def verify_dataset(dataset_dir: Path) -> None:
    """Check every file that meta.json's `files` records (train/val ids, paragraph starts) by size and sha256.

    Reads all of them (seconds per GB), which is why `load_dataset` does not call it. Datasets prepared
    before checksums were recorded cannot be verified: that is a UserError too, saying so.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    meta_path = dataset_dir / META_JSON
    _check_meta(meta, meta_path)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{meta_path}: records no checksums (prepared by an older unmask); re-run unmask prepare")
    for filename in sorted(files):
        record = files[filename]
        if (
            Path(filename).name != filename
            or not isinstance(record, dict)
            or not isinstance(record.get("bytes"), int)
            or not isinstance(record.get("sha256"), str)
        ):
            raise UserError(f"{meta_path}: 'files' entry {filename!r} must be a plain file name with bytes and sha256")
        path = dataset_dir / filename
        size, digest = _size_and_sha256(path)
        if size != record["bytes"]:
            raise UserError(
                f"{path}: has {size:,} bytes but meta.json records {record['bytes']:,}; re-run unmask prepare"
            )
        if digest != record["sha256"]:
            raise UserError(
                f"{path}: sha256 {digest} does not match meta.json's {record['sha256']} (the file changed after "
                "prepare); re-run unmask prepare"
            )


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_CHUNK):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}; re-run unmask prepare") from None
    return size, digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_meta(meta: Any, meta_path: Path) -> tuple[Vocab, np.dtype[Any]]:
    def bad(what: str) -> UserError:
        return UserError(f"{meta_path}: {what}; re-run unmask prepare")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise bad(f"format_version is {version!r}, this unmask reads {FORMAT_VERSION}")
    itos = meta.get("itos")
    if not isinstance(itos, list) or not all(isinstance(ch, str) and len(ch) == 1 for ch in itos):
        raise bad("'itos' must be a list of single characters")
    if len(set(itos)) != len(itos):
        raise bad("'itos' has repeated characters")
    if meta.get("vocab_size") != len(itos):
        raise bad(f"vocab_size is {meta.get('vocab_size')!r} but itos has {len(itos)} characters")
    special = meta.get("special_tokens")
    if not isinstance(special, dict) or special.get(MASK_TOKEN) != len(itos):
        raise bad(f"special_tokens[{MASK_TOKEN!r}] must equal vocab_size")
    dtype = _DTYPES.get(str(meta.get("dtype")))
    if dtype is None:
        raise bad(f"dtype {meta.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    if len(itos) + 1 > 2 ** (8 * dtype.itemsize):
        raise bad(f"{len(itos) + 1} ids do not fit in {dtype.name}")
    for key in ("n_train", "n_val"):
        if not isinstance(meta.get(key), int) or meta[key] <= 0:
            raise bad(f"{key!r} must be a positive integer")
    # `n_chars` is informational (readers use n_train / n_val), but a mismatch means a hand-edited or
    # mixed-up meta.json, so it is refused rather than trusted halfway.
    if "n_chars" in meta and meta["n_chars"] != meta["n_train"] + meta["n_val"]:
        raise bad(f"n_chars is {meta['n_chars']!r} but n_train + n_val is {meta['n_train'] + meta['n_val']}")
    starts = meta.get("paragraph_starts")
    if not isinstance(starts, dict) or not all(isinstance(starts.get(s), str) for s in SPLITS):
        raise bad("'paragraph_starts' must name a .npy file for train and val")
    if any(Path(starts[s]).name != starts[s] for s in SPLITS):
        # Only bare file names: a meta.json must not make us read files outside the dataset directory.
        raise bad("'paragraph_starts' files must be plain file names inside the dataset directory")
    return Vocab(tuple(itos)), dtype


def _open_split(path: Path, dtype: np.dtype[Any], n: int) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError:
        raise UserError(f"{path}: missing; re-run unmask prepare") from None
    if size != n * dtype.itemsize:
        raise UserError(
            f"{path}: has {size:,} bytes but meta.json says {n:,} {dtype.name} ids "
            f"({n * dtype.itemsize:,} bytes); re-run unmask prepare"
        )
    # Little-endian on disk regardless of the machine, matching what prepare writes.
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", shape=(n,))


def _load_paragraphs(path: Path, n_tokens: int) -> np.ndarray:
    try:
        starts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({_one_line(exc)}); re-run unmask prepare") from None
    if starts.ndim != 1 or (starts.size and (starts.min() < 0 or starts.max() >= n_tokens)):
        raise UserError(f"{path}: not a list of positions inside the split; re-run unmask prepare")
    return starts.astype(np.int64, copy=False)


def check_split_length(dataset: Dataset, split: str, block_size: int) -> None:
    """Refuse a block size the split cannot fill, naming both numbers."""
    n = len(dataset.split(split))
    if n < block_size + 1:
        raise UserError(
            f"--block_size={block_size} is too long for {dataset.dir / _BIN_FILES[split]}: the split has "
            f"{n:,} characters, need at least {block_size + 1:,}"
        )


def window_starts(
    n_tokens: int,
    block_size: int,
    paragraphs: np.ndarray | None,
    count: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """`count` int64 window offsets in [0, n_tokens - block_size].

    With `paragraphs`, offsets are drawn uniformly among the paragraph starts that leave room for a full
    window; if there are none, uniformly among all offsets.
    """
    import torch

    if generator.device.type != "cpu":
        raise ValueError("window_starts needs a CPU torch.Generator so batches do not depend on the device")
    last = n_tokens - block_size
    if block_size <= 0 or last < 0:
        raise ValueError(f"cannot take windows of {block_size} from {n_tokens} tokens")
    if paragraphs is not None and len(paragraphs):
        usable = paragraphs[paragraphs <= last]
        if len(usable):
            pick = torch.randint(0, len(usable), (count,), generator=generator)
            return torch.from_numpy(np.ascontiguousarray(usable, dtype=np.int64))[pick]
    return torch.randint(0, last + 1, (count,), generator=generator, dtype=torch.int64)


def gather_windows(tokens: np.ndarray, starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """(len(starts), block_size) int64 tensor of `tokens[s : s + block_size]` for each start s."""
    import torch

    offsets = starts.detach().cpu().numpy().astype(np.int64, copy=False)
    if offsets.ndim != 1:
        raise ValueError(f"starts must be 1-D, got shape {tuple(offsets.shape)}")
    if offsets.size and (offsets.min() < 0 or offsets.max() + block_size > len(tokens)):
        raise ValueError(f"window starts out of range for {len(tokens)} tokens and block_size {block_size}")
    # One fancy-indexing gather reads all windows at once (from the memmap, only the touched pages).
    index = offsets[:, None] + np.arange(block_size, dtype=np.int64)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


def sample_windows(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    generator: torch.Generator,
    paragraphs: np.ndarray | None = None,
) -> torch.Tensor:
    """A (batch_size, block_size) int64 batch of random windows; see `window_starts`."""
    starts = window_starts(len(tokens), block_size, paragraphs, batch_size, generator)
    return gather_windows(tokens, starts, block_size)
