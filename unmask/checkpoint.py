"""Checkpoint files: atomic writes, `weights_only=True` loads, JSON sidecars, rotation.

A checkpoint `out_dir/ckpt_unmasking_{iter}.pt` is a plain dict of tensors and primitive containers (see
docs/architecture.md for the keys), so `torch.load(weights_only=True)` reads it and nothing is unpickled. It is
written to a temporary file in the same directory, fsynced and renamed, so a crash never leaves a partial file
under the final name; the newest `.pt` present is therefore always complete. A human-readable JSON sidecar
(`ckpt_unmasking_{iter}.json`) repeats the metadata.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
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
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(path.with_suffix(".json"), {"format_version": FORMAT_VERSION, "file": path.name, **sidecar})
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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`; unreadable or foreign files are a user error naming the file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise UserError(f"{path}: not an unmask checkpoint")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this unmask "
            f"({FORMAT_VERSION}); upgrade unmask"
        )
    return ckpt
