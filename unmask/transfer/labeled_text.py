"""Texts with binary labels: JSONL and CSV readers, the fixed train/validation split, encoding and padding.

Formats (`--classification_data`, `unmask classify --input`):
- JSONL (`.jsonl`, `.ndjson`): one object per line, `{"text": "...", "label": 0}`; blank lines are skipped.
- CSV (`.csv`): a header row naming the columns `text` and `label` (others are ignored), then one row per text;
  quoted fields may span lines (RFC 4180, Python's `csv`).
- `unmask classify` also reads plain text (any other suffix): every non-blank line is one text.

Every problem is a `UserError` that starts with `FILE:LINE:`; labels must be 0 or 1. Texts are encoded with the
model's vocabulary: characters it lacks are one error listing them and the first line holding one.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.data.dataset import Vocab
from unmask.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
SPLIT_SEED = 42  # the validation split is fixed, like the trainer's validation set


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: int | None  # 0 or 1; None when the input carries no label (unmask classify)
    line: int  # 1-based line where the record starts


def _read_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what}={path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None


def _label(value: object, where: str, required: bool) -> int | None:
    if value is None or value == "":
        if required:
            raise UserError(f"{where}: missing label (expected 0 or 1)")
        return None
    if isinstance(value, str):
        value = value.strip()
        if value in ("0", "1"):
            return int(value)
    elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise UserError(f"{where}: label {value!r} is not 0 or 1")


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: 'text' must be a string, got {type(value).__name__}")
    if not value:
        raise UserError(f"{where}: empty text")
    return value


def _read_jsonl(path: Path, content: str, labels_required: bool) -> list[LabeledText]:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise UserError(f'{where}: expected an object with "text" and "label", got {line.strip()[:60]!r}')
        records.append(LabeledText(_text(obj["text"], where), _label(obj.get("label"), where, labels_required), number))
    return records


def _read_csv(path: Path, content: str, labels_required: bool) -> list[LabeledText]:
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as exc:
        raise UserError(f"{path}:1: malformed CSV ({exc})") from None
    columns = [name.strip() for name in header]
    if "text" not in columns or (labels_required and "label" not in columns):
        needed = "text,label" if labels_required else "text"
        raise UserError(f"{path}:1: expected a header row with the columns {needed}, got {','.join(columns)!r}")
    text_col = columns.index("text")
    label_col = columns.index("label") if "label" in columns else None
    records = []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(f"{path}:{start}: malformed CSV ({exc})") from None
        line, start = start, reader.line_num + 1  # a quoted field may span lines: the record starts at `line`
        where = f"{path}:{line}"
        if not row:
            continue  # a blank line
        if len(row) != len(columns):
            raise UserError(f"{where}: {len(row)} field(s), the header has {len(columns)}")
        label = _label(row[label_col], where, labels_required) if label_col is not None else None
        records.append(LabeledText(_text(row[text_col], where), label, line))
    return records


def read_labeled(path: Path, what: str = "--classification_data", labels_required: bool = True) -> list[LabeledText]:
    """Records of a JSONL or CSV file (and, with `labels_required=False`, a plain text file: one text per line)."""
    content = _read_text(path, what)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _read_jsonl(path, content, labels_required)
    elif suffix in CSV_SUFFIXES:
        records = _read_csv(path, content, labels_required)
    elif not labels_required:
        records = [LabeledText(line, None, n) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    else:
        raise UserError(f"{what}={path}: expected a .jsonl or .csv file")
    if not records:
        raise UserError(f"{what}={path}: no texts in the file")
    return records


def stratified_split(
    records: list[LabeledText], val_fraction: float, path: Path, seed: int = SPLIT_SEED
) -> tuple[list[LabeledText], list[LabeledText]]:
    """(train, val): round(val_fraction * n_c) of each class c (at least 1) to validation, chosen by a seeded
    permutation; both splits keep the file's order."""
    generator = torch.Generator().manual_seed(seed)
    val_index: set[int] = set()
    for c in (0, 1):
        members = [i for i, r in enumerate(records) if r.label == c]
        if len(members) < 2:
            raise UserError(
                f"{path}: {len(members)} text(s) with label {c}; each class needs at least 2 (one for training, "
                "one for validation)"
            )
        n_val = min(len(members) - 1, max(1, int(val_fraction * len(members) + 0.5)))
        order = torch.randperm(len(members), generator=generator).tolist()
        val_index.update(members[j] for j in order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_index]
    val = [r for i, r in enumerate(records) if i in val_index]
    return train, val


@dataclass
class EncodedTexts:
    """Texts as one padded id tensor: row i holds text i's first `lengths[i]` ids, then `pad_id`."""

    ids: torch.Tensor  # (N, T) long
    lengths: torch.Tensor  # (N,) long, >= 1
    labels: torch.Tensor  # (N,) long (-1 where unlabeled)
    truncated: int  # texts cut to T characters

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, pad) for the given rows, cut to the longest of them: x (b, t) ids, pad (b, t) bool."""
        t = int(self.lengths[rows].max())
        x = self.ids[rows, :t]
        pad = torch.arange(t) >= self.lengths[rows, None]
        return x, pad


def encode_texts(records: list[LabeledText], vocab: Vocab, block_size: int, path: Path) -> EncodedTexts:
    """Encode with `vocab`, cutting texts to `block_size`; unknown characters are one error listing them."""
    known = set(vocab.itos)
    unknown: set[str] = set()
    first_line = 0
    for r in records:
        missing = set(r.text) - known
        if missing and not unknown:
            first_line = r.line
        unknown |= missing
    if unknown:
        shown = " ".join(repr(ch) for ch in sorted(unknown)[:20]) + (" ..." if len(unknown) > 20 else "")
        raise UserError(
            f"{path}:{first_line}: {len(unknown)} character(s) not in the model's vocabulary of {vocab.n_chars} "
            f"(first at this line): {shown}"
        )
    ids = torch.full((len(records), block_size), vocab.mask_id, dtype=torch.long)
    lengths = torch.empty(len(records), dtype=torch.long)
    truncated = 0
    for i, r in enumerate(records):
        row = vocab.encode(r.text[:block_size])
        truncated += len(r.text) > block_size
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[i] = len(row)
    labels = torch.tensor([-1 if r.label is None else r.label for r in records], dtype=torch.long)
    return EncodedTexts(ids, lengths, labels, truncated)
