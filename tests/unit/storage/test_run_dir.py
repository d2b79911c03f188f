"""A run owns its out_dir: lock, run id, its own lineage of checkpoints, append-only metrics (issue tests fail on
the code before run ids: two runs interleaved, resume by file-name number, rotation across runs, in-place rewrite)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.commands.train import build_train_run
from unmask.errors import UserError
from unmask.storage import run_dir


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

    monkeypatch.setattr(os, "replace", full_disk)
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


# --- the occupancy check happens under the lock ------------------------------------------------------------------


def _runtime() -> object:
    from unmask.runtime import init_runtime

    return init_runtime("cpu", "float32", "gloo")


def test_a_new_run_rechecks_the_directory_under_the_lock(tiny_data: Path, tmp_path: Path) -> None:
    """Run B checks an empty directory, then run A starts, finishes and releases the lock before B takes it: B must
    see A's files under the lock and refuse, never delete A's metrics or orphan its checkpoints."""
    from unmask.training.trainer import Trainer

    out = tmp_path / "run"
    late = Trainer(build_train_run(tiny_flags(tiny_data, out, max_iters=4)).cfg, _runtime())  # type: ignore[arg-type]
    assert _train(tiny_data, out, max_iters=8) == 0
    first = run_dir.read_manifest(out)["run_id"]  # type: ignore[index]
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match=f"holds run {first} "):
        late.run()
    assert run_dir.read_manifest(out)["run_id"] == first  # type: ignore[index]
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "ckpt_unmasking_8.pt").exists() and not (out / "config.json").read_text().count(late.run_id)


@pytest.mark.parametrize("after_rollback", [False, True])
def test_a_resume_overtaken_by_another_resume_is_refused_under_the_lock(
    tiny_data: Path, tmp_path: Path, after_rollback: bool
) -> None:
    """Two resumes of one run: the one that takes the lock second must not redo the first one's iterations (also
    after a rollback, where an abandoned checkpoint has a higher number but an older seq)."""
    from unmask.training.trainer import Trainer

    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8 if after_rollback else 4) == 0
    if after_rollback:
        assert main(["train", "--init_from=resume", f"--out_dir={out}", "--ckpt_filename=ckpt_unmasking_4.pt",
                     "--max_iters=6"]) == 0  # fmt: skip
    read = "ckpt_unmasking_6.pt" if after_rollback else "ckpt_unmasking_4.pt"
    slow = build_train_run(["--init_from=resume", f"--out_dir={out}", "--max_iters=12"])
    assert slow.path is not None and slow.path.name == read
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0  # meanwhile
    metrics = (out / "metrics.jsonl").read_bytes()
    late = Trainer(slow.cfg, _runtime(), slow.checkpoint, slow.path, seen_seq=slow.seen_seq)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=f"wrote ckpt_unmasking_12.pt after this resume read {read}"):
        late.run()
    assert (out / "metrics.jsonl").read_bytes() == metrics  # not cut back


def test_a_resume_past_a_damaged_newest_checkpoint_is_not_taken_for_a_race(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check under the lock compares with what the resume saw, damaged checkpoints included."""
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    newest = out / "ckpt_unmasking_8.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0
    assert "ckpt_unmasking_8.pt: damaged checkpoint" in capsys.readouterr().err
    assert (out / "ckpt_unmasking_12.pt").exists()


