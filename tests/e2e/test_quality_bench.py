"""benchmarks/quality.py end to end at a minuscule configuration: the real CLI in subprocesses, table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

COLUMNS = ["run", "sampler", "eval_nats_per_char", "judge_nll", "char_entropy_bits", "chars_per_second", "mean_nfe"]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(tiny_data: Path, out: Path, samples: int = 2) -> int:
    """The script's main in this process (it runs `python -m unmask` in subprocesses, as a user would)."""
    argv = [
        f"--out={out}",
        f"--data_dir={tiny_data}",
        "--dataset=tiny",
        "--objectives=autoregressive",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=32",
        "--batch_size=4",
        "--max_iters=2",
        f"--samples={samples}",
        "--length=12",
        "--eval_max_windows=2",
    ]
    return int(_script().main(argv))


def test_quality_bench_writes_table_and_json_and_resumes(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality"
    assert _bench(tiny_data, out) == 0
    first = capsys.readouterr().out
    doc = json.loads((out / "quality.json").read_text())
    assert doc["columns"] == COLUMNS
    rows = doc["rows"]
    assert [(r["run"], r["sampler"]) for r in rows] == [("autoregressive", "temperature 1, KV cache")]
    row = rows[0]
    assert row["kind"] == "autoregressive" and row["iter"] == 2
    assert row["eval_bound"] is False and row["eval_nats_per_char"] > 0
    assert row["judge_nll"] > 0 and row["char_entropy_bits"] > 0 and row["chars_per_second"] > 0
    assert [len(s) for s in row["samples"]] == [12, 12]
    assert row["mean_nfe"] == 12  # one forward pass per character
    assert doc["judge"] == str(out / "judge") and set(doc["train_seconds"]) == {"judge", "autoregressive"}
    real = doc["reference"]
    assert real["run"] == "real validation text" and real["judge_nll"] > 0 and real["char_entropy_bits"] > 0
    table = (out / "quality.md").read_text().splitlines()
    assert table[0] == (
        "| run | sampler | eval nats/char | judge NLL (nats/char) | char entropy (bits) | chars/s | NFE/sample |"
    )
    assert len(table) == 2 + len(rows) + 1 and table[-1].startswith("| real validation text |")
    assert "| run |" in first and "training judge" in first

    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    assert _bench(tiny_data, out) == 0  # resumes: every step's result exists, nothing runs again
    assert "training" not in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamp
    assert json.loads((out / "quality.json").read_text())["rows"] == rows

    with pytest.raises(SystemExit) as exit_info:  # results made with --samples=2 are not --samples=3 results
        _bench(tiny_data, out, samples=3)
    assert exit_info.value.code == 2
    assert "--samples=3: " in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == stamp


def test_quality_bench_refuses_unknown_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _script().main([f"--out={tmp_path / 'q'}", "--objectives=gpt"])
    assert exit_info.value.code == 2
    assert "--objectives=gpt: expected names from autoregressive, mdlm" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
