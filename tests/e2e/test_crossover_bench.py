"""benchmarks/crossover.py end to end at a minuscule budget: datasets of exact sizes, one record per run, and a
second invocation that trains nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from unmask.data.dataset import load_dataset

pytestmark = pytest.mark.slow


def _study(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "crossover.py"),
        f"--out_dir={out}",
        f"--source={source}",
        "--corpus_chars=1500,3000",
        "--epochs=2,1",
        "--evals=2",
        "--ar_dropouts=0",
        "--objectives=mdlm",
        "--progress_every=1",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_crossover_study_records_every_run_and_resumes(tmp_path: Path) -> None:
    words = ["the", "king", "and", "queen", "of", "a", "house", "shall", "not", "be", "my", "lord"]
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(800)) + "\n"
    source = tmp_path / "corpus.txt"
    source.write_text(text)
    out = tmp_path / "study"

    first = _study(source, out)
    assert first.returncode == 0, first.stderr[-2000:]
    doc = json.loads((out / "crossover.json").read_text())
    runs = doc["runs"]
    assert [(r["corpus_chars"], r["label"]) for r in runs] == [
        (1500, "ar_dropout0"),
        (1500, "mdlm"),
        (3000, "ar_dropout0"),
        (3000, "mdlm"),
    ]
    n_train = int(len(text) * 0.9)
    for r in runs:
        # the dataset is the first corpus_chars characters of the source's training split + its whole validation split
        ds = load_dataset(out / "data" / f"c{r['corpus_chars']}")
        assert ds.vocab.decode(ds.train) == text[: r["corpus_chars"]] and ds.vocab.decode(ds.val) == text[n_train:]
        assert r["val_chars"] == len(text) - n_train
        assert len(r["val_bpc_by_epoch"]) == 3 and r["val_bpc_by_epoch"][0][0] == 0  # the evaluation before training
        assert r["epochs_trained"] >= (2 if r["corpus_chars"] == 1500 else 1)
        assert r["best_val_bpc"] == min(v for _, v in r["val_bpc_by_epoch"])
        assert f"--dataset=c{r['corpus_chars']}" in r["flags"] and r["commit"]
    assert (out / "crossover.png").stat().st_size > 0
    assert "best AR dropout 0" in first.stdout

    stamp = {p: p.stat().st_mtime_ns for p in out.glob("c*/*/metrics.jsonl")}
    second = _study(source, out)  # every run is finished: nothing trains again, the records are rewritten
    assert second.returncode == 0, second.stderr[-2000:]
    assert "4 runs, 4 already finished" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("c*/*/metrics.jsonl")} == stamp
    assert json.loads((out / "crossover.json").read_text())["runs"] == runs
