"""Checkpoint files: atomic writes, weights_only loads, rotation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmask import checkpoint as ck
from unmask.errors import UserError


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
    assert ck.find_checkpoint(tmp_path).name == "ckpt_unmasking_100.pt"
    assert ck.find_checkpoint(tmp_path, "ckpt_unmasking_40.pt").name == "ckpt_unmasking_40.pt"
    assert not (tmp_path / "ckpt_unmasking_20.json").exists()


def test_partial_temp_file_is_ignored(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 10, _state(10), {})
    (tmp_path / ".ckpt_unmasking_20.pt.abc.tmp").write_bytes(b"half a checkpoint")
    assert ck.find_checkpoint(tmp_path).name == "ckpt_unmasking_10.pt"


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    ck.atomic_write_bytes(target, b"old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no ckpt_unmasking_<iter>.pt checkpoint"):
        ck.find_checkpoint(tmp_path)
    with pytest.raises(UserError, match="--ckpt_filename=nope.pt: no such file"):
        ck.find_checkpoint(tmp_path, "nope.pt")
    bad = tmp_path / "ckpt_unmasking_3.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ck.load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(UserError, match="not an unmask checkpoint"):
        ck.load_checkpoint(other)
