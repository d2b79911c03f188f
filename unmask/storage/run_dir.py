"""A run owns its out_dir: a lock for its lifetime, a run id, and its own lineage of checkpoints.

- `run.json` names the run that owns the directory (`run_id`, when it started). Every checkpoint, sidecar and
  metrics record carries the run id, and every checkpoint a write sequence number `seq` (one more than any checkpoint
  of the run before it), so "the newest checkpoint of this run" means the one written last, whatever its iteration:
  after a rollback (`--ckpt_filename=ckpt_unmasking_4.pt`, then a new 6) a plain resume continues the new 6, not the
  abandoned 8, and a foreign checkpoint under a higher number is neither adopted nor rotated away.
- `newest_checkpoint` is the one rule for "the run's newest checkpoint"; every command given a run directory (train
  resume, sample, eval, classify, export, `unmask.load`) asks it. A checkpoint missing its sidecar still counts
  (it carries its run id, seq and integrity digest); another run's checkpoint is ignored with a warning.
- `RunLock` holds an advisory lock (`flock`) on `out_dir/.lock` while the run lives; the kernel releases it when
  the process ends however it ends, so a killed run never leaves a stale lock. A second run on the same directory
  gets one line naming the holder. The lock file is never followed through a link nor written if it is not a
  plain file of its own.
- A new run (not `--init_from=resume`) in a directory that holds another run's files is refused, with the ways on
  that work (resume it when it has a checkpoint to resume from, another --out_dir, `--overwrite=True`, which removes
  that run's files first). The check is made again under the lock, before anything is written, and a resume checks
  there that no newer checkpoint of its run appeared since it read its own.

Directories written before run ids existed (no run.json) resume by iteration number, as before.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def checkpoint_order(path: Path) -> tuple[str | None, int] | None:
    """(run id, seq) of a checkpoint; (None, iteration) for one written before run ids; None when unknown.

    The sidecar says it cheaply. Without a readable sidecar (a kill between the two renames, a failed sidecar
    write, a copied .pt) the checkpoint itself says it: it carries its run id and seq, read here without loading
    its tensors (they are memory-mapped); None only when neither can be read (a damaged file)."""
    iteration = int(path.stem.removeprefix(ckpt_io.PREFIX))
    try:
        record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        try:
            record = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # damaged, not a torch file, or not plain data: its order is unknown
            return None
        if not isinstance(record, dict):
            return None
    run_id, seq = record.get("run_id"), record.get("seq")
    if isinstance(run_id, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return run_id, seq
    return None, iteration


def lineage(out_dir: Path, run_id: str | None) -> list[Path]:
    """The checkpoints of run `run_id` in `out_dir`, oldest written first (without a run id: all, by iteration).

    Rotation (`--keep_last`) deletes only from this list, so it never touches another run's files."""
    found = [path for _, path in ckpt_io.list_checkpoints(out_dir)]
    if run_id is None:
        return found
    own = [(order[1], p) for p in found if (order := checkpoint_order(p)) is not None and order[0] == run_id]
    return [p for _, p in sorted(own, key=lambda o: o[0])]


def next_seq(out_dir: Path, run_id: str) -> int:
    """The write sequence number of the run's next checkpoint."""
    orders = [checkpoint_order(p) for p in lineage(out_dir, run_id)]
    return max((o[1] for o in orders if o is not None), default=0) + 1


