"""SIGTERM / Ctrl-C: the step in progress finishes, a checkpoint of that state is written, the exit code is
128 + signal, and a resumed run is bit for bit the uninterrupted one (docs/origin.md §4.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_flags
from tests.e2e.test_train_e2e import STAGES, records
from unmask.cli import main
from unmask.training.trainer import Trainer


@pytest.mark.parametrize(
    ("stop_at", "signum"),
    [
        (6, signal.SIGTERM),  # between evaluations: the selection pool holds rows that must survive
        (8, signal.SIGINT),  # an evaluation is due at 8 and has not run yet: the resumed run must do it
    ],
)
def test_signal_stop_saves_and_resumes_bit_for_bit(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int, signum: int
) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *tiny_flags(tiny_data, straight, max_iters=24), STAGES]) == 0

    log_step = Trainer.log_step

    def log_then_signal(self: Trainer, loss: float) -> None:
        log_step(self, loss)
        if self.iter_num == stop_at:
            os.kill(os.getpid(), signum)  # delivered now, to the handler the trainer installed

    before = signal.getsignal(signum)
    monkeypatch.setattr(Trainer, "log_step", log_then_signal)
    assert main(["train", *tiny_flags(tiny_data, split, max_iters=24), STAGES]) == 128 + signum
    assert signal.getsignal(signum) == before  # handlers restored after the run
    saved = torch.load(split / f"ckpt_unmasking_{stop_at}.pt", weights_only=True)
    assert saved["iter_num"] == stop_at and saved["last_eval_iter"] == 4
    if stop_at == 6:
        assert any(rows is not None and len(rows) for rows in saved["rng"][0]["pool"])
    monkeypatch.undo()

    assert main(["train", "--init_from=resume", f"--out_dir={split}"]) == 0
    a = torch.load(straight / "ckpt_unmasking_24.pt", weights_only=True)
    b = torch.load(split / "ckpt_unmasking_24.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key in ("data", "mask", "torch"):
        assert torch.equal(a["rng"][0][key], b["rng"][0][key])
    assert a["curriculum"] == b["curriculum"]
    assert records(straight, "eval") == records(split, "eval")


@pytest.mark.slow
def test_sigterm_to_the_real_cli(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-u", "-m", "unmask", "train", *tiny_flags(tiny_data, out, max_iters=100_000)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:  # wait until training is under way
        if line.startswith("iter "):
            break
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 143
    ack, final = stderr.strip().splitlines()  # acknowledged at once, then the stop itself
    assert "received SIGTERM: stopping with a checkpoint after the current step" in ack
    assert "received SIGTERM: stopped after iteration" in final
    saved = sorted(out.glob("ckpt_unmasking_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[-1]
    assert str(saved) in stderr
    assert torch.load(saved, weights_only=True)["iter_num"] >= 2
