"""--mask_rate_window for mdlm and block_diffusion (a fixed LO,HI or BD3-LM's variance search, `auto`), and block
diffusion's --zero_masking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_records, tiny_flags
from unmask.cli import main
from unmask.errors import UserError
from unmask.likelihood.block import (
    block_diffusion_weighted_loss,
    block_unit_losses,
    sample_block_training_masks,
)
from unmask.model import ModelConfig, Transformer
from unmask.objectives.mdlm import draw_mdlm_batch, mdlm_batch_loss, mdlm_unit_losses, sample_mdlm_batch
from unmask.objectives.window_search import FULL_WINDOW, candidate_windows, search_window

VOCAB = 6  # 5 characters + [MASK]
MASK_ID = VOCAB - 1


def _model(diffusion_block: int = 0) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16)  # type: ignore[call-arg]
    config.diffusion_block = diffusion_block
    return Transformer(config).eval()


def _clean(B: int = 6, L: int = 16) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (B, L), generator=torch.Generator().manual_seed(1))


# --- the flag --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--objective=mdlm", "--mask_rate_window=auto"], "auto"),
        (["--objective=mdlm", "--mask_rate_window=0.3,0.8"], (0.3, 0.8)),
        (
            [
                "--objective=block_diffusion",
                "--diffusion_block=4",
                "--mdlm_estimator=antithetic_t",
                "--mask_rate_window=auto",
            ],
            "auto",
        ),
        (["--objective=autoregressive", "--mask_rate_window=0,1"], (0.0, 1.0)),  # the full window: every default
    ],
)
def test_the_window_flag_accepts(flags: list[str], expected: object) -> None:
    from unmask.commands.train import build_train_run

    assert build_train_run(flags).cfg.mask_rate_window == expected


def test_the_help_shows_the_window_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    assert "--mask_rate_window=LIST|{auto} in [0, 1]  (default: (0.0, 1.0))" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mask_rate_window=auto"], "--mask_rate_window=auto: applies to --objective=mdlm and block_diffusion only"),
        (["--objective=autoregressive", "--mask_rate_window=0.2,0.5"], "applies to --objective=mdlm and block"),
        (["--objective=mdlm", "--mask_rate_window=0.8,0.3"], "--mask_rate_window=0.8,0.3: need 0 <= LO < HI <= 1"),
        (["--objective=mdlm", "--mask_rate_window=0.5,0.5"], "--mask_rate_window=0.5,0.5: need 0 <= LO < HI <= 1"),
        (["--objective=mdlm", "--mask_rate_window=0.5,1.5"], "--mask_rate_window=(0.5, 1.5): must be in [0, 1]"),
        (["--objective=mdlm", "--mask_rate_window=[0.2]"], "--mask_rate_window=[0.2]: expected LO,HI"),
        (
            ["--objective=mdlm", "--mask_rate_window='aut'"],
            "--mask_rate_window=aut: expected a number in [0, 1] or auto",
        ),
        (["--objective=mdlm", "--mdlm_estimator=exact_k", "--mask_rate_window=auto"], "exact_k draws mask counts"),
        (["--objective=block_diffusion", "--diffusion_block=4", "--mask_rate_window=auto"], "exact_k draws mask"),
    ],
)
def test_the_window_flag_refuses_with_one_line(
    flags: list[str], message: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_library_checks_the_window_too() -> None:
    from unmask.config.train_config import TrainConfig

    assert TrainConfig(objective="mdlm", mask_rate_window=[0.2, 0.7]).mask_rate_window == (0.2, 0.7)  # type: ignore[arg-type]
    assert TrainConfig(objective="mdlm", mask_rate_window="auto").fixed_mask_rate_window == FULL_WINDOW
    with pytest.raises(UserError, match="^--mask_rate_window=auto: applies to"):
        TrainConfig(objective="unmasking", mask_rate_window="auto")


# --- the search ------------------------------------------------------------------------------------------------------


def test_the_candidate_grid_is_bd3lms() -> None:
    windows = candidate_windows()
    assert windows[0] == FULL_WINDOW and len(windows) == 36 == len(set(windows))
    assert (0.45, 0.95) in windows and (0.3, 0.8) in windows and (0.1, 1.0) in windows  # their K=4 and K=16 choices
    assert all(0.0 <= lo < hi <= 1.0 for lo, hi in windows)


def test_the_search_keeps_the_window_of_least_variance() -> None:
    """A fake loss whose terms are +-s(window) (s smallest at (0.35, 0.85)), varying with the batch: the search must
    find that window and report the variances exactly (sample variance of [s, -s, s, -s] is 4 s^2 / 3)."""
    target = (0.35, 0.85)

    def scale(window: tuple[float, float], j: int) -> float:
        return (abs(window[0] - target[0]) + abs(window[1] - target[1]) + 0.01) * (1 + j)

    def units(window: tuple[float, float], j: int) -> torch.Tensor:
        return scale(window, j) * torch.tensor([1.0, -1.0, 1.0, -1.0])

    result = search_window(units, 3, candidate_windows())
    assert result.window == target
    expected = {w: sum(4 * scale(w, j) ** 2 / 3 for j in range(3)) / 3 for w in candidate_windows()}
    assert result.variance == pytest.approx(expected[target], rel=1e-6)
    assert result.full_variance == pytest.approx(expected[FULL_WINDOW], rel=1e-6)
    assert result.variances == pytest.approx(expected, rel=1e-6)
    # Ties go to the earlier window (the full one first); a non-finite variance never wins.
    assert search_window(lambda w, j: torch.tensor([0.0, 1.0]), 1, candidate_windows()).window == FULL_WINDOW
    nan_first = search_window(
        lambda w, j: torch.tensor([math.nan if w == FULL_WINDOW else 0.0, 1.0]), 1, [FULL_WINDOW, target]
    )
    assert nan_first.window == target and math.isnan(nan_first.full_variance)


def test_the_loss_terms_average_to_the_training_losses() -> None:
    """The terms whose variance the search compares are the training loss's: their mean is the loss."""
    clean = _clean()
    batch = draw_mdlm_batch(clean, MASK_ID, torch.Generator().manual_seed(2), mask_rate_window=(0.2, 0.9))
    with torch.no_grad():
        for drop in (MASK_ID, None):
            units = mdlm_unit_losses(_model(), batch, drop)
            assert units.shape == (6,)
            assert float(units.mean()) == pytest.approx(float(mdlm_batch_loss(_model(), batch, drop)), rel=1e-5)
    model = _model(diffusion_block=4)
    selected, weight = sample_block_training_masks(clean, 4, torch.Generator().manual_seed(3), (0.2, 0.9))
    with torch.no_grad():
        for zero in (True, False):
            units = block_unit_losses(model, clean, selected, weight, MASK_ID, 4, zero)
            loss = block_diffusion_weighted_loss(model, clean, selected, weight, MASK_ID, 4, zero)
            assert units.shape == (6 * 4,) and float(units.mean()) == pytest.approx(float(loss), rel=1e-5)


