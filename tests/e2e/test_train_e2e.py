"""End-to-end: train, checkpoint, resume (bit for bit), metrics, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA, run_records, tiny_flags
from unmask.cli import main

# Stale count 1 and a high learning rate make the curriculum advance within a few evaluations.
STAGES = (
    '--unmasking_stages=[{"type": "sticky", "target_masked_ratio": 0.2, "p1_probability": 0.3, '
    '"p2_probability": 0.0, "val_loss_stale_count": 1}, {"type": "random", "max_masked_ratio": 0.6, '
    '"val_loss_stale_count": 1}, {"type": "span", "spans_count": 3, "val_loss_stale_count": 1}]'
)


def records(out_dir: Path, kind: str) -> list[dict]:
    return run_records(out_dir, kind)


def test_resume_equals_straight_run_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *tiny_flags(tiny_data, straight, max_iters=24), STAGES]) == 0
    stages_seen = {r["stage"] for r in records(straight, "eval")}
    assert len(stages_seen) >= 2, f"the run must cross a stage change, saw stages {stages_seen}"
    change = next(r["iter"] for r in records(straight, "eval") if r["stage"] > 0)
    assert 4 < change < 24, "the stage change must fall in the second half for this test to mean something"

    assert main(["train", *tiny_flags(tiny_data, split, max_iters=12), STAGES]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={split}", "--max_iters=24"]) == 0

    a = torch.load(straight / "ckpt_unmasking_24.pt", weights_only=True)
    b = torch.load(split / "ckpt_unmasking_24.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["curriculum"] == b["curriculum"] and a["iter_num"] == b["iter_num"] == 24
    for key in ("data", "mask", "torch"):
        assert torch.equal(a["rng"][0][key], b["rng"][0][key])
    assert records(straight, "eval") == records(split, "eval")


def test_metrics_and_checkpoint_contents(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "original", *tiny_flags(tiny_data, out, max_iters=8, keep_last=1)]) == 0
    evals = records(out, "eval")
    assert [r["iter"] for r in evals] == [0, 4, 8]
    last = evals[-1]
    for key in (
        "iter",
        "train_loss",
        "val_loss",
        "val_stage_0_loss",
        "val_stage_2_loss",
        "val_model_vs_random",
        "val_most_likely_accuracy",
        "val_masked_token_ratio",
        "lr",
        "stage",
        "stale_count",
    ):
        assert key in last, key
    # 3 eval_iters x batch 4 = 12 samples spread 4/4/4 over the README's three stages, all evaluated.
    assert [last[f"val_stage_{i}_samples"] for i in range(3)] == [4, 4, 4]
    assert last["val_masked_token_ratio_min"] == pytest.approx(round(0.2 * 32) / 32)
    assert last["val_masked_token_ratio_max"] == pytest.approx(round(0.6 * 32) / 32)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_unmasking_8.json", "ckpt_unmasking_8.pt"]
    sidecar = json.loads((out / "ckpt_unmasking_8.json").read_text())
    assert sidecar["iter"] == 8 and sidecar["config"]["n_embd"] == 16
    assert json.loads((out / "config.json").read_text())["dataset"] == "tiny"
    assert records(out, "train")[-1]["iter"] == 8


def test_train_split_too_short_names_both_numbers(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "o", block_size=100000)]) == 2
    err = capsys.readouterr().err
    assert "--block_size=100000" in err and "100,001" in err and len(err.strip().splitlines()) == 1


def test_resume_with_different_architecture_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=4)]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--n_layer=2"]) == 2
    assert "n_layer: flag 2 vs checkpoint 1" in capsys.readouterr().err


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UNMASK_DATA_MIRROR": str(SHARED_DATA), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "unmask", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_prepare_and_train_in_subprocess(tiny_data: Path, tmp_path: Path) -> None:
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        pytest.skip("shared tiny Shakespeare mirror not present")
    done = _cli("prepare", "shakespeare_char", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mirror" in done.stdout
    meta = json.loads((tmp_path / "data" / "shakespeare_char" / "meta.json").read_text())
    assert meta["vocab_size"] == 65
    done = _cli("train", *tiny_flags(Path("data"), Path("out"), dataset="shakespeare_char", max_iters=4), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step 4: train loss" in done.stdout and "Per-stage validation losses:" in done.stdout
    assert (tmp_path / "out" / "ckpt_unmasking_4.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--bogus=1"), "unmask train: error: --bogus: unknown flag"),
        (("train", "--data_dir=nowhere"), "nowhere/shakespeare_char"),
        (("prepare", "--input=missing.txt"), "missing.txt"),
        (("frobnicate",), "frobnicate: unknown command"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`unmask train --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child writes: its first write fails with EPIPE, deterministically
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "unmask", "train", "--help"], cwd=tmp_path, env=env, stdout=write_end,
        stderr=subprocess.PIPE, text=True, timeout=60,
    )  # fmt: skip
    os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from unmask.config.train_config import TrainConfig

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        if not f.name.startswith("_"):
            assert f"--{f.name}=" in text, f.name


def test_nonfinite_losses_skip_updates_then_stop_cleanly(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import unmask.objectives.unmasking as objectives

    real = objectives.unmasking_loss
    calls = {"n": 0}

    def flaky(model: torch.nn.Module, batch: object, self_cond_mask_id: int | None = None) -> torch.Tensor:
        loss = real(model, batch, self_cond_mask_id)  # type: ignore[arg-type]
        if not torch.is_grad_enabled():
            return loss  # evaluation
        calls["n"] += 1
        # Step 6 is poisoned once; from step 10 on every step is (a diverged run).
        return loss * float("nan") if calls["n"] == 6 or calls["n"] >= 10 else loss

    monkeypatch.setattr(objectives, "unmasking_loss", flaky)
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=40)]) == 2
    captured = capsys.readouterr()
    assert "iter 5: non-finite loss or gradient, update skipped (1/5)" in captured.out
    assert captured.err.count("\n") == 1 and "training diverged at iteration 14" in captured.err
    # Steps 9-13 were skipped, so the weights after them are the last good ones: saved, not lost.
    assert f"saved in {out / 'ckpt_unmasking_14.pt'}" in captured.err
    ckpt = torch.load(out / "ckpt_unmasking_14.pt", weights_only=True)
    assert ckpt["iter_num"] == 14 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    monkeypatch.undo()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--learning_rate=1e-3", "--max_iters=20"]) == 0
    assert records(out, "eval")[-1]["iter"] == 20


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward sends an infinite gradient: a finite loss whose update would destroy the model."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_infinite_gradient_with_a_finite_loss_is_skipped(
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    grad_clip: float,
) -> None:
    import unmask.objectives.unmasking as objectives

    real = objectives.unmasking_loss
    calls = {"n": 0}

    def spiky(model: torch.nn.Module, batch: object, self_cond_mask_id: int | None = None) -> torch.Tensor:
        loss = real(model, batch, self_cond_mask_id)  # type: ignore[arg-type]
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 6:
                return _InfiniteGradient.apply(loss)  # type: ignore[no-any-return]
        return loss

    monkeypatch.setattr(objectives, "unmasking_loss", spiky)
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=12), f"--grad_clip={grad_clip}"]) == 0
    assert "iter 5: non-finite loss or gradient, update skipped (1/5)" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt_unmasking_12.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_a_nonfinite_step_on_another_rank_skips_here_too(tiny_data: Path, tmp_path: Path) -> None:
    """The skip decision is all-reduced: a rank with a finite loss still skips when another rank's was NaN."""
    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    cfg = build_train_run(tiny_flags(tiny_data, tmp_path / "r")).cfg
    trainer = Trainer(cfg, init_runtime("cpu", "float32", "gloo"))
    finite = torch.tensor(1.0)
    assert trainer.step_is_finite(finite, torch.tensor(2.0))
    assert not trainer.step_is_finite(finite, torch.tensor(float("inf")))
    assert not trainer.step_is_finite(torch.tensor(float("nan")), torch.tensor(2.0))

    def other_rank_had_nan(t: torch.Tensor) -> torch.Tensor:
        return t.add_(1.0)  # what the all-reduce returns when one other rank flagged its step

    trainer.rt.all_reduce_sum = other_rank_had_nan  # type: ignore[method-assign]
    assert not trainer.step_is_finite(finite, torch.tensor(2.0))


