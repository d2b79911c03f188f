"""The parameter guide's recipe knobs: stage durations, masking-rate ranges, lr factors and restarts, label
smoothing, the two guide presets, and exact resume across an epoch-based stage change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_records, tiny_flags
from unmask.cli import main
from unmask.commands.train import build_train_run
from unmask.config.train_config import TrainConfig
from unmask.curriculum.plateau import Curriculum, CurriculumState
from unmask.curriculum.stages import RandomStage, SpanStage, parse_stage, parse_stages
from unmask.errors import UserError
from unmask.objectives.unmasking import label_smoothed_cross_entropy
from unmask.training.schedule import lr_at

TINY_TRAIN_CHARS = 31340  # train split of the `tiny_data` corpus
TINY_CHARS_PER_ITER = 4 * 32  # tiny_flags: batch 4 x block 32


def _records(out: Path, kind: str) -> list[dict]:
    return run_records(out, kind)


# --- stage keys ------------------------------------------------------------------------------------------------


def test_stage_durations_and_lr_factor_parse() -> None:
    stage = parse_stage({"type": "random", "masking_rate_range": [0.05, 0.2], "epochs": 75, "lr_factor": 0.5}, "s")
    assert stage == RandomStage(masking_rate_range=(0.05, 0.2), epochs=75.0, lr_factor=0.5, val_loss_stale_count=None)
    assert stage.bounds == (0.05, 0.2) and stage.params() == "ratio~U(0.05, 0.2)"
    both = parse_stage({"type": "span", "spans_count": 3, "iters": 10, "val_loss_stale_count": 2}, "s")
    assert (both.iters, both.val_loss_stale_count, both.lr_factor) == (10, 2, 1.0)
    plain = parse_stage({"type": "sticky", "target_masked_ratio": 0.2, "p1_probability": 0.3, "p2_probability": 0}, "s")
    assert plain.val_loss_stale_count == 5 and plain.epochs is None and plain.iters is None
    assert RandomStage(max_masked_ratio=0.3).bounds == (0.0, 0.3)
    for s in (stage, both, plain):
        assert parse_stage(json.loads(json.dumps(s.to_dict())), "again") == s  # the checkpoint's JSON round trip


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"type": "random", "max_masked_ratio": 0.2, "masking_rate_range": [0, 0.1]}, "either 'max_masked_ratio' or"),
        ({"type": "random", "masking_rate_range": [0.3, 0.1]}, r"masking_rate_range=\[0.3, 0.1\] needs 0 <= lo <= hi"),
        ({"type": "random", "masking_rate_range": [0.1, 1.5]}, "needs 0 <= lo <= hi <= 1"),
        ({"type": "random", "masking_rate_range": 0.2}, "must be a pair"),
        ({"type": "span", "spans_count": 2, "epochs": 0}, "epochs=0 must be > 0"),
        ({"type": "span", "spans_count": 2, "iters": 2.5}, "iters must be an integer"),
        ({"type": "span", "spans_count": 2, "lr_factor": -1}, "lr_factor=-1 must be > 0"),
        ({"type": "span", "spans_count": 2, "epochs": "many"}, "epochs must be a number"),
    ],
)
def test_stage_key_errors_name_the_stage(stage: dict, message: str) -> None:
    with pytest.raises(UserError, match=r"unmasking_stages\[1\]: .*" + message) as exc:
        parse_stages([{"type": "span", "spans_count": 1}, stage], "unmasking_stages")
    assert "\n" not in str(exc.value)


def test_masking_rate_range_is_respected_statistically() -> None:
    gen = torch.Generator().manual_seed(0)
    lo, hi, T, rows = 0.2, 0.4, 512, 4000
    ratios = RandomStage(masking_rate_range=(lo, hi)).select(rows, T, gen).float().mean(dim=1)  # (rows,)
    # Per row: ratio r ~ U(lo, hi), then Binomial(T, r) / T; 5 binomial standard deviations never fail here.
    slack = 5 * math.sqrt(hi * (1 - hi) / T)
    assert ratios.min() >= lo - slack and ratios.max() <= hi + slack
    assert abs(float(ratios.mean()) - (lo + hi) / 2) < 0.005
    # Uniform, not concentrated: quarter of the rows in each quarter of the range (within sampling error).
    quarters = torch.histc(ratios.clamp(lo, hi), bins=4, min=lo, max=hi) / rows
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.04), quarters


# --- curriculum durations --------------------------------------------------------------------------------------

DURATION_STAGES = (
    SpanStage(spans_count=2, iters=5, val_loss_stale_count=None),
    SpanStage(spans_count=3, epochs=0.5, val_loss_stale_count=None, lr_factor=0.5),
    SpanStage(spans_count=4, iters=3, val_loss_stale_count=2),
)


def test_stage_changes_by_iterations_and_epochs_land_exactly() -> None:
    per_epoch = 8.0  # iterations per epoch: epochs = iteration / 8
    c = Curriculum(DURATION_STAGES, iters_per_epoch=per_epoch)
    changes = []
    for it in range(40):
        if c.finished(it, it / per_epoch):
            break
        if c.advance_by_duration(it, it / per_epoch):
            changes.append(it)
    assert changes == [5, 9]  # 5 iterations, then 0.5 epochs = 4 iterations
    assert it == 12 and c.state.stage == 2  # the final stage lasts 3 iterations, then training ends
    assert c.state.stage_start_iter == 9 and c.state.stage_start_epochs == 9 / 8
    assert [c.stage_length(i) for i in range(3)] == [5, 4, 3]


def test_duration_scale_multiplies_epochs_and_iters() -> None:
    c = Curriculum(DURATION_STAGES, duration_scale=0.5, iters_per_epoch=8.0)
    assert (c.stage_iters(0), c.stage_epochs(1), c.stage_length(1), c.stage_iters(2)) == (2, 0.25, 2, 2)
    assert c.describe_duration(1) == "epochs=0.5, lr_factor=0.5 (x0.5: 0.25 epochs, at most 2 iterations)"
    tiny = Curriculum((SpanStage(spans_count=1, iters=3),), duration_scale=0.01)
    assert tiny.stage_iters(0) == 1  # a stage always lasts at least one iteration


def test_epoch_limit_tolerates_binary_fractions() -> None:
    # 0.3 epochs at 10 iterations per epoch is 3 iterations, although 0.3 is not exact in binary.
    c = Curriculum((SpanStage(spans_count=1, epochs=0.3), SpanStage(spans_count=2)), iters_per_epoch=10.0)
    assert c.advance_by_duration(2, 0.2) is None
    assert c.advance_by_duration(3, 3 * 0.1) is not None and c.stage_length(0) == 3


def test_stale_count_or_duration_whichever_first() -> None:
    stages = (
        SpanStage(spans_count=1, iters=100, val_loss_stale_count=1),
        SpanStage(spans_count=2, iters=3, val_loss_stale_count=5),
        SpanStage(spans_count=3, epochs=1.0, val_loss_stale_count=None),  # duration-only: stale counts never end it
    )
    c = Curriculum(stages, iters_per_epoch=10.0)
    c.update(2.0, iteration=0)
    assert "ADVANCING TO STAGE 1" in c.update(2.0, iteration=4, epochs=0.4)  # stale count first
    assert c.state.stage_start_iter == 4 and c.state.stage_start_epochs == 0.4
    c.update(1.0, iteration=6)
    assert c.advance_by_duration(6, 0.6) is None
    assert "after 3 iterations" in (c.advance_by_duration(7, 0.7) or "")  # duration first
    for it in range(8, 14):
        line = c.update(5.0, iteration=it)
    assert c.state.stage == 2 and "ends by its duration" in line
    assert not c.finished(16, 1.69) and c.finished(17, 1.7)


def test_curriculum_state_without_stage_start_resumes_from_checkpoint() -> None:
    old = {"stage": 1, "stale_count": 2, "best_stage_val_loss": 1.5}  # written before stages had durations
    state = CurriculumState.from_dict(old, iteration=12, epochs=0.25)
    assert (state.stage_start_iter, state.stage_start_epochs) == (12, 0.25)
    assert CurriculumState.from_dict(state.to_dict(), iteration=99) == state


# --- learning rate ---------------------------------------------------------------------------------------------


def _cfg(**overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(learning_rate=1.0, warmup_iters=10, max_iters=200, min_lr_ratio=0.1)
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _cos(progress: float, top: float = 1.0, low: float = 0.1) -> float:
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (top - low)


def test_lr_factor_multiplies_warmup_and_cosine() -> None:
    cfg = _cfg()
    assert cfg.final_lr == pytest.approx(0.1)
    assert lr_at(4, cfg, factor=0.5) == pytest.approx(0.5 * 5 / 11)
    assert lr_at(105, cfg, factor=0.8) == pytest.approx(0.8 * _cos(95 / 190))
    assert lr_at(250, cfg, factor=0.6) == pytest.approx(0.06)
    assert lr_at(105, _cfg(decay_lr=False), factor=0.8) == pytest.approx(0.8)


def test_restarts_every_period_after_warmup() -> None:
    cfg = _cfg(lr_schedule="cosine_with_restarts", lr_restart_period=40)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(50, cfg) == pytest.approx(1.0)
    assert lr_at(30, cfg) == pytest.approx(_cos(0.5)) and lr_at(70, cfg) == pytest.approx(_cos(0.5))
    assert lr_at(49, cfg, factor=0.5) == pytest.approx(0.5 * _cos(39 / 40))
    assert lr_at(5, cfg) == pytest.approx(6 / 11)  # warmup once, at the start


def test_restarts_at_stage_changes() -> None:
    cfg = _cfg(lr_schedule="cosine_with_restarts", lr_decay_iters=300)
    # A stage starting at 60 and lasting 40 iterations: one cycle from 60 to 100, then min_lr.
    assert lr_at(60, cfg, 60, 100, 0.8) == pytest.approx(0.8)
    assert lr_at(80, cfg, 60, 100, 0.8) == pytest.approx(0.8 * _cos(0.5))
    assert lr_at(100, cfg, 60, 100, 0.8) == pytest.approx(0.08)
    # A stage without duration decays until lr_decay_iters; one started during warmup begins after it.
    assert lr_at(180, cfg, 60, None) == pytest.approx(_cos(120 / 240))
    assert lr_at(3, cfg, 0, 20) == pytest.approx(4 / 11) and lr_at(15, cfg, 0, 20) == pytest.approx(_cos(0.5))


# --- label smoothing -------------------------------------------------------------------------------------------


def test_label_smoothing_matches_hand_computation_and_skips_specials() -> None:
    n_chars, eps = 3, 0.1  # vocabulary: 3 characters + [MASK] (id 3)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.5, 0.5, 3.0, -2.0]])
    targets = torch.tensor([0, 2])
    logp = torch.log_softmax(logits, dim=-1)
    q = torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3, 0.0], [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3, 0.0]])
    by_hand = float(-(q * logp).sum(dim=1).mean())
    assert label_smoothed_cross_entropy(logits, targets, eps, n_chars) == pytest.approx(by_hand, rel=1e-6)
    assert label_smoothed_cross_entropy(logits, targets, 0.0, n_chars) == pytest.approx(
        float(F.cross_entropy(logits, targets)), rel=1e-6
    )
    # torch's own label smoothing would give [MASK] mass; ours does not, so the loss differs.
    torch_smoothed = float(F.cross_entropy(logits, targets, label_smoothing=eps))
    assert abs(torch_smoothed - by_hand) > 1e-3
    # The gradient of the [MASK] logit is p([MASK]) only: no target mass pulls it up.
    x = logits.clone().requires_grad_(True)
    label_smoothed_cross_entropy(x, targets, eps, n_chars).backward()
    assert x.grad is not None
    assert torch.allclose(x.grad[:, 3], torch.softmax(logits, dim=-1)[:, 3] / 2)


# --- config and presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min_lr=1e-5", "--min_lr_ratio=0.1"], "--min_lr=1e-05 and --min_lr_ratio=0.1: give only one"),
        (["--min_lr_ratio=1.5"], r"--min_lr_ratio=1.5: must be in \[0, 1\]"),
        (["--lr_restart_period=100"], "--lr_restart_period=100 needs --lr_schedule=cosine_with_restarts"),
        (
            ["--lr_schedule=cosine_with_restarts", "--lr_restart_period=-1"],
            r"--lr_restart_period=-1: must be in \[0, 1,000,000,000,000\]",
        ),
        (["--lr_schedule=linear"], "--lr_schedule=linear: expected one of cosine, cosine_with_restarts"),
        (["--label_smoothing=1.0"], r"--label_smoothing=1.0: must be in \[0, 1\)"),
        (["--label_smoothing=0.1", "--objective=mdlm"], "--label_smoothing=0.1 applies to --objective=unmasking"),
        (["--adam_eps=0"], r"--adam_eps=0.0: must be in \(0, 1\]"),
        (["--stage_duration_scale=0"], r"--stage_duration_scale=0.0: must be in \(0, 1e\+06\]"),
    ],
)
def test_new_flags_are_validated(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message) as exc:
        build_train_run(argv)
    assert "\n" not in str(exc.value)


def test_guide_presets_load_and_validate() -> None:
    cur = build_train_run(["guide_current"]).cfg
    rec = build_train_run(["guide_recommended"]).cfg
    assert [s.epochs for s in cur.unmasking_stages] == [50, 100, 150]
    assert [s.epochs for s in rec.unmasking_stages] == [75, 150, 300]
    assert [s.lr_factor for s in cur.unmasking_stages] == [1.0, 0.8, 0.6]
    assert [s.lr_factor for s in rec.unmasking_stages] == [1.0, 0.8, 0.5]
    assert cur.unmasking_stages[2].masking_rate_range == (0.10, 0.30)
    assert rec.unmasking_stages[2].masking_rate_range == (0.05, 0.20)
    for a, b in zip(cur.unmasking_stages[:2], rec.unmasking_stages[:2], strict=True):
        assert a.masking_rate_range == b.masking_rate_range  # the guide gives stage I/II ranges for neither
    for s in (*cur.unmasking_stages, *rec.unmasking_stages):
        assert isinstance(s, RandomStage) and s.val_loss_stale_count is None  # duration-only
    assert (cur.learning_rate, cur.batch_size, cur.gradient_accumulation_steps) == (2e-4, 16, 1)
    assert (rec.learning_rate, rec.batch_size, rec.gradient_accumulation_steps) == (1e-4, 8, 2)
    assert (cur.weight_decay, cur.warmup_iters, cur.label_smoothing) == (0.1, 1000, 0.0)
    assert (rec.weight_decay, rec.warmup_iters, rec.label_smoothing) == (0.01, 1500, 0.1)
    assert cur.final_lr == pytest.approx(2e-5) and rec.final_lr == pytest.approx(5e-6)
    defaults = TrainConfig()
    for cfg in (cur, rec):
        assert (cfg.lr_schedule, cfg.lr_restart_period, cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.grad_clip) == (
            "cosine_with_restarts",
            0,
            0.9,
            0.95,
            1e-8,
            1.0,
        )
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (
            defaults.n_layer,
            defaults.n_head,
            defaults.n_embd,
            defaults.block_size,
        )
        assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


# --- end to end ------------------------------------------------------------------------------------------------

# Stage 0 lasts 0.025 epochs (7 iterations of 128 characters out of 31,340), stage 1 another 0.025 (7 more), so
# the changes fall at iterations 7 and 14: between evaluations (every 4) and on both sides of the resume point 12.
EPOCH_STAGES = (
    '--unmasking_stages=[{"type": "random", "masking_rate_range": [0.1, 0.3], "epochs": 0.025},'
    ' {"type": "random", "max_masked_ratio": 0.5, "epochs": 0.025, "lr_factor": 0.5},'
    ' {"type": "span", "spans_count": 3, "iters": 100, "lr_factor": 0.25}]'
)
RESTARTS = ["--lr_schedule=cosine_with_restarts", "--min_lr_ratio=0.1", "--lr_decay_iters=None", EPOCH_STAGES]


def test_epoch_stage_change_with_restarts_resumes_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *tiny_flags(tiny_data, straight, max_iters=24), *RESTARTS]) == 0
    assert main(["train", *tiny_flags(tiny_data, split, max_iters=12), *RESTARTS]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={split}", "--max_iters=24"]) == 0

    ca = torch.load(straight / "ckpt_unmasking_24.pt", weights_only=True)
    cb = torch.load(split / "ckpt_unmasking_24.pt", weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert ca["curriculum"] == cb["curriculum"] and ca["train_chars_seen"] == cb["train_chars_seen"] == 24 * 128
    assert (ca["curriculum"]["stage"], ca["curriculum"]["stage_start_iter"]) == (2, 14)
    assert _records(straight, "eval") == _records(split, "eval")
    timing = ("ms_per_iter", "ms_per_iter_smoothed", "tokens_per_s", "batch_share")
    a, b = straight, split
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in _records(o, "train")] for o in (a, b)]
    assert untimed[0] == untimed[1]

    train = {r["iter"]: r for r in _records(straight, "train")}  # record at iter i: the step taken at i - 1
    assert [train[i]["stage"] for i in (6, 8, 14, 16)] == [0, 1, 1, 2]
    assert train[8]["epochs"] == pytest.approx(8 * TINY_CHARS_PER_ITER / TINY_TRAIN_CHARS)
    lr, low = 3e-2, 3e-3

    def cos(progress: float) -> float:
        return low + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - low)

    # Stage 0: warmup (2 steps) then a cycle over its 7 iterations; stage 1 restarts at 7 at half the rate,
    # its 0.025 epochs are 7 iterations; stage 2 restarts at 14 at a quarter, cycling over its 100 iterations.
    assert train[2]["lr"] == pytest.approx(lr * 2 / 3)
    assert train[6]["lr"] == pytest.approx(cos(3 / 5))
    assert train[8]["lr"] == pytest.approx(0.5 * lr)
    assert train[14]["lr"] == pytest.approx(0.5 * cos(6 / 7))
    assert train[16]["lr"] == pytest.approx(0.25 * cos(1 / 100))
    evals = {r["iter"]: r for r in _records(straight, "eval")}
    assert evals[16]["lr"] == pytest.approx(0.25 * cos(2 / 100))  # the next step's rate


def test_final_stage_duration_ends_training(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    stages = (
        '--unmasking_stages=[{"type": "span", "spans_count": 2, "iters": 6},'
        ' {"type": "span", "spans_count": 4, "iters": 10, "val_loss_stale_count": 50}]'
    )
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=100), stages, "--stage_duration_scale=0.5"]) == 0
    text = capsys.readouterr().out
    assert "*** ADVANCING TO STAGE 1 (span): spans_count=4 at iteration 3, after 3 iterations ***" in text
    assert "Final stage 1 (span) has lasted its duration: training ends at iteration 8" in text
    assert [r["iter"] for r in _records(out, "eval")] == [0, 4, 8]
    assert (out / "ckpt_unmasking_8.pt").exists()


def test_label_smoothing_applies_to_training_steps_only(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unmask.objectives.unmasking as objectives

    real = objectives.smoothed_unmasking_loss
    grad_modes: list[bool] = []

    def spy(
        model: torch.nn.Module, batch: object, eps: float, n_chars: int, self_cond_mask_id: int | None
    ) -> torch.Tensor:
        grad_modes.append(torch.is_grad_enabled())
        assert eps == 0.1 and n_chars == 39 and self_cond_mask_id is None  # a plain run never self-conditions
        return real(model, batch, eps, n_chars, self_cond_mask_id)  # type: ignore[arg-type]

    monkeypatch.setattr(objectives, "smoothed_unmasking_loss", spy)
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=4), "--label_smoothing=0.1"]) == 0
    assert grad_modes == [True] * 4  # evaluations (train_loss on fresh batches, val_loss) stay plain CE
    assert all(math.isfinite(r["val_loss"]) for r in _records(out, "eval"))
