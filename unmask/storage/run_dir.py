"""A run owns its out_dir: a lock for its lifetime, a run id, and its own lineage of checkpoints.

- `run.json` names the run that owns the directory (`run_id`, when it started). Every checkpoint, sidecar and
  metrics record carries the run id, and every checkpoint a write sequence number `seq` (one more than any checkpoint
  of the run before it), so "the newest checkpoint of this run" means the one written last, whatever its iteration:
  after a rollback (`--ckpt_filename=ckpt_unmasking_4.pt`, then a new 6) a plain resume continues the new 6, not the
  abandoned 8, and a foreign checkpoint under a higher number is neither adopted nor rotated away.
- `RunLock` holds an advisory lock (`flock`) on `out_dir/.lock` while the run lives; the kernel releases it when
  the process ends however it ends, so a killed run never leaves a stale lock. A second run on the same directory
  gets one line naming the holder.
- A new run (not `--init_from=resume`) in a directory that holds another run's files is refused, with how to
  resume it or start elsewhere; `--overwrite=True` removes that run's files first.

Directories written before run ids existed (no run.json) resume by iteration number, as before.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from unmask.errors import UserError
from unmask.storage import checkpoint as ckpt_io

MANIFEST = "run.json"
LOCK = ".lock"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


def new_run_id() -> str:
    """A fresh identifier (random, not from any training stream: it never changes what a run computes)."""
    return uuid.uuid4().hex[:16]


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The owner record of `out_dir`, or None when there is none (a new or a pre-run-id directory)."""
    path = out_dir / MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable run record ({type(exc).__name__}); repair or remove it") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise UserError(f"{path}: not a run record (no run_id); repair or remove it")
    return record


def write_manifest(out_dir: Path, run_id: str) -> None:
    record = {"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
    ckpt_io.atomic_write_json(out_dir / MANIFEST, record, kept="the run's files are intact")


def checkpoint_order(path: Path) -> tuple[str | None, int]:
    """(run id, seq) of a checkpoint from its sidecar; (None, iteration) when the sidecar lacks them."""
    iteration = int(path.stem.removeprefix(ckpt_io.PREFIX))
    try:
        sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, iteration
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("seq"), int):
        return None, iteration
    run_id = sidecar.get("run_id")
    return (run_id if isinstance(run_id, str) else None), int(sidecar["seq"])


def lineage(out_dir: Path, run_id: str | None) -> list[Path]:
    """The checkpoints of run `run_id` in `out_dir`, oldest written first (without a run id: all, by iteration).

    A checkpoint whose sidecar is missing or unreadable is placed by its iteration among the run's own only when
    the directory has no run id at all; otherwise its owner is unknown and it is left alone."""
    found = [path for _, path in ckpt_io.list_checkpoints(out_dir)]
    if run_id is None:
        return found
    own = [(checkpoint_order(p), p) for p in found]
    return [p for (rid, _), p in sorted((o for o in own if o[0][0] == run_id), key=lambda o: o[0][1])]


def next_seq(out_dir: Path, run_id: str) -> int:
    """The write sequence number of the run's next checkpoint."""
    seqs = [checkpoint_order(p)[1] for p in lineage(out_dir, run_id)]
    return max(seqs, default=0) + 1


def resume_candidates(out_dir: Path) -> tuple[str | None, list[Path]]:
    """(run id, checkpoints newest-written first) that `--init_from=resume` tries, in order."""
    manifest = read_manifest(out_dir)
    run_id = None if manifest is None else manifest["run_id"]
    own = lineage(out_dir, run_id)
    if run_id is not None and not own:
        raise UserError(f"--init_from=resume: {out_dir} holds run {run_id} but none of its checkpoints")
    return run_id, list(reversed(own))


def occupant(out_dir: Path) -> str | None:
    """A description of the run whose files `out_dir` holds, or None when it holds none."""
    if not out_dir.is_dir():
        return None
    checkpoints = ckpt_io.list_checkpoints(out_dir)
    manifest = read_manifest(out_dir)
    if not checkpoints and manifest is None and not (out_dir / METRICS).exists():
        return None
    who = f"run {manifest['run_id']}" if manifest else "a run"
    newest = f", newest at iteration {checkpoints[-1][0]}" if checkpoints else ""
    return f"{who} ({len(checkpoints)} checkpoint(s){newest})"


def check_new_run(out_dir: Path, overwrite: bool) -> None:
    """A new run may start in `out_dir` only if it holds no other run, or with --overwrite=True."""
    holder = occupant(out_dir)
    if holder is not None and not overwrite:
        raise UserError(
            f"--out_dir={out_dir}: holds {holder}; continue it with --init_from=resume, give another --out_dir, "
            "or replace it with --overwrite=True"
        )


def remove_run_files(out_dir: Path) -> int:
    """--overwrite=True: delete the files a run writes (checkpoints, sidecars, metrics, config, run record)."""
    removed = 0
    for _, path in ckpt_io.list_checkpoints(out_dir):
        for victim in (path, path.with_suffix(".json")):
            if victim.exists():
                victim.unlink()
                removed += 1
    for name in (METRICS, CONFIG, MANIFEST):
        if (out_dir / name).exists():
            (out_dir / name).unlink()
            removed += 1
    return removed


class RunLock:
    """An exclusive advisory lock on `out_dir/.lock` for the lifetime of a run (rank 0 takes it)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK
        self.fd: int | None = None

    def acquire(self, run_id: str) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"--out_dir={self.path.parent}: in use by {holder}; wait for it to end or give another --out_dir"
            ) from None
        os.ftruncate(fd, 0)
        holder = f"run {run_id} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})"
        os.write(fd, holder.encode("utf-8"))
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
