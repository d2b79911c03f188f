"""`unmask compare`: several objectives on the same flags, one table, JSON, CSV and PNG."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.commands.compare import RunSpec, best_points, comparison_rows, parse_objectives
from unmask.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_three_objectives_table_json_csv_png(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    flags = tiny_flags(tiny_data, out, max_iters=8)
    assert main(["compare", *flags, "--objectives=autoregressive,mdlm,block_diffusion:4"]) == 0
    labels = ["autoregressive", "mdlm", "block_diffusion_k4"]
    columns, rows = _csv(out / "compare.csv")
    assert columns == ["iter", "epochs", *(f"{label}_val_bpc" for label in labels)]
    assert [int(r["iter"]) for r in rows] == [0, 4, 8]
    summary = json.loads((out / "compare.json").read_text())
    assert [s["label"] for s in summary["objectives"]] == labels
    assert summary["rows"][-1]["epochs"] > summary["rows"][1]["epochs"] > 0
    for label in labels:
        values = [r[f"{label}_val_bpc"] for r in summary["rows"]]
        assert all(isinstance(v, float) for v in values)
        assert float(rows[-1][f"{label}_val_bpc"]) == pytest.approx(values[-1])
        assert summary["best"][label]["val_bpc"] == min(values)
        assert (out / label / "ckpt_unmasking_8.pt").exists()
    # each run trained its own objective; only the block-diffusion run got a block length
    configs = {label: _config(out / label) for label in labels}
    assert {k: (c["objective"], c["diffusion_block"]) for k, c in configs.items()} == {
        "autoregressive": ("autoregressive", 0),
        "mdlm": ("mdlm", 0),
        "block_diffusion_k4": ("block_diffusion", 4),
    }
    assert (out / "compare.png").read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "block_diffusion_k4 val_bpc" in printed and "best mdlm: val_bpc" in printed


def test_plain_block_diffusion_takes_diffusion_block_and_plot_false_needs_no_matplotlib(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "cmp"
    argv = ["compare", *tiny_flags(tiny_data, out, max_iters=4), "--objectives", "mdlm,block_diffusion"]
    window = ["--mask_rate_window=0.2,0.9", "--mdlm_estimator=antithetic_t"]  # the clipped t schedule
    assert main([*argv, "--diffusion_block=8", *window, "--plot=False"]) == 0
    assert _config(out / "block_diffusion_k8")["diffusion_block"] == 8
    assert _config(out / "block_diffusion_k8")["mask_rate_window"] == [0.2, 0.9]
    assert _config(out / "mdlm")["diffusion_block"] == 0
    assert _config(out / "mdlm")["objective"] == "mdlm"
    assert (out / "compare.csv").exists() and not (out / "compare.png").exists()


def test_missing_matplotlib_refused_before_training(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "cmp"
    assert main(["compare", *tiny_flags(tiny_data, out, max_iters=4), "--objectives=autoregressive,mdlm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'unmask[plot]'" in err[0] and "--plot=False" in err[0]
    assert not out.exists()  # nothing trained


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objectives=autoregressive,gpt"], "unknown objective 'gpt'"),
        (["--objectives=autoregressive,block_diffusion"], "block_diffusion needs a block length"),
        (["--objectives=block_diffusion:0"], "K must be an integer >= 1"),
        (["--objectives=mdlm:4"], "only block_diffusion takes a block length"),
        (["--objectives=mdlm,autoregressive,mdlm"], "mdlm named twice"),
        (["--objectives=block_diffusion:4,block_diffusion", "--diffusion_block=4"], "block_diffusion_k4 named twice"),
        (["--objectives=autoregressive,mdlm", "--diffusion_block=4"], "--diffusion_block=4: applies to a plain"),
        (["--objectives=autoregressive,block_diffusion:5"], "divides --block_size=32 (run block_diffusion_k5)"),
        (["--objective=mdlm"], "--objective/--init_from: compare chooses"),
        (["--diffusion_objective=gpt"], "--diffusion_objective=gpt: expected one of unmasking, mdlm, block_diffusion"),
        (["--diffusion_objective=mdlm", "--objectives=mdlm"], "--diffusion_objective: deprecated; give --objectives"),
        (["--plot=maybe"], "--plot"),
    ],
)
def test_errors_are_one_line_and_train_nothing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *tiny_flags(tiny_data, out, max_iters=4), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_diffusion_objective_is_a_deprecated_alias(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *tiny_flags(tiny_data, out, max_iters=4), "--diffusion_objective=unmasking"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "deprecated" in line] == [
        "unmask compare: warning: --diffusion_objective is deprecated; write --objectives=autoregressive,unmasking"
    ]
    columns, _ = _csv(out / "compare.csv")
    assert columns == ["iter", "epochs", "autoregressive_val_bpc", "unmasking_val_bpc"]


def test_help_lists_compare_flags_before_train_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--objectives=", "--plot=", "--diffusion_objective=", "--n_layer=", "--diffusion_block="):
        assert flag in text
    assert text.index("--objectives=") < text.index("--diffusion_objective=") < text.index("--n_layer=")
    assert "block_diffusion:K" in text


def test_parse_objectives() -> None:
    assert parse_objectives("autoregressive, block_diffusion:4,block_diffusion:16") == [
        RunSpec("autoregressive", "autoregressive"),
        RunSpec("block_diffusion_k4", "block_diffusion", 4),
        RunSpec("block_diffusion_k16", "block_diffusion", 16),
    ]
    assert parse_objectives("block_diffusion", {"diffusion_block": 8}) == [
        RunSpec("block_diffusion_k8", "block_diffusion", 8)
    ]
    with pytest.raises(UserError, match="unknown objective ''"):
        parse_objectives("mdlm,")


def test_rows_cover_every_evaluation_and_best_is_the_earliest_minimum() -> None:
    points = {
        "a": [(0, 0.0, 5.0), (4, 0.5, 3.0), (8, 1.0, 3.0)],
        "b": [(0, 0.0, 5.5), (4, 0.5, 4.0)],  # b stopped early (or its last val_bpc was not finite)
    }
    rows = comparison_rows(points)
    assert rows == [
        {"iter": 0, "epochs": 0.0, "a_val_bpc": 5.0, "b_val_bpc": 5.5},
        {"iter": 4, "epochs": 0.5, "a_val_bpc": 3.0, "b_val_bpc": 4.0},
        {"iter": 8, "epochs": 1.0, "a_val_bpc": 3.0, "b_val_bpc": None},
    ]
    best = best_points({**points, "c": []})
    assert best == {"a": {"iter": 4, "epochs": 0.5, "val_bpc": 3.0}, "b": {"iter": 4, "epochs": 0.5, "val_bpc": 4.0}}


def test_an_occupied_run_directory_is_refused_before_any_run_trains(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["train", *tiny_flags(tiny_data, out / "mdlm", max_iters=4), "--objective=mdlm"]) == 0
    capsys.readouterr()
    assert main(["compare", *tiny_flags(tiny_data, out, max_iters=4), "--objectives=autoregressive,mdlm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out_dir={out / 'mdlm'}: holds run" in err[0]
    assert not (out / "autoregressive").exists()  # the first run did not train


@pytest.mark.parametrize("k", ["²", "٣", "4.0", "+4", "1" * 5000, "0"])
def test_parse_objectives_takes_only_ascii_digits_for_k(k: str) -> None:
    with pytest.raises(UserError) as info:
        parse_objectives(f"block_diffusion:{k}")
    message = str(info.value)
    assert message.startswith("--objectives=block_diffusion:") and "K must be an integer >= 1" in message
    assert "\n" not in message