# --- the lock file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str
) -> None:
    out, victim = tmp_path / "run", tmp_path / "precious.txt"
    out.mkdir()
    victim.write_text("precious data\n")
    (out / ".lock").symlink_to(victim) if link == "symlink" else (out / ".lock").hardlink_to(victim)
    capsys.readouterr()
    assert _train(tiny_data, out, max_iters=4) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / '.lock'}: " in err[0], err
    assert victim.read_text() == "precious data\n"
    assert not list(out.glob("ckpt_*"))


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_os_errors_on_the_lock_are_one_line(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    import os

    real_open, real_write = os.open, os.write

    def open_(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        if str(path).endswith(".lock") and code == errno.EROFS:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    def write(fd: int, data: bytes) -> int:
        if code == errno.ENOSPC and data.startswith(b"run "):
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(run_dir.os, "open", open_)
    monkeypatch.setattr(run_dir.os, "write", write)
    capsys.readouterr()
    assert _train(tiny_data, tmp_path / "run", max_iters=4) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'run' / '.lock'}: " in err[0] and errno.errorcode[code] in err[0], err


def test_a_directory_in_place_of_the_lock_or_the_metrics_is_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / ".lock").mkdir(parents=True)
    capsys.readouterr()
    assert _train(tiny_data, out, max_iters=4) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / '.lock'}: " in err[0], err
    (out / ".lock").rmdir()
    assert _train(tiny_data, out, max_iters=4) == 0
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    for argv in (
        ["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=8"],  # cuts metrics back: reads it
        ["train", *tiny_flags(tiny_data, out, max_iters=4), "--overwrite=True"],  # removes it
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f"{out / 'metrics.jsonl'}: " in err[-1] and "Traceback" not in "".join(err), err


# --- every command takes the run's newest checkpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rolled_back(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints 4 and 8, rolled back to 4 and continued to a new 6 (8 abandoned), plus a foreign
    checkpoint 100 written by another run."""
    root = tmp_path_factory.mktemp("rolled_back")
    out, other = root / "run", root / "other"
    assert _train(tiny_data, out, max_iters=8) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--ckpt_filename=ckpt_unmasking_4.pt",
                 "--max_iters=6"]) == 0  # fmt: skip
    assert _train(tiny_data, other, max_iters=4) == 0
    for suffix in (".pt", ".json"):
        shutil.copy(other / f"ckpt_unmasking_4{suffix}", out / f"ckpt_unmasking_100{suffix}")
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--num_samples=1", "--length=8", "--steps=2", "--json"],
        ["eval", "--json", "--draws=1"],
    ],
)
def test_sample_and_eval_take_the_runs_newest_checkpoint_and_warn_of_a_foreign_one(
    rolled_back: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    capsys.readouterr()
    assert main([argv[0], f"--out_dir={rolled_back}", *argv[1:]]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoint"] == str(rolled_back / "ckpt_unmasking_6.pt")
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and "ckpt_unmasking_100.pt" in warnings[0] and "another run" in warnings[0], warnings


def test_export_load_and_the_loaders_take_the_runs_newest_checkpoint(rolled_back: Path, tmp_path: Path) -> None:
    import unmask
    from unmask.storage.loading import read_trained, resolve_checkpoint

    assert unmask.load(rolled_back).trained.path == rolled_back / "ckpt_unmasking_6.pt"
    assert resolve_checkpoint(str(rolled_back), None) == rolled_back / "ckpt_unmasking_6.pt"
    assert read_trained(None, str(rolled_back), warn=lambda _: None).iter_num == 6
    assert run_dir.read_checkpoint(rolled_back, "--ckpt", warn=lambda _: None)[0].name == "ckpt_unmasking_6.pt"
    assert main(["export", f"--ckpt={rolled_back}", f"--out={tmp_path / 'export'}"]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["training"]["iterations"] == 6


# --- a checkpoint without its sidecar -------------------------------------------------------------------------------


def test_a_checkpoint_without_its_sidecar_is_resumed_from_with_a_warning(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill between the checkpoint's rename and its sidecar's: the file verifies itself, so it is the run's
    newest (also when it is the only one), and the next checkpoint continues its sequence."""
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    (out / "ckpt_unmasking_8.json").unlink()
    run = build_train_run(["--init_from=resume", f"--out_dir={out}"])
    assert run.path == out / "ckpt_unmasking_8.pt"
    assert "ckpt_unmasking_8.json" in capsys.readouterr().err
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12", "--keep_last=1"]) == 0
    assert json.loads((out / "ckpt_unmasking_12.json").read_text())["seq"] == 3
    assert not (out / "ckpt_unmasking_8.pt").exists()  # rotated: it is the run's own

    only = tmp_path / "only"
    assert _train(tiny_data, only, max_iters=4) == 0
    (only / "ckpt_unmasking_4.json").unlink()
    assert main(["train", "--init_from=resume", f"--out_dir={only}", "--max_iters=8"]) == 0
    assert (only / "ckpt_unmasking_8.pt").exists()


def test_a_garbled_sidecar_is_reported_not_skipped_silently(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    (out / "ckpt_unmasking_8.json").write_text("{not json")
    capsys.readouterr()
    run = build_train_run(["--init_from=resume", f"--out_dir={out}"])
    assert run.path == out / "ckpt_unmasking_4.pt"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "ckpt_unmasking_8.pt: damaged checkpoint" in warnings[0], warnings


# --- the advice a refusal prints works ------------------------------------------------------------------------------


def _advice_works(tiny_data: Path, out: Path, err: str) -> None:
    """Follow every way on that `err` offers; each must start (exit 0)."""
    offered = 0
    if "--init_from=resume" in err:
        offered += 1
        assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0
    if "--overwrite=True" in err:
        offered += 1
        assert _train(tiny_data, out, "--overwrite=True", max_iters=4) == 0
    assert offered


def test_the_advice_for_a_run_killed_before_its_first_checkpoint_works(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=4) == 0
    for path in out.glob("ckpt_*"):
        path.unlink()  # what a kill before the first checkpoint leaves: run.json, config.json, metrics.jsonl
    capsys.readouterr()
    assert _train(tiny_data, out, max_iters=4) == 2
    err = capsys.readouterr().err
    assert "holds run" in err and "--init_from=resume" not in err, err
    _advice_works(tiny_data, out, err)
    assert main(["train", "--init_from=resume", f"--out_dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite=True" in err, err


def test_the_advice_for_a_resumable_run_works(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(tiny_data, out, max_iters=8) == 0
    capsys.readouterr()
    assert _train(tiny_data, out, max_iters=4) == 2
    err = capsys.readouterr().err
    assert "--init_from=resume" in err and "--overwrite=True" in err
    _advice_works(tiny_data, out, err)


# --- metrics.jsonl lines that are not records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["5", "[1, 2]", '{"iter": null}', '{"iter": true}', '"text"', "{not json", "[" * 100_000 + "]" * 100_000],
)
def test_a_metrics_line_that_is_not_a_record_is_dropped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    from unmask.training.run_log import RunLog

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
