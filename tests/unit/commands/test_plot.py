"""`unmask plot`: reading metrics.jsonl (torn lines, resumes, stage changes) and drawing the PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.commands.plot import INSTALL_HINT, run_curves, stage_changes
from unmask.errors import UserError
from unmask.storage.run_dir import read_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = (
    '--unmasking_stages=[{"type": "sticky", "target_masked_ratio": 0.2, "p1_probability": 0.3, '
    '"p2_probability": 0.0, "iters": 8}, {"type": "random", "max_masked_ratio": 1.0, "val_loss_stale_count": 50}]'
)


@pytest.fixture(scope="session")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny runs: one through a stage change at iteration 8, one without."""
    staged = tmp_path_factory.mktemp("plot_runs") / "staged"
    plain = staged.parent / "plain"
    assert main(["train", *tiny_flags(tiny_data, staged), STAGES]) == 0
    assert main(["train", "original", *tiny_flags(tiny_data, plain, max_iters=8)]) == 0  # no stage change
    return [staged, plain]


def write_jsonl(path: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def evaluation(it: int, stage: int, **values: Any) -> dict[str, Any]:
    base = {"kind": "eval", "iter": it, "epochs": it / 100, "train_loss": 3.0, "val_loss": 3.1, "val_bpc": 4.5}
    return {**base, "stage": stage, **values}


def test_read_records_skips_a_torn_last_line_with_a_warning(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "metrics.jsonl", [evaluation(0, 0), evaluation(4, 0)], tail='{"kind": "ev')
    warnings: list[str] = []
    records = read_records(path, warnings.append)
    assert [r["iter"] for r in records] == [0, 4]
    assert len(warnings) == 1 and "metrics.jsonl:3: skipping a torn last line" in warnings[0]


def test_read_records_refuses_a_bad_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(evaluation(0, 0)) + "\nnot json\n" + json.dumps(evaluation(4, 0)) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON record"):
        read_records(path)


def test_run_curves_extracts_losses_bpc_and_stage_changes(tmp_path: Path) -> None:
    records = [
        evaluation(0, 0, val_loss=3.7, val_bpc=5.3),
        {"kind": "train", "iter": 2, "epochs": 0.02, "train_loss_step": 3.5, "stage": 0},
        evaluation(4, 0, val_loss=3.2, val_bpc="inf"),  # non-finite numbers are written as strings
        evaluation(8, 1, val_loss=3.0, val_bpc=4.4),
        evaluation(8, 1, val_loss=2.9, val_bpc=4.3),  # a resume rewrote iteration 8: the later record wins
        evaluation(12, 1, val_loss=2.8, val_bpc=4.2),
        evaluation(16, 2, val_loss=2.7, val_bpc=4.1),
    ]
    curves = run_curves(write_jsonl(tmp_path / "my_run" / "metrics.jsonl", records).parent)
    assert curves.name == "my_run"
    assert curves.val_loss.iters == [0, 4, 8, 12, 16] and curves.val_loss.values == [3.7, 3.2, 2.9, 2.8, 2.7]
    assert curves.val_bpc.iters == [0, 8, 12, 16] and curves.val_bpc.values == [5.3, 4.3, 4.2, 4.1]
    assert curves.val_bpc.xs("epochs") == [0.0, 0.08, 0.12, 0.16]
    assert curves.train_loss_step.iters == [2] and curves.train_loss_step.values == [3.5]
    assert curves.train_loss.values == [3.0] * 5
    assert curves.stage_changes == [(8, 0.08, 1), (16, 0.16, 2)]


def test_stage_changes_ignores_records_without_a_stage() -> None:
    evals = [evaluation(0, 0), {"kind": "eval", "iter": 4}, evaluation(8, 0), evaluation(12, 3)]
    assert stage_changes(evals) == [(12, 0.12, 3)]


def test_run_curves_of_a_real_run_marks_its_stage_change(runs: list[Path]) -> None:
    staged = run_curves(runs[0])
    assert [change[0] for change in staged.stage_changes] == [8]
    assert staged.val_bpc.iters == [0, 4, 8, 12, 16] and all(v > 0 for v in staged.val_bpc.values)
    assert run_curves(runs[1]).stage_changes == []


@pytest.mark.parametrize("x", ["iter", "epochs"])
def test_plot_writes_a_png_of_several_runs(runs: list[Path], tmp_path: Path, x: str) -> None:
    out = tmp_path / "cmp" / "curves.png"
    assert main(["plot", *map(str, runs), f"--out={out}", f"--x={x}"]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_without_matplotlib_says_how_to_install_it(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["plot", str(runs[0]), f"--out={tmp_path / 'c.png'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unmask plot: error: {INSTALL_HINT}"
    assert "pip install 'unmask[plot]'" in err
    assert not (tmp_path / "c.png").exists()


def test_plot_errors(tmp_path: Path, runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["plot"], "name at least one run directory"),
        (["plot", str(tmp_path)], "no metrics.jsonl there"),
        (["plot", str(runs[0]), "--out=curves.pdf"], "--out=curves.pdf: must be a .png file"),
        (["plot", str(runs[0]), "--x=time"], "--x=time"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_read_records_treats_a_line_nested_too_deeply_as_a_bad_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(evaluation(0, 0)) + "\n" + deep + "\n")
    warnings: list[str] = []
    assert [r["iter"] for r in read_records(path, warnings.append)] == [0]
    assert warnings == [f"warning: {path}:2: skipping a torn last line (nested too deeply)"]
    path.write_text(deep + "\n" + json.dumps(evaluation(0, 0)) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:1: not a JSON record \(nested too deeply\)"):
        read_records(path)


def test_plot_skips_values_too_large_to_draw_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        evaluation(0, 0, val_loss=1.7e308, val_bpc=1e308),  # matplotlib raised LinAlgError drawing 1.7e308
        {"kind": "train", "iter": 2, "epochs": 0.02, "train_loss_step": -1e308},
        evaluation(4, 0, val_loss=3.0, val_bpc=4.4, epochs=10**400),  # an integer beyond the float range
        evaluation(8, 1, val_loss=2.9, val_bpc=4.3),
    ]
    tail = '{"kind": "eval", "iter": 9, "val_bpc": NaN}\n{"kind": "eval", "iter": 12, "val_loss": Infinity}\n'
    run = write_jsonl(tmp_path / "run" / "metrics.jsonl", records, tail=tail)  # inf/nan: skipped, no warning
    out = tmp_path / "curves.png"
    for x in ("iter", "epochs"):
        assert main(["plot", str(run.parent), f"--out={out}", f"--x={x}"]) == 0
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"warning: {run}: skipping 4 value(s) beyond +-3.4e+38, too large to plot"), err
        assert "(first: val_loss=1.7e+308 at iter 0)" in err and len(err.splitlines()) == 1
        assert out.read_bytes().startswith(PNG_MAGIC)
    curves = run_curves(run.parent, lambda _: None)
    assert curves.val_loss.values == [3.0, 2.9] and curves.val_bpc.values == [4.4, 4.3]
    assert curves.val_loss.epochs == [None, 0.08]


def test_plot_draws_dollar_signs_in_titles_and_run_names_as_text(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    named = tmp_path / "$x^$ run"
    named.mkdir()
    (named / "metrics.jsonl").write_bytes((runs[1] / "metrics.jsonl").read_bytes())
    out = tmp_path / "curves.png"
    assert main(["plot", str(named), str(runs[0]), f"--out={out}", "--title=cost in $ \\frac{$"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", str(named), f"--out={out}"]) == 0  # the run name as the title


@pytest.mark.parametrize("case", ["a directory", "under a file", "disk full", "read-only"])
def test_plot_write_errors_are_one_line_naming_out(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    import errno
    import os

    out, expected = tmp_path / "curves.png", ""
    if case == "a directory":
        out.mkdir()
        expected = "Is a directory"
    elif case == "under a file":
        (tmp_path / "file").write_text("x")
        out, expected = tmp_path / "file" / "curves.png", f"{tmp_path / 'file'} is not a directory"
    else:
        import matplotlib.figure

        code = errno.ENOSPC if case == "disk full" else errno.EROFS
        expected = os.strerror(code)

        def failing_savefig(self: Any, fname: Any, **kwargs: Any) -> None:
            Path(fname).write_bytes(b"\x89PNG half")  # a partial file, as a full disk leaves
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["plot", str(runs[1]), f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unmask plot: error: --out={out}: cannot write: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left
