"""Atomic writes, once: every file and directory unmask writes goes through here, so a reader (or a crash) sees
either the old content or the whole new one, never a partial file, and an OS error is one line naming the path.

- `atomic_write_bytes` / `atomic_write_json`: a temporary file next to the target (created with the user's umask),
  fsynced, renamed over it, then the directory fsynced;
- `write_new_file`: the same, but only if the name is free (a hard link either creates the whole file or fails),
  for outputs that must never overwrite an earlier one;
- `replace_directory`: a finished temporary directory renamed into place, an existing one moved aside first and put
  back if the rename fails (prepared datasets, exports);
- `sweep_temp_files`: removes the temporary files of writers killed mid-write (called when a run opens its
  directory).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from unmask.errors import UserError

_TEMP = re.compile(r"^\..+\.[^.]+\.tmp$")
_temp_counter = itertools.count()


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself already happened
    finally:
        os.close(fd)


def describe_os_error(exc: OSError) -> str:
    """`no space left on the device (ENOSPC)`-style text for an OSError (also for other writers, e.g. the
    metrics log)."""
    plain = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    code = exc.errno if isinstance(exc.errno, int) else None
    name = errno.errorcode.get(code, "") if code is not None else ""
    text = plain.get(code) if code is not None else None
    text = text or exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file next to `path`, opened for writing. `os.open` with mode 0o666 lets the kernel apply the
    umask, as for any file the user creates (mkstemp would force 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}-{next(_temp_counter)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue  # left by an earlier process with the same pid


def atomic_write_bytes(path: Path, data: bytes, kept: str | None = None) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one.

    An OSError (disk full, quota, read-only or forbidden directory) removes the temporary file and becomes one
    UserError naming `path` and saying what was kept (`kept`, default: the previous file under that name)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        remove_quietly(tmp)
        if kept is None:
            kept = "its previous version is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"{path}: cannot write: {describe_os_error(exc)}; {kept}") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def remove_quietly(tmp: Path | None) -> None:
    if tmp is None:
        return
    with contextlib.suppress(OSError):  # the directory refuses changes: sweep_temp_files removes it at a run start
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any, kept: str | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), kept)


def sweep_temp_files(out_dir: Path) -> int:
    """Remove the temporary files interrupted writes left in `out_dir` (`.NAME.TAG.tmp`); returns how many.

    Call it at run start, before this run writes anything: a writer killed between creating its temporary file and
    renaming it leaves one behind, and nothing else ever removes it."""
    if not out_dir.is_dir():
        return 0
    removed = 0
    for entry in out_dir.iterdir():
        if not _TEMP.match(entry.name) or not entry.is_file() or entry.is_symlink():
            continue
        try:
            entry.unlink()
        except OSError:
            continue  # not ours to remove (permissions): leave it
        removed += 1
    return removed


def write_new_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and only if `path` does not exist (FileExistsError otherwise).

    A temporary file in the same directory is fsynced and hard-linked to `path`: the link either creates the
    whole file or fails because the name is taken, so neither a crash nor a concurrent writer leaves a partial
    or overwritten file. Other OSErrors propagate (the caller names its flag).
    """
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        remove_quietly(tmp)
    fsync_dir(path.parent)


def temporary_directory(target: Path, suffix: str = ".tmp") -> Path:
    """A new empty directory next to `target` (`.NAME.<random><suffix>`), with the user's usual permissions."""
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            candidate.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{target.parent}: could not create a unique temporary directory")


def replace_directory(tmp: Path, target: Path) -> None:
    """Rename the finished directory `tmp` to `target`. An existing `target` is moved aside first (two renames
    rather than rmtree-then-rename: at every instant the old or the new one is complete, under `target` or in a
    sibling) and put back if the second rename fails."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
