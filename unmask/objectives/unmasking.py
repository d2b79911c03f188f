"""The `unmasking` objective (the original framework's): stage-curriculum corruption, loss = mean cross-entropy
over the selected positions (optionally label-smoothed over the real characters). Not a likelihood.

The stage curriculum (`unmask.curriculum.plateau.Curriculum`) steers the loop through `CurriculumHooks`: which
stages a training batch mixes, the learning-rate window of the current stage, and when training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.curriculum.batches import Batch, SelectionPool
from unmask.curriculum.plateau import Curriculum, CurriculumState
from unmask.errors import UserError
from unmask.likelihood.self_condition import draw_self_condition, first_pass_input
from unmask.objectives.base import DiffusionModel, RunInputs, TrainingHooks


def _model_kwargs(model: torch.nn.Module, batch: Batch, self_cond_mask_id: int | None) -> dict[str, Tensor]:
    """The trained pass's self-condition input, when the batch self-conditions (`self_cond_mask_id` not None)."""
    if self_cond_mask_id is None:
        return {}
    return {"self_cond": first_pass_input(model, batch.x, batch.selected, self_cond_mask_id)}  # (B, T, V)


def unmasking_loss(model: torch.nn.Module, batch: Batch, self_cond_mask_id: int | None = None) -> Tensor:
    """Mean cross-entropy over the selected positions (the original framework's unmasking loss). With
    `self_cond_mask_id` (the [MASK] id) the trained pass takes a first no-grad pass's prediction."""
    logits = model(batch.x, positions=batch.selected, **_model_kwargs(model, batch, self_cond_mask_id))  # (N, V)
    return F.cross_entropy(logits.float(), batch.y[batch.selected])