def test_evaluating_more_often_does_not_change_training(tiny_data: Path, tmp_path: Path) -> None:
    """Evaluations use their own generators and leave the selection pool alone: the training batches, losses and
    weights are the same whether a run evaluates every 4 or every 8 iterations (no stage change happens here)."""
    runs = {}
    for every in (4, 8):
        out = tmp_path / f"every{every}"
        flags = tiny_flags(tiny_data, out, max_iters=16, eval_interval=every, log_interval=1)
        assert main(["train", "original", *flags]) == 0  # the original stages: no stage change in 16 iterations
        runs[every] = out
    losses = {k: [(r["iter"], r["train_loss_step"]) for r in records(out, "train")] for k, out in runs.items()}
    assert len(losses[4]) == 16 and losses[4] == losses[8]
    a = torch.load(runs[4] / "ckpt_unmasking_16.pt", weights_only=True)
    b = torch.load(runs[8] / "ckpt_unmasking_16.pt", weights_only=True)
    assert {r["stage"] for r in records(runs[4], "eval")} == {0}
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_says_when_the_run_is_finished_and_warns_on_a_new_schedule(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8)]) == 0
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}"]) == 0
    assert "the run is already finished at iteration 8 (max_iters 8)" in capsys.readouterr().out
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12"]) == 0
    err = capsys.readouterr().err
    assert "different learning-rate schedule (max_iters: flag 12 vs checkpoint 8)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_resumed_run_starts_a_fresh_non_finite_count(tiny_data: Path, tmp_path: Path) -> None:
    """A checkpoint written after 4 skipped steps must not make the first bad step after a resume fatal."""
    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=4)]) == 0
    ckpt = torch.load(out / "ckpt_unmasking_4.pt", weights_only=True)
    ckpt["nonfinite_steps"] = 4
    run = build_train_run(["--init_from=resume", f"--out_dir={out}", "--max_iters=8"])
    trainer = Trainer(run.cfg, init_runtime("cpu", "float32", "gloo"), ckpt, run.path)
    assert trainer.nonfinite_steps == 0