def newest_checkpoint(
    out_dir: Path,
    flag: str,
    warn: ckpt_io.Warn | None = None,
    map_location: str | torch.device = "cpu",
    advice: str = "",
) -> tuple[Path, dict[str, Any]]:
    """THE answer to "which checkpoint of this run directory is the run's newest": (path, verified checkpoint).

    Every command given a run directory asks here: `train --init_from=resume`, `sample`, `eval`, `classify`,
    `export`, `unmask.load` and `--pretrained_checkpoint_path`. The run is the one `run.json` names; its
    checkpoints are tried newest written first (highest `seq`), then those written before run ids existed (its
    ancestors, highest iteration first); the first intact one wins, each damaged one before it reported in one
    warning line. A checkpoint of another run (copied in, or left by a replaced run) is never taken: one warning
    line names them. A checkpoint without its sidecar is usable (its own digest verifies it), with a warning. A
    directory without `run.json` (written before run ids) is taken by iteration number. `flag` (e.g.
    `--out_dir=out/run`) starts the errors; `advice` ends those that find nothing usable."""
    warn = warn or ckpt_io.warn_stderr
    found = [path for _, path in reversed(ckpt_io.list_checkpoints(out_dir))]
    if not found:
        raise UserError(f"{flag}: no {ckpt_io.PREFIX}<iter>.pt checkpoint there{advice}")
    manifest = read_manifest(out_dir)
    run_id = None if manifest is None else manifest["run_id"]
    candidates, problems = found, []
    if run_id is not None:
        orders = {path: checkpoint_order(path) for path in found}
        known = {path: order for path, order in orders.items() if order is not None}
        own = sorted((p for p, (rid, _) in known.items() if rid == run_id), key=lambda p: known[p][1], reverse=True)
        ancestors = [p for p, (rid, _) in known.items() if rid is None]
        candidates = own + ancestors
        others = [f"{p.name} (run {rid})" for p, (rid, _) in known.items() if rid not in (None, run_id)]
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            warn(
                f"warning: {out_dir}: ignoring {len(others)} checkpoint(s) of another run than run {run_id}, the "
                f"one its {MANIFEST} names: {', '.join(others[:3])}{more}"
            )
        for path in (p for p, order in orders.items() if order is None):
            problems.append(f"{path}: damaged checkpoint (neither it nor its sidecar says which run wrote it)")
            warn(f"warning: {problems[-1]}; skipped")
    for path in candidates:
        try:
            ckpt = ckpt_io.load_checkpoint(path, map_location)
        except UserError as exc:
            problems.append(str(exc))
            warn(f"warning: {exc}; trying the previous checkpoint")
            continue
        writer = ckpt.get("run_id")
        if run_id is not None and writer is not None and writer != run_id:  # its sidecar was not its own
            warn(f"warning: {path}: written by run {writer}, not by run {run_id}; ignored")
            continue
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            verified = "its own digest verified it" if ckpt.get(ckpt_io.DIGEST_KEY) else "nothing verified it"
            warn(f"warning: {path}: its sidecar {sidecar.name} is missing; {verified}")
        return path, ckpt
    if not problems:
        raise UserError(f"{flag}: holds no checkpoint of run {run_id}, the run its {MANIFEST} names{advice}")
    raise UserError(f"{flag}: no intact checkpoint in {out_dir} ({'; '.join(problems)}){advice}")


def occupant(out_dir: Path) -> str | None:
    """Who holds `out_dir` ("run ID" or "a run"), or None when it holds no run's files."""
    if not out_dir.is_dir():
        return None
    manifest = read_manifest(out_dir)
    if not ckpt_io.list_checkpoints(out_dir) and manifest is None and not (out_dir / METRICS).exists():
        return None
    return f"run {manifest['run_id']}" if manifest else "a run"


def check_new_run(out_dir: Path, overwrite: bool) -> None:
    """A new run may start in `out_dir` only if it holds no other run, or with --overwrite=True.

    The refusal offers only what works: resuming only when the run has an intact checkpoint to resume from (a run
    killed before its first checkpoint has none), another --out_dir, or --overwrite=True."""
    holder = occupant(out_dir)
    if holder is None or overwrite:
        return
    count = f"{len(ckpt_io.list_checkpoints(out_dir))} checkpoint(s)"
    try:
        _, ckpt = newest_checkpoint(out_dir, f"--out_dir={out_dir}", warn=lambda _: None)
    except UserError:
        raise UserError(
            f"--out_dir={out_dir}: holds {holder} ({count}, none to resume from); give another --out_dir, or "
            "replace it with --overwrite=True"
        ) from None
    raise UserError(
        f"--out_dir={out_dir}: holds {holder} ({count}, newest at iteration {ckpt.get('iter_num')}); continue it "
        f"with `unmask train --init_from=resume --out_dir={out_dir}`, give another --out_dir, or replace it with "
        "--overwrite=True"
    )


def check_resume_current(out_dir: Path, run_id: str, seen_seq: int, path: Path) -> None:
    """Under the lock: nothing happened to the run since a resume read `path` before taking it (another resume of
    the run wrote a checkpoint with a `seq` above `seen_seq`, the highest it had seen, or a new run replaced it)."""
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest["run_id"] != run_id:
        raise UserError(
            f"--out_dir={out_dir}: now holds run {manifest['run_id']}, which replaced run {run_id} while this "
            "resume was starting; nothing was changed"
        )
    newer = [p for p in lineage(out_dir, run_id) if (order := checkpoint_order(p)) is not None and order[1] > seen_seq]
    if newer:
        raise UserError(
            f"--out_dir={out_dir}: run {run_id} wrote {newer[-1].name} after this resume read {path.name}; "
            "nothing was changed: resume again to continue from it"
        )