def label_smoothed_cross_entropy(logits: Tensor, targets: Tensor, eps: float, n_chars: int) -> Tensor:
    """Mean cross-entropy against label-smoothed targets (Szegedy et al. 2016, "Rethinking the Inception
    Architecture", §7; Müller et al. 2019, "When Does Label Smoothing Help?").

    logits (N, V) over the full vocabulary, targets (N,) real-character ids. The target distribution is
    q = (1 - eps) * onehot(target) + eps / n_chars on every real character (ids < n_chars) and 0 on the special
    tokens (ids >= n_chars, i.e. [MASK]); loss = -sum_v q_v log p_v with p the softmax over all V entries.
    `F.cross_entropy(label_smoothing=eps)` would spread eps over [MASK] too, teaching the model to predict a token
    that never is an answer, hence this function.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    uniform = -logp[:, :n_chars].mean(dim=1)  # (N,): cross-entropy against the uniform distribution on characters
    return ((1.0 - eps) * nll + eps * uniform).mean()


def smoothed_unmasking_loss(
    model: torch.nn.Module, batch: Batch, eps: float, n_chars: int, self_cond_mask_id: int | None = None
) -> Tensor:
    """`unmasking_loss` with label smoothing `eps` over the `n_chars` real characters (training only)."""
    logits = model(batch.x, positions=batch.selected, **_model_kwargs(model, batch, self_cond_mask_id))  # (N, V)
    return label_smoothed_cross_entropy(logits, batch.y[batch.selected], eps, n_chars)


@dataclass
class UnmaskingBatch:
    """A stage-masked micro-batch, the label smoothing its loss takes (0 for an evaluation's batches), and whether
    it self-conditions (`unmask.objectives.self_condition`)."""

    stages: Batch
    label_smoothing: float
    self_condition: bool = False


class CurriculumHooks(TrainingHooks):
    """The stage curriculum steering the loop: a stage ends by its duration or by a stale validation loss, its
    lr factor and window shape the learning rate, and the final stage's end ends training."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum

    def before_step(self, iter_num: int, epochs: float) -> str | None:
        return self.curriculum.advance_by_duration(iter_num, epochs)

    def finished(self, iter_num: int, epochs: float) -> bool:
        return self.curriculum.finished(iter_num, epochs)

    def after_eval(self, metrics: dict[str, Any], iter_num: int, epochs: float) -> None:
        metrics["decision"] = self.curriculum.update(metrics["val_loss"], iter_num, epochs)
        state = self.curriculum.state
        metrics |= {
            "stage": state.stage,
            "stale_count": state.stale_count,
            "best_stage_val_loss": state.best_stage_val_loss,
        }

    def lr_window(self) -> tuple[int, int | None, float]:
        c = self.curriculum
        return c.state.stage_start_iter, c.stage_end_iter(), c.current.lr_factor

    def log_fields(self) -> dict[str, Any]:
        return {"stage": self.curriculum.state.stage}

    def end_lines(self, iter_num: int, epochs: float) -> list[str]:
        stage = self.curriculum.state.stage
        return [
            f"Final stage {stage} ({self.curriculum.current.type}) has lasted its duration: training ends at "
            f"iteration {iter_num} ({epochs:.3f} epochs)"
        ]


class Unmasking(DiffusionModel[UnmaskingBatch]):
    """The stage curriculum: training batches mix stages 0..current; the validation loss advances the stage."""

    params = ("unmasking_stages", "validation_stages", "use_all_stages_for_training", "label_smoothing")
    zero_masking_applies = False

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg = self.cfg
        self.curriculum = Curriculum(
            cfg.stages,
            cfg.use_all_stages_for_training,
            duration_scale=cfg.stage_duration_scale,
            iters_per_epoch=self.train_size / inputs.chars_per_iter,
        )
        self.hooks = CurriculumHooks(self.curriculum)
        # Stage selections are pre-drawn from the run's masking stream, 256+ rows at a time.
        rows = max(256, 4 * cfg.batch_size)
        self.pool = SelectionPool(cfg.stages, cfg.block_size, inputs.mask_gen, rows)

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> UnmaskingBatch:
        cfg, vocab = self.cfg, self.vocab
        counts = self.curriculum.training_mix(cfg.batch_size)
        pool = self.pool if training else None
        stages = self.train_source.batch(counts, cfg.stages, vocab.mask_id, vocab.n_chars, data_gen, mask_gen, pool)
        self_condition = draw_self_condition(cfg.self_conditioning, mask_gen, training)
        return UnmaskingBatch(stages, cfg.label_smoothing if training else 0.0, self_condition)

    def loss(self, model: torch.nn.Module, batch: UnmaskingBatch) -> Tensor:
        sc_id = self.vocab.mask_id if batch.self_condition else None
        if batch.label_smoothing:
            return smoothed_unmasking_loss(model, batch.stages, batch.label_smoothing, self.vocab.n_chars, sc_id)
        return unmasking_loss(model, batch.stages, sc_id)

    def start_lines(self, resumed_at: int | None) -> list[str]:
        lines = super().start_lines(resumed_at)
        for i, stage in enumerate(self.cfg.stages):
            lines.append(f"  Stage {i} ({stage.type}): {stage.params()}, {self.curriculum.describe_duration(i)}")
        if resumed_at:
            lines.append(f"Resumed at iteration {resumed_at}, stage {self.curriculum.state.stage}")
        return lines

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        cur, state = self.curriculum.current, self.curriculum.state
        progress = self.curriculum.progress(m["iter"], m["epochs"])
        stage_line = f"Stage {state.stage} ({cur.type}): {cur.params()}, stale_count={state.stale_count}"
        return [stage_line + (f", {progress}" if progress else ""), *super().report_lines(m)]

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state.to_dict()}

    def rank_state(self) -> dict[str, Any]:
        return {"pool": self.pool.state()}  # the pre-drawn selections not used yet belong to the mask stream

    def load_state(
        self, ckpt: dict[str, Any], rank_rng: dict[str, Any], iter_num: int, epochs: float, path: Path
    ) -> None:
        if "curriculum" in ckpt:
            self.curriculum.state = CurriculumState.from_dict(ckpt["curriculum"], iter_num, epochs)
        if self.curriculum.state.stage >= len(self.cfg.stages):
            raise UserError(
                f"{path}: checkpoint is at stage {self.curriculum.state.stage} but only "
                f"{len(self.cfg.stages)} --unmasking_stages are configured"
            )
        if "pool" in rank_rng:
            # (Checkpoints written before the pool was saved were written right after a flush: empty pool.)
            self.pool.load_state(rank_rng["pool"])
