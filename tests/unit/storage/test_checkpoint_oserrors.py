"""OS errors while writing checkpoints, sidecars and JSON (disk full, quota, read-only, permission denied): one
UserError line naming the path and what was kept, no temporary file left; the umask is honoured; leftovers of
interrupted writes are swept."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.errors import UserError
from unmask.storage import checkpoint as ck

REAL_FDOPEN, REAL_FSYNC, REAL_REPLACE, REAL_OPEN = os.fdopen, os.fsync, os.replace, os.open
REASONS = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
}


def _state(i: int) -> dict[str, Any]:
    return {"model": {"w": torch.full((8,), float(i))}, "iter_num": i}


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _FailingWrites:
    """A file object whose writes fail with `code` (the disk filled up mid-write)."""

    def __init__(self, fd: int, mode: str, code: int) -> None:
        self.file, self.code = REAL_FDOPEN(fd, mode), code

    def __enter__(self) -> _FailingWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        raise _oserror(self.code)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def _inject(monkeypatch: pytest.MonkeyPatch, where: str, code: int, only: str = "") -> None:
    """Make `where` (open / write / fsync / replace) fail with `code` (for paths containing `only`, if given)."""
    if where == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FailingWrites(fd, mode, code))
    elif where == "fsync":

        def fsync(fd: int) -> None:
            raise _oserror(code)

        monkeypatch.setattr(os, "fsync", fsync)
    elif where == "replace":

        def replace(src: Any, dst: Any) -> None:
            if only not in str(dst):
                return REAL_REPLACE(src, dst)
            raise _oserror(code)

        monkeypatch.setattr(os, "replace", replace)
    elif where == "open":

        def open_(path: Any, flags: int, mode: int = 0o777) -> int:
            if flags & os.O_CREAT:
                raise _oserror(code)
            return REAL_OPEN(path, flags, mode)

        monkeypatch.setattr(os, "open", open_)


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("write", errno.ENOSPC),
        ("fsync", errno.ENOSPC),
        ("replace", errno.ENOSPC),
        ("write", errno.EDQUOT),
        ("open", errno.EROFS),
        ("open", errno.EACCES),
    ],
)
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int
) -> None:
    ck.save_checkpoint(tmp_path, 4, _state(4), {"iter": 4})
    _inject(monkeypatch, where, code)
    with pytest.raises(UserError) as exc:
        ck.save_checkpoint(tmp_path, 8, _state(8), {"iter": 8})
    monkeypatch.undo()
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'ckpt_unmasking_8.pt'}: cannot write: {REASONS[code]}")
    assert message.endswith("the previous checkpoints are intact")
    assert _no_temp_files(tmp_path) and not (tmp_path / "ckpt_unmasking_8.pt").exists()
    assert [i for i, _ in ck.list_checkpoints(tmp_path)] == [4]
    assert ck.load_checkpoint(tmp_path / "ckpt_unmasking_4.pt")["iter_num"] == 4


def test_a_failed_sidecar_write_says_the_checkpoint_verifies_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck.save_checkpoint(tmp_path, 4, _state(4), {"iter": 4})
    _inject(monkeypatch, "replace", errno.ENOSPC, only="ckpt_unmasking_8.json")
    with pytest.raises(UserError, match=r"ckpt_unmasking_8.json: cannot write: no space left .* \(ENOSPC\); "):
        ck.save_checkpoint(tmp_path, 8, _state(8), {"iter": 8})
    monkeypatch.undo()
    assert _no_temp_files(tmp_path)
    assert ck.load_checkpoint(tmp_path / "ckpt_unmasking_8.pt")["iter_num"] == 8  # verified by its own digest


def test_a_json_write_names_the_file_and_keeps_its_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "config.json"
    ck.atomic_write_json(target, {"a": 1})
    _inject(monkeypatch, "fsync", errno.EDQUOT)
    with pytest.raises(UserError, match=r"config.json: cannot write: disk quota exceeded \(EDQUOT\); its previous"):
        ck.atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    assert target.read_text().strip() == '{\n  "a": 1\n}' and _no_temp_files(tmp_path)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "run"
    directory.mkdir()
    ck.save_checkpoint(directory, 4, _state(4), {"iter": 4})
    directory.chmod(0o500)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as a user (root) whom a 0500 directory does not stop")
        yield directory
    finally:
        directory.chmod(0o700)


def test_a_real_read_only_directory(read_only_dir: Path) -> None:
    with pytest.raises(UserError, match=r"ckpt_unmasking_8.pt: cannot write: permission denied \(EACCES\)"):
        ck.save_checkpoint(read_only_dir, 8, _state(8), {"iter": 8})
    assert [i for i, _ in ck.list_checkpoints(read_only_dir)] == [4]


def test_train_ends_in_one_line_when_the_disk_is_full(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _inject(monkeypatch, "replace", errno.ENOSPC, only="ckpt_unmasking_8.pt")
    assert main(["train", *tiny_flags(tiny_data, tmp_path, max_iters=8, always_save_checkpoint=True)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt_unmasking_8.pt: cannot write: no space left on the device (ENOSPC)" in err[0]
    assert err[0].endswith("the previous checkpoints are intact")
    monkeypatch.undo()
    assert [i for i, _ in ck.list_checkpoints(tmp_path)] == [4] and _no_temp_files(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = ck.save_checkpoint(tmp_path, 1, _state(1), {"iter": 1})
        ck.atomic_write_json(tmp_path / "config.json", {})
    finally:
        os.umask(previous)
    for p in (path, path.with_suffix(".json"), tmp_path / "config.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_sweep_temp_files_removes_only_interrupted_writes(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 4, _state(4), {"iter": 4})
    leftovers = [".ckpt_unmasking_8.pt.k2x9q1ab.tmp", ".ckpt_unmasking_8.json.4711-0.tmp", ".config.json.12-3.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half written")
    kept = ["notes.tmp", ".hidden", "ckpt_unmasking_4.pt", "ckpt_unmasking_4.json"]
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".hidden").write_text("mine")
    (tmp_path / ".dir.x.tmp").mkdir()  # a directory is never removed
    assert ck.sweep_temp_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".dir.x.tmp"])
    assert ck.sweep_temp_files(tmp_path) == 0 and ck.sweep_temp_files(tmp_path / "absent") == 0


def test_rewriting_an_iteration_never_pairs_the_new_file_with_the_old_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed from an older checkpoint, a run writes ckpt_12 again; killed before the new sidecar, the new file
    must still load (the old sidecar would call it damaged)."""
    ck.save_checkpoint(tmp_path, 12, _state(12), {"iter": 12})
    _inject(monkeypatch, "replace", errno.ENOSPC, only="ckpt_unmasking_12.json")  # the sidecar write never lands
    with pytest.raises(UserError):
        ck.save_checkpoint(tmp_path, 12, _state(13), {"iter": 12})
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(tmp_path / "ckpt_unmasking_12.pt")["model"]["w"], _state(13)["model"]["w"])


WRITER = """
import sys, torch
from pathlib import Path
from unmask.storage import checkpoint as ck
out = Path(sys.argv[1])
for i in range(1, 100000):
    state = {"model": {"w": torch.full((300_000,), float(i))}, "iter_num": i}
    ck.save_checkpoint(out, i, state, {"iter": i}, keep_last=3)
    print(i, flush=True)
"""


def test_kill_9_while_writing_leaves_only_intact_checkpoints(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    for _ in range(3):  # three checkpoints done, the fourth being written
        assert proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = ck.list_checkpoints(tmp_path)
    assert found
    for it, path in found:  # with or without its sidecar, every file under a final name is whole
        assert ck.load_checkpoint(path)["iter_num"] == it
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ck.sweep_temp_files(tmp_path) == len(left)
    assert _no_temp_files(tmp_path)