# --- mdlm's window ---------------------------------------------------------------------------------------------------


def test_the_mdlm_window_restricts_t_and_stratifies_inside_it() -> None:
    B = 50
    x = _clean(B)
    _, selected, t = sample_mdlm_batch(x, MASK_ID, torch.Generator().manual_seed(0), mask_rate_window=(0.3, 0.8))
    assert bool((t >= 0.3).all() and (t < 0.8).all())
    strata = ((t - 0.3) / 0.5 * B).floor().long().sort().values  # one t in each of B equal strata of the window
    assert torch.equal(strata, torch.arange(B))
    batch = draw_mdlm_batch(x, MASK_ID, torch.Generator().manual_seed(0), mask_rate_window=(0.3, 0.8))
    assert torch.equal(batch.weight, 1.0 / t) and torch.equal(batch.selected, selected)
    # The full window is the draw of before (t = eps + (1 - eps) u), bit for bit, and t never below eps.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, _, t_full = sample_mdlm_batch(x, MASK_ID, g1)
    from unmask.likelihood.estimators import systematic_uniforms

    assert torch.equal(t_full, 1e-3 + (1.0 - 1e-3) * systematic_uniforms(B, g2))
    _, _, t_low = sample_mdlm_batch(x, MASK_ID, torch.Generator().manual_seed(0), mask_rate_window=(0.0, 0.5))
    assert bool((t_low >= 1e-3).all())
    with pytest.raises(ValueError, match="exact_k"):
        draw_mdlm_batch(x, MASK_ID, torch.Generator(), estimator="exact_k", mask_rate_window=(0.3, 0.8))


def test_an_mdlm_run_trains_inside_its_window_and_evaluates_on_the_full_one(tiny_data: Path, tmp_path: Path) -> None:
    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    flags = [*tiny_flags(tiny_data, tmp_path), "--objective=mdlm", "--mask_rate_window=0.4,0.6"]
    cfg = build_train_run(flags).cfg
    trainer = Trainer(cfg, init_runtime("cpu", "float32", "gloo"))
    objective = trainer.objective
    gen = torch.Generator().manual_seed(0)
    train = objective.batch(gen, torch.Generator().manual_seed(1), True)
    fresh = objective.batch(gen, torch.Generator().manual_seed(1), False)
    assert bool((1 / train.weight >= 0.4 - 1e-6).all() and (1 / train.weight < 0.6 + 1e-6).all())
    assert float((1 / fresh.weight).min()) < 0.4 or float((1 / fresh.weight).max()) > 0.6
    trainer.lock.release()


