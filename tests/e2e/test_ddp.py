"""Two-process DDP on the CPU (gloo) through the real torchrun launcher: train, checkpoint, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_flags


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unmask", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_gloo_train_and_resume(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = _torchrun("train", *tiny_flags(tiny_data, out, max_iters=8), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 8: train loss") == 1  # only rank 0 prints
    assert "world size 2" in done.stdout
    ckpt = torch.load(out / "ckpt_unmasking_8.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # every rank's data and masking streams are saved
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])

    done = _torchrun("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # The 12 validation samples are sharded over the ranks and all-reduced: all are counted once.
    assert sum(evals[-1][f"val_stage_{i}_samples"] for i in range(4)) == 12  # the default curriculum: four stages

    # Resuming with a different number of processes would silently change the data streams: refused.
    from unmask.cli import main

    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=16"]) == 2