def test_the_default_curriculum_ends_at_full_masking_and_reaches_it(tiny_data: Path, tmp_path: Path) -> None:
    """With no stage configuration the run ends in a stage that masks U(0, 1) of each window (so the model can
    generate from an empty canvas), after the original sticky stages of 10 % of --max_iters each."""
    from unmask.commands.train import build_train_run
    from unmask.curriculum.stages import ORIGINAL_STAGES, RandomStage

    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=40, eval_interval=10)]) == 0
    ckpt = torch.load(out / "ckpt_unmasking_40.pt", weights_only=True)
    stages = ckpt["config"]["unmasking_stages"]
    assert [s["iters"] for s in stages[:3]] == [4, 4, 4] and len(stages) == 4
    assert RandomStage(masking_rate_range=(0.0, 1.0)).to_dict() == stages[3]
    assert ckpt["curriculum"]["stage"] == 3 and ckpt["curriculum"]["stage_start_iter"] == 12
    original = build_train_run(["original"]).cfg
    assert original.unmasking_stages == ORIGINAL_STAGES


def test_the_default_gpu_model_on_a_cpu_is_announced_in_one_line() -> None:
    from unmask.commands.train import build_train_run, cpu_default_note

    assert build_train_run([]).default_model
    assert not build_train_run(["cpu"]).default_model and not build_train_run(["--n_layer=2"]).default_model
    note = cpu_default_note(build_train_run([]).cfg)
    assert "\n" not in note and "10.6M-parameter, block-1024" in note and "unmask train cpu" in note
    assert re.search(r"about [\d.]+ s per iteration and \d+ s per evaluation", note)


def test_threads_flag_everywhere(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unmask import runtime

    assert 1 <= runtime.auto_threads() <= runtime._TORCH_THREADS  # at most torch's own default, whatever is set now
    before = torch.get_num_threads()
    try:
        assert main(["train", *tiny_flags(tiny_data, tmp_path, max_iters=2), "--threads=1"]) == 0
        assert torch.get_num_threads() == 1
        for command in ("sample", "eval"):
            assert main([command, f"--out_dir={tmp_path}", "--threads=-1"]) == 2
            assert "--threads=-1: must be in [0, 1,024]" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_received_checkpoint_cannot_switch_on_wandb(tiny_data: Path, tmp_path: Path) -> None:
    from unmask.commands.train import build_train_run
    from unmask.storage import checkpoint as ckpt_io

    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=4)]) == 0
    path = out / "ckpt_unmasking_4.pt"
    ckpt = ckpt_io.load_checkpoint(path)
    ckpt["config"]["wandb_log"] = True
    sidecar = json.loads(path.with_suffix(".json").read_text())
    state = {k: v for k, v in ckpt.items() if k not in ("format_version", "integrity")}
    ckpt_io.save_checkpoint(out, 4, state, {k: sidecar[k] for k in ("iter", "run_id", "seq")})
    assert build_train_run(["--init_from=resume", f"--out_dir={out}"]).cfg.wandb_log is False