# --- auto through the trainer ----------------------------------------------------------------------------------------


def test_auto_records_the_chosen_window_and_prints_it(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [*tiny_flags(tiny_data, tmp_path, max_iters=16), "--objective=mdlm", "--mask_rate_window=auto"]
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    evals = run_records(tmp_path, "eval")
    assert [r["iter"] for r in evals] == [0, 4, 8, 12, 16]
    searched = [r["iter"] for r in evals if "mask_rate_window_variance" in r]
    assert searched == [4, 8, 16]  # not at 0 (untrained); then as the iteration doubles
    assert evals[0]["mask_rate_window"] == [0.0, 1.0]
    assert evals[3]["mask_rate_window"] == evals[2]["mask_rate_window"]  # kept between searches
    for r in evals:
        if r["iter"] in searched:
            assert tuple(r["mask_rate_window"]) in candidate_windows()
            assert r["mask_rate_window_variance"] <= r["mask_rate_window_variance_full"]
            assert r["mask_rate_window_search_seconds"] > 0
            lo, hi = r["mask_rate_window"]
            assert f"mask rate window: ({lo:g}, {hi:g}] by variance search" in out
    assert out.count("by variance search") == 3
    ckpt = torch.load(tmp_path / "ckpt_unmasking_16.pt", weights_only=True)
    assert ckpt["mask_rate_window_chosen"] == evals[-1]["mask_rate_window"]
    assert ckpt["mask_rate_window_searched_at"] == 16


def test_auto_resumes_with_the_chosen_window_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    """12 straight steps equal 8 + resume + 4: the window chosen at iteration 8 trains steps 8..12 in both (a resume
    that forgot it would train them on the full window), and neither searches at 12 (8 was the last search)."""
    window = ["--objective=block_diffusion", "--diffusion_block=4", "--mdlm_estimator=antithetic_t"]
    window.append("--mask_rate_window=auto")
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "a", max_iters=12), *window]) == 0
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "b", max_iters=8), *window]) == 0
    at_8 = torch.load(tmp_path / "b" / "ckpt_unmasking_8.pt", weights_only=True)["mask_rate_window_chosen"]
    assert at_8 != [0.0, 1.0]  # measured: (0.5, 1.0); else this test could not tell a forgotten window
    assert main(["train", "--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=12"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt_unmasking_12.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt_unmasking_12.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["mask_rate_window_chosen"] == b["mask_rate_window_chosen"] == at_8
    clock = "mask_rate_window_search_seconds"
    evals = [[{k: v for k, v in r.items() if k != clock} for r in run_records(tmp_path / d, "eval")] for d in "ab"]
    assert evals[0] == evals[1]
    assert "mask_rate_window_variance" not in evals[1][-1]  # no search at 12 after the resume either


# --- block diffusion's zero-masking ----------------------------------------------------------------------------------


def test_block_diffusion_zero_masking_false_is_the_full_softmax() -> None:
    model = _model(diffusion_block=4)
    clean = _clean()
    selected, weight = sample_block_training_masks(clean, 4, torch.Generator().manual_seed(3))
    with torch.no_grad():
        zero = block_diffusion_weighted_loss(model, clean, selected, weight, MASK_ID, 4)
        assert torch.equal(zero, block_diffusion_weighted_loss(model, clean, selected, weight, MASK_ID, 4, True))
        full = block_diffusion_weighted_loss(model, clean, selected, weight, MASK_ID, 4, False)
    assert float(full) > float(zero)  # the [MASK] logit takes probability from every target
    with torch.no_grad():  # what it is: the same pass's logits, [MASK] kept in the normaliser
        from unmask.likelihood.block import block_masked_log_probs

        kept = block_masked_log_probs(model, clean, selected, MASK_ID, 4, zero_masking=False)
        dropped = block_masked_log_probs(model, clean, selected, MASK_ID, 4)
    assert bool((kept < dropped).all())


@pytest.mark.parametrize(("flag", "same"), [("--zero_masking=True", True), ("--zero_masking=False", False)])
def test_block_diffusion_honours_zero_masking(flag: str, same: bool, tiny_data: Path, tmp_path: Path) -> None:
    """True is the default (the run of before, bit for bit); False trains another model. val_bpc drops [MASK]
    either way, so the runs differ only through training."""
    bd = ["--objective=block_diffusion", "--diffusion_block=4"]
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "default", max_iters=4), *bd]) == 0
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "flag", max_iters=4), *bd, flag]) == 0
    default, given = ([r["train_loss_step"] for r in run_records(tmp_path / d, "train")] for d in ("default", "flag"))
    assert (default == given) is same
    at_0 = run_records(tmp_path / "default", "eval")[0], run_records(tmp_path / "flag", "eval")[0]
    assert at_0[0]["val_bpc"] == at_0[1]["val_bpc"]  # the same init, scored without [MASK] in both
