"""Checkpoint files: atomic writes, weights_only loads, rotation, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from unmask.errors import UserError
from unmask.storage import checkpoint as ck
from unmask.storage import run_dir


def _state(i: int) -> dict:
    return {
        "model": {"w": torch.full((2, 2), float(i))},
        "iter_num": i,
        "rng": [{"torch": torch.get_rng_state()}],
    }


def test_save_load_weights_only_and_sidecar(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 10, _state(10), {"iter": 10, "note": "x"})
    assert path.name == "ckpt_unmasking_10.pt"
    raw = torch.load(path, weights_only=True)  # plain dicts and tensors only
    assert raw["iter_num"] == 10 and torch.equal(raw["model"]["w"], torch.full((2, 2), 10.0))
    assert json.loads(path.with_suffix(".json").read_text())["note"] == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_newest_and_keep_last(tmp_path: Path) -> None:
    for i in (5, 100, 20, 40):
        ck.save_checkpoint(tmp_path, i, _state(i), {}, keep_last=2)
    assert [i for i, _ in ck.list_checkpoints(tmp_path)] == [40, 100]
    assert run_dir.read_checkpoint(tmp_path, "--out_dir")[0].name == "ckpt_unmasking_100.pt"  # no run.json: by number
    assert ck.named_checkpoint(tmp_path, "ckpt_unmasking_40.pt").name == "ckpt_unmasking_40.pt"
    assert not (tmp_path / "ckpt_unmasking_20.json").exists()


def test_partial_temp_file_is_ignored(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 10, _state(10), {})
    (tmp_path / ".ckpt_unmasking_20.pt.abc.tmp").write_bytes(b"half a checkpoint")
    assert run_dir.read_checkpoint(tmp_path, "--out_dir")[0].name == "ckpt_unmasking_10.pt"


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    ck.atomic_write_bytes(target, b"old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="f.bin: cannot write: disk full; its previous version is unchanged"):
        ck.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no ckpt_unmasking_<iter>.pt checkpoint"):
        run_dir.load_for_resume(tmp_path)
    with pytest.raises(UserError, match="--ckpt_filename=nope.pt: no such file"):
        ck.named_checkpoint(tmp_path, "nope.pt")
    bad = tmp_path / "ckpt_unmasking_3.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ck.load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(UserError, match="not an unmask checkpoint"):
        ck.load_checkpoint(other)


def _run_with_checkpoints(tmp_path: Path, iters: tuple[int, ...]) -> Path:
    for it in iters:
        ck.save_checkpoint(tmp_path, it, {"model": {"w": torch.full((64,), float(it))}, "iter_num": it}, {"iter": it})
    return tmp_path


def test_sidecar_records_size_and_sha256_and_a_flipped_byte_is_caught(tmp_path: Path) -> None:
    run = _run_with_checkpoints(tmp_path, (4,))
    path = run / "ckpt_unmasking_4.pt"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"ckpt_unmasking_4.pt: damaged checkpoint \(sha256 differs"):
        ck.load_checkpoint(path)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    run = _run_with_checkpoints(tmp_path, (4, 8, 12))
    newest = run / "ckpt_unmasking_12.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    warnings: list[str] = []
    path, ckpt = run_dir.load_for_resume(run, warn=warnings.append)
    assert path == run / "ckpt_unmasking_8.pt" and ckpt["iter_num"] == 8
    assert len(warnings) == 1 and "ckpt_unmasking_12.pt: damaged checkpoint" in warnings[0]
    assert "recorded" in warnings[0]  # names the expected and the actual size
    # Named explicitly, a damaged file is an error, never silently replaced.
    with pytest.raises(UserError, match="ckpt_unmasking_12.pt: damaged checkpoint"):
        run_dir.load_for_resume(run, "ckpt_unmasking_12.pt")
    # Nothing intact at all: one error listing every problem.
    for it in (4, 8):
        (run / f"ckpt_unmasking_{it}.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="no intact checkpoint"):
        run_dir.load_for_resume(run, warn=warnings.append)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt_unmasking_1.pt"
    torch.save({"format_version": 1, "model": _Payload(marker)}, evil)
    with pytest.raises(UserError, match="ckpt_unmasking_1.pt: refused: .*posix.system"):
        ck.load_checkpoint(evil)
    assert not marker.exists()
