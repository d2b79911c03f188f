"""Tests for `unmask eval`: JSON schema, agreement with the trainer and a direct computation, determinism, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_flags
from unmask.cli import main
from unmask.data.dataset import gather_windows, load_dataset
from unmask.likelihood.elbo import ar_nll
from unmask.likelihood.score import split_window_offsets
from unmask.storage.loading import load_trained

BLOCK = 32  # tiny_flags' block_size


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained tiny checkpoint (8 iterations) per model family."""
    root = tmp_path_factory.mktemp("eval_runs")
    out: dict[str, Path] = {}
    for objective in ("unmasking", "autoregressive"):
        out[objective] = root / objective
        assert main(["train", *tiny_flags(tiny_data, out[objective], max_iters=8, objective=objective)]) == 0
    return out


def run_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--json", "--device=cpu", *flags]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    return json.loads(lines[0])


def test_json_schema_and_agreement_with_the_trainer(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["unmasking"]
    r = run_json(capsys, f"--out_dir={run}", "--draws=2")
    n_val = len(load_dataset(Path(r["dataset"])).val)
    types = {
        "bpc": float,
        "bpc_stderr": float,
        "bpc_mc_stderr": float,
        "nats_per_char": float,
        "estimator": str,
        "windows": int,
        "objective": str,
        "checkpoint": str,
        "iter": int,
        "split": str,
        "masked_ce": dict,
    }
    for key, kind in types.items():
        assert isinstance(r[key], kind), key
    assert r["checkpoint"].endswith("ckpt_unmasking_8.pt") and r["iter"] == 8
    assert r["objective"] == "unmasking" and r["split"] == "val" and r["estimator"] == "exact_k" and r["bound"]
    assert r["windows"] == r["windows_total"] == n_val // BLOCK and r["chars"] == r["windows"] * BLOCK
    assert r["bpc"] == pytest.approx(r["nats_per_char"] / math.log(2))
    assert 0 < r["bpc_stderr"] < 0.5 and 0 < r["bpc_mc_stderr"] < 0.5
    assert math.log2(2) < r["bpc"] < math.log2(40) + 1  # better than nothing, not absurd for 39 characters
    # The per-stage metrics rebuild the trainer's validation set (seed 42): the same numbers it logged.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [rec for rec in logged if rec["kind"] == "eval"][-1]
    assert r["masked_ce"]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    for i in range(4):  # the default curriculum's four stages
        assert r["masked_ce"][f"val_stage_{i}_loss"] == pytest.approx(last[f"val_stage_{i}_loss"], rel=1e-5)
    assert len(r["stages"]) == 4


def test_deterministic_for_a_seed(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    flags = (f"--out_dir={runs['unmasking']}", "--draws=2", "--max_windows=20")
    a = run_json(capsys, *flags, "--seed=3")
    b = run_json(capsys, *flags, "--seed=3")
    c = run_json(capsys, *flags, "--seed=4")
    assert a["bpc"] == b["bpc"] and a["bpc_stderr"] == b["bpc_stderr"] and a["bpc"] != c["bpc"]


def test_autoregressive_checkpoint_is_exact(
    runs: dict[str, Path], tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs["autoregressive"]
    r = run_json(capsys, f"--out_dir={run}", "--split=train", "--max_windows=50")
    assert r["objective"] == "autoregressive" and r["estimator"] == "exact" and not r["bound"]
    assert r["masked_ce"] is None and r["split"] == "train" and r["windows"] == 50
    trained = load_trained(run / "ckpt_unmasking_8.pt")
    tokens = load_dataset(tiny_data / "tiny").train
    offsets = split_window_offsets(len(tokens), BLOCK, causal=True)
    assert r["windows_total"] == len(offsets) == (len(tokens) - BLOCK - 1) // BLOCK + 1
    picked = torch.linspace(0, len(offsets) - 1, 50).round().long().numpy()
    with torch.no_grad():
        nll = ar_nll(trained.model, gather_windows(tokens, torch.from_numpy(offsets[picked]), BLOCK + 1))
    assert r["nats_per_char"] == pytest.approx(float(nll.mean()), rel=1e-6)


def test_readable_report(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", f"--out_dir={runs['unmasking']}", "--device=cpu", "--draws=2", "--max_windows=5"]) == 0
    out = capsys.readouterr().out
    for text in ("bits/char", "nats/char", "negative ELBO", "exact_k", "2 draws per window", "iter 8"):
        assert text in out, text
    assert "--max_windows=5: 5 evenly spaced of" in out
    assert "Per-stage masked CE" in out and "Stage 2 (sticky): ratio=0.6" in out
    assert main(["eval", f"--out_dir={runs['autoregressive']}", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "exact NLL" in out and "Per-stage" not in out


def test_other_estimators_run(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for estimator in ("stratified_t", "antithetic_t"):
        r = run_json(capsys, f"--out_dir={runs['unmasking']}", f"--estimator={estimator}", "--max_windows=8")
        assert r["estimator"] == estimator and math.isfinite(r["bpc"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "give --ckpt=PATH or --out_dir=DIR"),
        (["--out_dir={empty}"], "no ckpt_unmasking_<iter>.pt checkpoint there"),
        (["--ckpt={empty}/missing.pt"], "no such checkpoint file"),
        (["--out_dir={run}", "--split=test"], "--split=test: expected one of val, train"),
        (["--out_dir={run}", "--draws=0"], "--draws=0: must be in [1, 10,000]"),
        (["--out_dir={run}", "--draws=many"], "--draws=many: expected an integer"),
        (["--out_dir={run}", "--estimator=antithetic_t", "--draws=3"], "even number of draws"),
        (["--out_dir={run}", "--max_windows=0"], "--max_windows=0: must be in [1, 1,000,000,000,000]"),
        (["--out_dir={run}", "--device=tpu"], "--device=tpu: expected"),
        (["--out_dir={run}", "--data_dir={empty}"], "no such dataset directory"),
        (["--out_dir={run}", "extra"], "extra: unexpected positional argument"),
    ],
)
def test_errors_are_one_line(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    argv = [f.format(run=runs["unmasking"], empty=tmp_path) for f in flags]
    capsys.readouterr()
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unmask eval: error: ") and err.count("\n") == 1 and message in err, err


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--out_dir", "--ckpt", "--split", "--draws", "--seed", "--json", "--estimator", "--max_windows"):
        assert flag in out, flag


@pytest.mark.slow
def test_cli_subprocess_json(runs: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "unmask", "eval", f"--out_dir={runs['unmasking']}", "--json", "--device=cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert {"bpc", "bpc_stderr", "nats_per_char", "estimator", "windows", "objective"} <= set(r)
    assert r["draws"] == 4 and r["windows"] == r["windows_total"]


def test_ckpt_flags_accept_a_run_directory(tmp_path: Path) -> None:
    """--ckpt / --judge_ckpt / --critic_ckpt given a run directory mean its newest checkpoint."""
    from unmask.errors import UserError
    from unmask.storage import checkpoint as ck
    from unmask.storage.loading import resolve_checkpoint

    run = tmp_path / "run"
    for it in (5, 40, 200):
        ck.save_checkpoint(run, it, {"model": {"w": torch.zeros(2)}, "iter_num": it}, {"iter": it})
    assert resolve_checkpoint(str(run), None, flag_prefix="judge_") == run / "ckpt_unmasking_200.pt"
    assert resolve_checkpoint(str(run / "ckpt_unmasking_40.pt"), None) == run / "ckpt_unmasking_40.pt"
    assert resolve_checkpoint(None, str(run)) == run / "ckpt_unmasking_200.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"--critic_ckpt=.*empty: no ckpt_unmasking_<iter>.pt checkpoint there"):
        resolve_checkpoint(str(empty), None, flag_prefix="critic_")
    with pytest.raises(UserError, match="--ckpt=.*nope.pt: no such checkpoint file or run directory"):
        resolve_checkpoint(str(tmp_path / "nope.pt"), None)


# --- --estimator=policy: the exact likelihood under a deterministic unmasking policy -----------------------------


@pytest.fixture(scope="module")
def mdlm_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_policy") / "mdlm"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8, objective="mdlm")]) == 0
    return out


def test_policy_estimator_is_the_exact_policy_likelihood(
    mdlm_run: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unmask.likelihood.policy import model_predict, policy_log_likelihood

    flags = (f"--out_dir={mdlm_run}", "--max_windows=6", "--seed=5")
    r = run_json(capsys, *flags, "--estimator=policy", "--policy=margin", "--per_step=4")
    assert r["objective"] == "mdlm" and r["estimator"] == "policy" and not r["bound"]
    assert r["policy"] == "margin" and r["per_step"] == 4 and r["forward_passes_per_window"] == BLOCK // 4
    assert r["block_length"] is None and r["bpc_mc_stderr"] == 0.0 and r["windows"] == 6
    assert "margin" in r["estimator_description"] and isinstance(r["masked_ce"], dict)
    # The number is policy_log_likelihood of the same windows the ELBO scores.
    trained = load_trained(mdlm_run / "ckpt_unmasking_8.pt")
    tokens = load_dataset(tiny_data / "tiny").val
    offsets = split_window_offsets(len(tokens), BLOCK, causal=False)
    picked = torch.linspace(0, len(offsets) - 1, 6).round().long().numpy()
    x = gather_windows(tokens, torch.from_numpy(offsets[picked]), BLOCK)
    logp = policy_log_likelihood(
        model_predict(trained.model, trained.vocab.mask_id), x, trained.vocab.mask_id, "margin", 4
    )
    assert r["nats_per_char"] == pytest.approx(float(-logp.mean()) / BLOCK, rel=1e-6)
    assert r["bpc"] == pytest.approx(r["nats_per_char"] / math.log(2)) and r["bpc_stderr"] > 0
    # Next to it, the ELBO of the same windows, identical to a plain exact_k evaluation with the same seed.
    plain = run_json(capsys, *flags)
    elbo = r["elbo"]
    assert elbo["estimator"] == "exact_k" and elbo["draws"] == 4 and elbo["windows"] == 6
    assert elbo["bpc"] == plain["bpc"] and elbo["bpc_stderr"] == plain["bpc_stderr"]
    # Other policies and one character per step give other exact numbers.
    others = {
        (p, n): run_json(capsys, *flags, "--estimator=policy", f"--policy={p}", f"--per_step={n}")["bpc"]
        for p in ("left_to_right", "low_confidence", "entropy")
        for n in (1, 32)
    }
    assert len({round(v, 9) for v in others.values()}) >= 4  # per_step=32 is one pass: the same for every policy
    assert len({round(others[(p, 32)], 9) for p in ("left_to_right", "low_confidence", "entropy")}) == 1


def test_policy_report_is_readable(mdlm_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "eval",
        f"--out_dir={mdlm_run}",
        "--device=cpu",
        "--max_windows=4",
        "--estimator=policy",
        "--policy=entropy",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in (
        "exact NLL under the entropy unmasking policy",
        "32 forward passes per window",
        "the number itself is exact",
        "ELBO ",
        "on the same windows",
        "exact_k, 4 draws per window",
    ):
        assert text in out, text


def test_policy_block_length_seam(mdlm_run: Path, tiny_data: Path) -> None:
    """A checkpoint config's `diffusion_block` (block diffusion) keeps the policy inside the leftmost open block."""
    import dataclasses

    from unmask.commands.eval import _block_length, policy_split_likelihood
    from unmask.errors import UserError
    from unmask.likelihood.policy import model_predict, policy_log_likelihood

    trained = load_trained(mdlm_run / "ckpt_unmasking_8.pt")
    assert _block_length(trained) is None
    assert _block_length(dataclasses.replace(trained, config={**trained.config, "diffusion_block": 8})) == 8
    assert _block_length(dataclasses.replace(trained, config={**trained.config, "diffusion_block": 0})) is None
    with pytest.raises(UserError, match="diffusion_block=-2"):
        _block_length(dataclasses.replace(trained, config={**trained.config, "diffusion_block": -2}))
    tokens = load_dataset(tiny_data / "tiny").val
    mask_id = trained.vocab.mask_id
    r = policy_split_likelihood(trained.model, tokens, BLOCK, mask_id, "entropy", 3, 4, torch.device("cpu"), 8, 5)
    assert r["block_length"] == 8 and r["forward_passes_per_window"] == 4 * 3 and r["windows"] == 5
    offsets = split_window_offsets(len(tokens), BLOCK, causal=False)
    picked = torch.linspace(0, len(offsets) - 1, 5).round().long().numpy()
    x = gather_windows(tokens, torch.from_numpy(offsets[picked]), BLOCK)
    logp = policy_log_likelihood(model_predict(trained.model, mask_id), x, mask_id, "entropy", 3, block_length=8)
    assert r["nats_per_char"] == pytest.approx(float(-logp.mean()) / BLOCK, rel=1e-6)
    unblocked = policy_split_likelihood(trained.model, tokens, BLOCK, mask_id, "entropy", 3, 4, torch.device("cpu"))
    assert unblocked["nats_per_char"] != r["nats_per_char"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--out_dir={ar}", "--estimator=policy", "--policy=margin"], "autoregressive (causal) checkpoint"),
        (["--out_dir={mdlm}", "--estimator=policy"], "--estimator=policy: give --policy=left_to_right|"),
        (["--out_dir={mdlm}", "--policy=margin"], "--policy=margin: only with --estimator=policy"),
        (["--out_dir={mdlm}", "--per_step=4"], "--per_step=4: only with --estimator=policy"),
        (
            ["--out_dir={mdlm}", "--estimator=policy", "--policy=margin", "--per_step=0"],
            "--per_step=0: must be in [1, 1,048,576]",
        ),
        (["--out_dir={mdlm}", "--estimator=policy", "--policy=random"], "--policy=random: expected one of"),
    ],
)
def test_policy_errors_are_one_line(
    runs: dict[str, Path], mdlm_run: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = [f.format(ar=runs["autoregressive"], mdlm=mdlm_run) for f in flags]
    capsys.readouterr()
    assert main(["eval", "--device=cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unmask eval: error: ") and err.count("\n") == 1 and message in err, err


def test_policy_cli_subprocess_error(runs: dict[str, Path]) -> None:
    """The real CLI: an autoregressive checkpoint with --estimator=policy is one line on stderr and exit code 2."""
    cmd = [sys.executable, "-m", "unmask", "eval", f"--out_dir={runs['autoregressive']}", "--device=cpu"]
    done = subprocess.run([*cmd, "--estimator=policy", "--policy=margin"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "autoregressive (causal) checkpoint" in done.stderr


def test_policy_cli_subprocess_json(mdlm_run: Path) -> None:
    cmd = [sys.executable, "-m", "unmask", "eval", f"--out_dir={mdlm_run}", "--json", "--device=cpu"]
    cmd += ["--estimator=policy", "--policy=low_confidence", "--per_step=2", "--max_windows=10"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["estimator"] == "policy" and r["policy"] == "low_confidence" and r["forward_passes_per_window"] == 16
    assert math.isfinite(r["bpc"]) and math.isfinite(r["elbo"]["bpc"]) and r["windows"] == r["elbo"]["windows"] == 10


def test_policy_on_a_block_diffusion_checkpoint(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--objective=block_diffusion: the policy commits inside the checkpoint's blocks of K, left to right."""
    out = tmp_path / "bd"
    flags = tiny_flags(tiny_data, out, max_iters=4, objective="block_diffusion", diffusion_block=8)
    assert main(["train", *flags]) == 0
    r = run_json(capsys, f"--out_dir={out}", "--max_windows=4", "--estimator=policy", "--policy=entropy")
    assert r["objective"] == "block_diffusion" and r["block_length"] == 8 and math.isfinite(r["bpc"])
    assert r["forward_passes_per_window"] == BLOCK
    r4 = run_json(
        capsys, f"--out_dir={out}", "--max_windows=4", "--estimator=policy", "--policy=entropy", "--per_step=3"
    )
    assert r4["forward_passes_per_window"] == (BLOCK // 8) * 3  # ceil(8 / 3) per block
