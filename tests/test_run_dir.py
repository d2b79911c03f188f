"""A run owns its out_dir: lock, run id, its own lineage of checkpoints, append-only metrics (issue tests fail on
the code before run ids: two runs interleaved, resume by file-name number, rotation across runs, in-place rewrite)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_flags
from unmask import checkpoint as ckpt_io
from unmask import run_dir
from unmask.cli import main
from unmask.train import build_train_run


def _train(tiny_data: Path, out: Path, *extra: str, **overrides: object) -> int:
    return main(["train", *tiny_flags(tiny_data, out, **overrides), *extra])


def test_a_second_run_on_a_locked_out_dir_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=4) == 0
    holder = run_dir.RunLock(out)
    holder.acquire("someone")  # another run, alive: its lock is held
    try:
        capsys.readouterr()
        assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # (the first line warns of the new max_iters)
        assert len(err) == 2 and "in use by run someone (pid" in err[-1]
    finally:
        holder.release()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=8"]) == 0  # released: it runs


def test_a_new_run_in_an_occupied_out_dir_is_refused_unless_overwrite(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    first_id = run_dir.read_manifest(out)["run_id"]  # type: ignore[index]
    capsys.readouterr()
    assert _train(tiny_data, out, max_iters=4) == 2
    err = capsys.readouterr().err
    assert f"holds run {first_id} (2 checkpoint(s), newest at iteration 8)" in err and "--overwrite=True" in err
    assert (out / "ckpt_unmasking_8.pt").exists()  # nothing lost
    assert _train(tiny_data, out, "--overwrite=True", max_iters=4) == 0
    assert not (out / "ckpt_unmasking_8.pt").exists() and (out / "ckpt_unmasking_4.pt").exists()
    second = run_dir.read_manifest(out)["run_id"]  # type: ignore[index]
    assert second != first_id
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run_id"] for r in records} == {second} and max(r["iter"] for r in records) == 4


def test_resume_follows_what_was_written_last_not_the_highest_number(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0  # checkpoints 4 and 8
    # Roll back to 4 and write a new 6: the abandoned 8 stays on disk with a higher number.
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--ckpt_filename=ckpt_unmasking_4.pt",
                 "--max_iters=6"]) == 0  # fmt: skip
    assert (out / "ckpt_unmasking_8.pt").exists()
    run = build_train_run(["--init_from=resume", f"--out_dir={out}"])
    assert run.path is not None and run.path.name == "ckpt_unmasking_6.pt"
    # A foreign checkpoint under a higher number is neither adopted nor rotated away.
    other = tmp_path / "other"
    assert _train(tiny_data, other, max_iters=4) == 0
    for suffix in (".pt", ".json"):
        shutil.copy(other / f"ckpt_unmasking_4{suffix}", out / f"ckpt_unmasking_100{suffix}")
    sidecar = json.loads((out / "ckpt_unmasking_100.json").read_text())
    sidecar["file"] = "ckpt_unmasking_100.pt"
    (out / "ckpt_unmasking_100.json").write_text(json.dumps(sidecar))
    run = build_train_run(["--init_from=resume", f"--out_dir={out}"])
    assert run.path is not None and run.path.name == "ckpt_unmasking_6.pt"
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=10", "--keep_last=1"]) == 0
    assert (out / "ckpt_unmasking_100.pt").exists()  # not ours: kept
    assert (out / "ckpt_unmasking_10.pt").exists() and not (out / "ckpt_unmasking_6.pt").exists()
    ckpt = torch.load(out / "ckpt_unmasking_10.pt", weights_only=True)
    assert ckpt["run_id"] == run_dir.read_manifest(out)["run_id"]  # type: ignore[index]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "iter": 9, "train_lo')  # a write cut short by a full disk
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0
    assert "dropped a torn last line" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) == 12


def test_resume_never_rewrites_metrics_in_place(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cut-back on resume goes through a temporary file and a rename: if that fails (or the process dies),
    metrics.jsonl is the old file, byte for byte, never an empty or half-written one."""
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    before = (out / "metrics.jsonl").read_bytes()

    def full_disk(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.os, "replace", full_disk)
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--ckpt_filename=ckpt_unmasking_4.pt"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_bytes() == before
    monkeypatch.undo()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_compare_refuses_to_overwrite_earlier_runs(tiny_data: Path, tmp_path: Path) -> None:
    flags = tiny_flags(tiny_data, tmp_path / "cmp", max_iters=4)
    assert main(["compare", *flags]) == 0
    assert main(["compare", *flags]) == 2
    assert main(["compare", *flags, "--overwrite=True"]) == 0


# --- metrics.jsonl lines that are not records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["5", "[1, 2]", '{"iter": null}', '{"iter": true}', '"text"', "{not json", "[" * 100_000 + "]" * 100_000],
)
def test_a_metrics_line_that_is_not_a_record_is_dropped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    from unmask.run_log import RunLog

    good = [json.dumps({"kind": "train", "iter": i}) for i in (2, 4, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([good[0], bad, *good[1:]]) + "\n")
    RunLog(tmp_path, True).truncate_after(4)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"{path}:2: " in out[0] and out[0].startswith("warning: "), out
    assert path.read_text().splitlines() == good[:2]


def test_a_metrics_line_that_is_not_a_record_does_not_stop_a_resume(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], '{"iter": null}', "5", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0
    assert f"{out / 'metrics.jsonl'}:2: " in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["iter"], int) for r in records) and max(r["iter"] for r in records) == 12