def remove_run_files(out_dir: Path) -> int:
    """--overwrite=True: delete the files a run writes (checkpoints, sidecars, metrics, config, run record).

    A file that cannot be removed (read-only file system, a directory in its place) is one error naming it."""
    victims = [v for _, path in ckpt_io.list_checkpoints(out_dir) for v in (path, path.with_suffix(".json"))]
    victims += [out_dir / name for name in (METRICS, CONFIG, MANIFEST)]
    removed = 0
    for victim in victims:
        try:
            victim.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UserError(
                f"{victim}: cannot remove it for --overwrite=True: {ckpt_io.describe_os_error(exc)}; "
                f"{removed} file(s) of the previous run removed before it"
            ) from None
        removed += 1
    return removed


# A holder line is about a hundred bytes: a larger `.lock` is some other file under that name, never truncated.
_MAX_LOCK_BYTES = 4096


class RunLock:
    """An exclusive advisory lock on `out_dir/.lock` for the lifetime of a run (rank 0 takes it).

    The file holds one line naming the holder. It is opened without following a symbolic link, and a `.lock`
    that is not a plain file of its own (a link, a file with other hard links, a directory, a large file) is
    refused rather than written: the lock must never overwrite a file elsewhere. OS errors are one line."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK
        self.fd: int | None = None

    def acquire(self, run_id: str) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{self.path}: a symbolic link; the run lock must be a plain file: remove it") from None
            raise UserError(f"{self.path}: cannot open the run lock: {ckpt_io.describe_os_error(exc)}") from None
        try:
            self._hold(fd, run_id)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _hold(self, fd: int, run_id: str) -> None:
        import fcntl  # POSIX only: imported where it is needed

        try:
            info = os.fstat(fd)
            foreign = (
                "not a plain file" if not stat.S_ISREG(info.st_mode)
                else f"it has {info.st_nlink} hard links" if info.st_nlink > 1
                else f"{info.st_size:,} bytes, not a lock record" if info.st_size > _MAX_LOCK_BYTES
                else None
            )  # fmt: skip
            if foreign is not None:
                raise UserError(f"{self.path}: {foreign}; the run lock must be a file of its own: remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, _MAX_LOCK_BYTES).decode("utf-8", "replace").strip() or "another process"
                raise UserError(
                    f"--out_dir={self.path.parent}: in use by {holder}; wait for it to end or give another --out_dir"
                ) from None
            os.ftruncate(fd, 0)
            holder = f"run {run_id} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})"
            os.write(fd, holder.encode("utf-8"))
        except OSError as exc:
            raise UserError(f"{self.path}: cannot take the run lock: {ckpt_io.describe_os_error(exc)}") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def load_for_resume(
    out_dir: Path, ckpt_filename: str | None = None, warn: ckpt_io.Warn | None = None
) -> tuple[Path, dict[str, Any]]:
    """(path, checkpoint) to resume from: a named file, which must be intact, or the run's newest intact
    checkpoint (`unmask.storage.run_dir.newest_checkpoint`, each damaged newer one reported through `warn`)."""
    if ckpt_filename is not None:
        path = ckpt_io.named_checkpoint(out_dir, ckpt_filename)
        return path, ckpt_io.load_checkpoint(path)
    advice = "; nothing to --init_from=resume: start a new run there (--overwrite=True replaces what is left)"
    return newest_checkpoint(out_dir, f"--out_dir={out_dir}", warn, advice=advice)


def read_checkpoint(
    source: Path, flag: str, warn: ckpt_io.Warn | None = None, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """The one checkpoint reader: (path, verified checkpoint dict) from a file or a run directory.

    A file must be intact. A run directory gives the run's newest intact checkpoint
    (`unmask.storage.run_dir.newest_checkpoint`, the one rule every command follows); each damaged newer one is reported
    in one line through `warn` (default: stderr), as `train --init_from=resume` does. `flag` (e.g. `--ckpt=out/run`)
    starts the errors about `source` itself."""
    if source.is_dir():
        return newest_checkpoint(source, flag, warn, map_location)
    if not source.is_file():
        raise UserError(f"{flag}: no such checkpoint file or run directory")
    return source, ckpt_io.load_checkpoint(source, map_location)


def read_records(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl file. A torn last line (a run killed mid-write) is skipped with a
    warning (`warn`, default stderr); a bad line anywhere else is an error naming the file and line."""
    warn = warn or ckpt_io.warn_stderr
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply for the parser
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            if number == len(lines):
                warn(f"warning: {path}:{number}: skipping a torn last line ({reason})")
                continue
            raise UserError(f"{path}:{number}: not a JSON record ({reason})") from None
        records.append(record)
    return records
