"""Checkpoint files: atomic writes, `weights_only=True` loads, JSON sidecars, rotation.

A checkpoint `out_dir/ckpt_unmasking_{iter}.pt` is a plain dict of tensors and primitive containers (see
docs/architecture.md for the keys), so `torch.load(weights_only=True)` reads it and nothing is unpickled. It is
written to a temporary file in the same directory, fsynced and renamed, so a crash never leaves a partial file
under the final name. A human-readable JSON sidecar (`ckpt_unmasking_{iter}.json`) repeats the metadata and
records the payload's size and sha256: loading checks them, which catches damage that still unpickles (a flipped
byte) as well as truncation. Resuming from the newest checkpoint falls back to the next older one, with a warning,
when the newest is damaged; a checkpoint named explicitly must be intact (docs/origin.md §4.2).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unmask.errors import UserError

PREFIX = "ckpt_unmasking_"
_NAME = re.compile(rf"^{PREFIX}(\d+)\.pt$")
FORMAT_VERSION = 1


def checkpoint_path(out_dir: Path, iter_num: int) -> Path:
    return out_dir / f"{PREFIX}{iter_num}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(
    out_dir: Path, iter_num: int, state: dict[str, Any], sidecar: dict[str, Any], keep_last: int = 0
) -> Path:
    """Atomically write checkpoint + sidecar, then delete all but the `keep_last` newest (0 keeps all)."""
    path = checkpoint_path(out_dir, iter_num)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, payload)
    integrity = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write_json(
        path.with_suffix(".json"), {"format_version": FORMAT_VERSION, "file": path.name, **integrity, **sidecar}
    )
    if keep_last > 0:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def find_checkpoint(out_dir: Path, ckpt_filename: str | None = None) -> Path:
    """The checkpoint to resume from: `ckpt_filename` in `out_dir`, else the newest one there."""
    if ckpt_filename is not None:
        path = out_dir / ckpt_filename
        if not path.is_file():
            raise UserError(f"--ckpt_filename={ckpt_filename}: no such file in {out_dir}")
        return path
    found = list_checkpoints(out_dir)
    if not found:
        raise UserError(f"--init_from=resume: no {PREFIX}<iter>.pt checkpoint in {out_dir}")
    return found[-1][1]


def load_for_resume(
    out_dir: Path, ckpt_filename: str | None = None, warn: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """(path, checkpoint) to resume from. A named file must load; otherwise the newest intact checkpoint is taken,
    and every damaged newer one is reported through `warn` (default: a line on stderr)."""
    if ckpt_filename is not None:
        path = find_checkpoint(out_dir, ckpt_filename)
        return path, load_checkpoint(path)
    find_checkpoint(out_dir)  # the "no checkpoint" error
    warn = warn or (lambda line: print(line, file=sys.stderr))
    problems = []
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            ckpt = load_checkpoint(path)
        except UserError as exc:
            problems.append(str(exc))
            warn(f"warning: {exc}; trying the previous checkpoint")
            continue
        return path, ckpt
    raise UserError(f"--init_from=resume: no intact checkpoint in {out_dir} ({'; '.join(problems)})")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`; unreadable, damaged or foreign files are a user error naming the file."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    damage = _integrity_problem(path, payload)
    if damage is not None:
        raise UserError(f"{path}: damaged checkpoint ({damage})")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, unsafe (a pickle that is not plain data) or not a torch file
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise UserError(f"{path}: not an unmask checkpoint")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this unmask "
            f"({FORMAT_VERSION}); upgrade unmask"
        )
    return ckpt


def _integrity_problem(path: Path, payload: bytes) -> str | None:
    """Size and sha256 against the sidecar written with the file; None when they match or there is no record."""
    try:
        record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no sidecar (a crash between the two writes, or a copied .pt): the load itself must succeed
    if not isinstance(record, dict) or "sha256" not in record:
        return None  # written before checksums were recorded
    if len(payload) != record.get("bytes"):
        return f"{len(payload):,} bytes, its sidecar recorded {record.get('bytes'):,}"
    if hashlib.sha256(payload).hexdigest() != record["sha256"]:
        return "sha256 differs from the one its sidecar recorded"
    return None
