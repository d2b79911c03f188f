"""Training objectives: one small class per objective, and every training loss.

An objective owns what differs between kinds of training: which data a micro-batch is made of and its loss
(`loss`), what an evaluation measures (`validate`), its console block (`start_lines`, `report_lines`), its
checkpointed state (`state_dict`, `rank_state`, `load_state`) and, for the unmasking objective, the stage
curriculum that decides the learning-rate window and when training ends. The trainer (`unmask.training.trainer`) keeps
the model, optimizer, loop, learning rate, DDP, signals and checkpoints, and calls these methods without knowing which
objective it runs. Adding an objective is one subclass of `Objective` plus `@register("name")`.

Language-model objectives here:
- `unmasking` (the original framework's): stage-curriculum corruption, loss = mean cross-entropy over the selected
  positions. Not a likelihood.
- `mdlm`: the continuous-time negative ELBO of masked diffusion with the linear schedule (Sahoo et al. 2024, MDLM;
  Shi et al. 2024, MD4).
- `autoregressive`: causal attention and next-character targets on windows of block_size + 1 characters: the
  nanoGPT baseline, trained and scored by the same code.
The two binary tasks of transfer learning register from `unmask.transfer.tasks`.

Every language-model objective reports `val_bpc` at each evaluation: the ELBO for diffusion models, the exact NLL
for the autoregressive one, so objectives and curricula are compared on one number.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.config.train_config import TrainConfig
from unmask.curriculum.batches import Batch, BatchSource, SelectionPool
from unmask.curriculum.masking import random_k_subsets
from unmask.curriculum.plateau import Curriculum, CurriculumState
from unmask.data.dataset import Dataset, Vocab, check_split_length, load_dataset
from unmask.errors import UserError
from unmask.likelihood.block import block_diffusion_loss
from unmask.likelihood.elbo import real_char_log_probs
from unmask.likelihood.estimators import bernoulli_masks, count_from_uniform, systematic_uniforms
from unmask.runtime import Runtime
from unmask.training import validation

if TYPE_CHECKING:
    from unmask.model import Transformer
    from unmask.transfer.pretrained import Pretrained

# --- losses -------------------------------------------------------------------------------------------------------


def unmasking_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy over the selected positions (the original framework's unmasking loss)."""
    logits = model(batch.x, positions=batch.selected)  # (N, V)
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


def smoothed_unmasking_loss(model: torch.nn.Module, batch: Batch, eps: float, n_chars: int) -> Tensor:
    """`unmasking_loss` with label smoothing `eps` over the `n_chars` real characters (training only)."""
    logits = model(batch.x, positions=batch.selected)  # (N, V)
    return label_smoothed_cross_entropy(logits, batch.y[batch.selected], eps, n_chars)


def autoregressive_loss(model: torch.nn.Module, windows: Tensor, mask_id: int | None = None) -> Tensor:
    """Mean next-character cross-entropy: windows (B, T + 1) -> inputs [:, :-1], targets [:, 1:].

    With `mask_id` the [MASK] logit is dropped from the softmax (zero-masking): [MASK] is never a target.
    """
    logits = model(windows[:, :-1])  # (B, T, V)
    return _cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), mask_id)


def _cross_entropy(logits: Tensor, targets: Tensor, mask_id: int | None, reduction: str = "mean") -> Tensor:
    """CE of logits (N, V); with `mask_id`, over the real characters only (MDLM's zero-masking, the SUBS
    parameterisation of Sahoo et al. 2024: the [MASK] logit is -inf, so no probability is spent on it)."""
    if mask_id is None:
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    logp = real_char_log_probs(logits, mask_id)  # (N, V)
    return F.nll_loss(logp, targets, reduction=reduction)


def sample_mdlm_batch(
    x: Tensor, mask_id: int, generator: torch.Generator, eps: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_masked (B, L), selected (B, L) bool, t (B,) float32) for the MDLM training loss.

    t_b = eps + (1 - eps) ((u + b / B) mod 1) with one u ~ U[0, 1) per batch: every t_b is uniform on [eps, 1)
    and the batch puts exactly one t in each of B equal strata (the low-discrepancy "antithetic" sampling of
    MDLM and MD4). Then each position is masked with probability p_mask = t_b.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, L), got {tuple(x.shape)}")
    B, L = x.shape
    t = eps + (1.0 - eps) * systematic_uniforms(B, generator)  # (B,)
    p_mask = t
    selected = bernoulli_masks(p_mask[:, None], (B, L), generator, torch.float32)  # (B, L)
    return x.masked_fill(selected, mask_id), selected, t


def sample_exact_k_batch(x: Tensor, mask_id: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_masked (B, L), selected (B, L) bool, k (B,) long) for the exact-k MDLM training loss.

    k_b = 1 + floor(L ((u + b / B) mod 1)) with one u ~ U[0, 1) per batch: every k_b is uniform on {1..L} and the
    batch is stratified over k as `sample_mdlm_batch` stratifies t; then a uniform k_b-subset of row b is masked.
    """
    B, L = x.shape
    k = count_from_uniform(systematic_uniforms(B, generator), L)  # (B,)
    selected = random_k_subsets(k, (B, L), generator)  # (B, L)
    return x.masked_fill(selected, mask_id), selected, k


MDLM_ESTIMATORS = ("antithetic_t", "exact_k")


def mdlm_loss(
    model: torch.nn.Module,
    x: Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    estimator: str = "antithetic_t",
    zero_masking: bool = False,
) -> Tensor:
    """MDLM objective (scalar): mean over the batch of the weighted masked CE, divided by L (nats per character).

    `antithetic_t`: t stratified over the batch on [eps, 1), Bernoulli(t) masks, weight 1/t; its expectation is
    (1 / (1 - eps)) int_eps^1 (1/t) E[f | t] dt / L, i.e. NELBO / L up to O(eps) (MDLM trains with eps = 1e-3 to
    keep the 1/t weight bounded). `exact_k`: k uniform in 1..L, a uniform k-subset masked, weight L/k: the same
    NELBO / L exactly, with t integrated out (Rao-Blackwellised, so its variance is never larger;
    `unmask.likelihood.elbo` derives both). `zero_masking` drops the [MASK] logit from the softmax.
    """
    if estimator not in MDLM_ESTIMATORS:
        raise ValueError(f"unknown MDLM estimator {estimator!r}; expected one of {', '.join(MDLM_ESTIMATORS)}")
    B, L = x.shape
    if estimator == "exact_k":
        x_masked, selected, k = sample_exact_k_batch(x, mask_id, generator)
        weight = L / k.to(torch.float32)  # (B,)
    else:
        x_masked, selected, t = sample_mdlm_batch(x, mask_id, generator, eps)
        weight = 1.0 / t  # (B,): 1/t = -alpha'_t / (1 - alpha_t)
    logits = model(x_masked, positions=selected)  # (N, V)
    ce = _cross_entropy(logits, x[selected], mask_id if zero_masking else None, reduction="none")  # (N,)
    row = torch.arange(B, device=x.device)[:, None].expand_as(selected)[selected]  # (N,)
    return (ce * weight[row]).sum() / (B * L)


# --- the objective interface ----------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What an objective is built from: the config, where it runs, and what the run starts from."""

    cfg: TrainConfig
    runtime: Runtime
    mask_gen: torch.Generator  # the run's masking stream (on the training device)
    checkpoint: dict[str, Any] | None = None  # a checkpoint being resumed
    pretrained: Pretrained | None = None  # weights a new (transfer) run starts from

    @property
    def chars_per_iter(self) -> int:
        """Characters of training text one optimizer step consumes, over all ranks: epochs = seen / available."""
        c = self.cfg
        return c.batch_size * c.block_size * c.gradient_accumulation_steps * self.runtime.world_size


class Objective:
    """What one kind of training trains on, measures and reports. Subclasses set `vocab` and `train_size` in
    `__init__` and implement `loss` and `validate`; every other hook has a neutral default."""

    name: ClassVar[str]
    show_parameter_summary: ClassVar[bool] = False  # print total / trainable / frozen parameters at the start
    vocab: Vocab
    train_size: int  # units of one epoch (training characters, or texts for the sequence task)

    def __init__(self, inputs: RunInputs) -> None:
        self.cfg, self.rt = inputs.cfg, inputs.runtime
        self.pretrained = inputs.pretrained

    # --- model ----------------------------------------------------------------------------------------------------

    def model_fields(self) -> dict[str, Any]:
        """Extra `ModelConfig` fields of this objective's network (e.g. causal attention, a binary head)."""
        return {}

    def prepare_model(self, model: Transformer) -> list[str]:
        """After the model is built, before the optimizer: start from pretrained weights, freeze. Returns lines to
        print. A language model from pretrained weights keeps their vocabulary and copies every weight (unless
        --transfer_learning_mode=from_scratch)."""
        if self.pretrained is None:
            return []
        from unmask.transfer import pretrained as transfer

        return transfer.start_language_model(model, self.cfg, self.pretrained, self.vocab)

    # --- training and evaluation ------------------------------------------------------------------------------------

    def loss(
        self, model: torch.nn.Module, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[Tensor, float]:
        """One micro-batch: (loss, seconds spent making the batch). `training=False` for the fresh train batches
        of an evaluation (no label smoothing, no pre-drawn selections)."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics on the fixed validation data (model in eval mode, gradients off); must include `val_loss`."""
        raise NotImplementedError

    def epochs(self, iter_num: int, chars_seen: int) -> float:
        """Passes over the training data."""
        return chars_seen / self.train_size

    # --- curriculum hooks (only the unmasking objective has one) ---------------------------------------------------

    def before_step(self, iter_num: int, epochs: float) -> str | None:
        """Before every iteration; a line to print, if any."""
        return None

    def finished(self, iter_num: int, epochs: float) -> bool:
        """Whether training ends before max_iters."""
        return False

    def after_eval(self, metrics: dict[str, Any], iter_num: int, epochs: float) -> None:
        """React to an evaluation's metrics (in place: decisions and state go into the record)."""

    def lr_window(self) -> tuple[int, int | None, float]:
        """(stage start iteration, stage end iteration or None, lr factor) for `unmask.training.schedule.lr_at`."""
        return 0, None, 1.0

    def log_fields(self) -> dict[str, Any]:
        """Extra fields of every training log record."""
        return {}

    def end_lines(self, iter_num: int, epochs: float) -> list[str]:
        """Lines printed when training ends before max_iters."""
        return []

    # --- console --------------------------------------------------------------------------------------------------

    def start_lines(self, resumed_at: int | None) -> list[str]:
        """The objective's block of the run banner."""
        return []

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        """The objective's block after "step N: train loss ..., val loss ..., lr ..."."""
        return []

    # --- checkpointed state -----------------------------------------------------------------------------------------

    def task_record(self, head: str) -> dict[str, Any]:
        """What the model was trained for, recorded in checkpoints and sidecars (read by `unmask.storage.loading`)."""
        return {"head": head, "objective": self.cfg.objective}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint keys owned by the objective (shared by all ranks)."""
        return {}

    def rank_state(self) -> dict[str, Any]:
        """Per-rank state stored next to the rank's generators (`rng[rank]`)."""
        return {}

    def load_state(
        self, ckpt: dict[str, Any], rank_rng: dict[str, Any], iter_num: int, epochs: float, path: Path
    ) -> None:
        """Restore what `state_dict` and `rank_state` saved."""


OBJECTIVE_CLASSES: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an objective available under `name`."""

    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVE_CLASSES[name] = cls
        return cls

    return add


def objective_name(cfg: TrainConfig) -> str:
    """The registered objective a config trains: a binary task with --switch_to_binary, else --objective."""
    return f"binary_{cfg.binary_task}" if cfg.switch_to_binary else cfg.objective


# Modules that register more objectives when imported, looked up only when a run asks for one of theirs (so
# the optional transfer-learning package is never imported by a language-model run).
PLUGIN_MODULES = {"binary_replaced_token": "unmask.transfer.tasks", "binary_sequence": "unmask.transfer.tasks"}


def build_objective(inputs: RunInputs) -> Objective:
    name = objective_name(inputs.cfg)
    if name not in OBJECTIVE_CLASSES and name in PLUGIN_MODULES:
        importlib.import_module(PLUGIN_MODULES[name])
    if name not in OBJECTIVE_CLASSES:
        raise UserError(f"--objective={name}: expected one of {', '.join(OBJECTIVE_CLASSES)}")
    return OBJECTIVE_CLASSES[name](inputs)


# --- language-model objectives ---------------------------------------------------------------------------------------


class LanguageModel(Objective):
    """Objectives trained on windows of the dataset's text, with the dataset's vocabulary."""

    causal: ClassVar[bool] = False

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg = self.cfg
        self.data: Dataset = load_dataset(Path(cfg.data_dir) / cfg.dataset)
        for split in ("train", "val"):
            check_split_length(self.data, split, cfg.block_size)
        self.vocab = self.data.vocab
        self.train_size = len(self.data.train)
        self.paragraphs = self.data.paragraphs if cfg.use_paragraph_boundaries else {"train": None, "val": None}
        self.window = cfg.block_size + 1 if self.causal else cfg.block_size
        self.train_source = BatchSource(self.data.train, self.window, self.rt.device, self.paragraphs["train"])

    def model_fields(self) -> dict[str, Any]:
        return {"causal": self.causal}

    def clean_batch(self, data_gen: torch.Generator) -> tuple[Tensor, float]:
        """batch_size clean training windows (B, window) on the device, and the seconds it took to make them."""
        t0 = time.perf_counter()
        windows = self.train_source.clean(self.cfg.batch_size, data_gen)
        return windows, time.perf_counter() - t0

    def fixed_val_windows(self) -> Tensor:
        """eval_iters x batch_size clean validation windows of the objective's length, the same at every
        evaluation and in every run (seed 42)."""
        cfg = self.cfg
        count = cfg.eval_iters * cfg.batch_size
        return validation.fixed_windows(self.data.val, self.paragraphs["val"], self.window, count, self.rt.device)

    def windows_note(self) -> str:
        """Which windows val_bpc scores, and how `unmask eval` reproduces it."""
        where = "at paragraph starts" if self.paragraphs["val"] is not None else "at uniform offsets"
        return (
            f"{where}: val_bpc scores these (`unmask eval --windows=validation_set`); `unmask eval` scores every "
            "window of the split by default"
        )

    def start_lines(self, resumed_at: int | None) -> list[str]:
        cfg = self.cfg
        return [
            f"dataset {cfg.dataset}: {len(self.data.train):,} train / {len(self.data.val):,} val characters",
            f"objective {cfg.objective}: {'causal' if self.causal else 'bidirectional'} attention",
        ]


class DiffusionModel(LanguageModel):
    """Bidirectional objectives scored on the fixed, stage-masked validation set and by the ELBO."""

    @property
    def zero_masking(self) -> bool:
        """Whether training drops the [MASK] logit (then validation CE does too); the unmasking objective keeps
        the original framework's full softmax."""
        return self.cfg.zero_masking and self.name != "unmasking"

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg = self.cfg
        self.val_set = validation.build_validation_set(
            self.data.val,
            self.paragraphs["val"],
            cfg.stages_for_validation,
            cfg.eval_iters * cfg.batch_size,
            cfg.block_size,
            self.vocab.mask_id,
            self.vocab.n_chars,
            self.rt.device,
        )

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg, mask_id, rt = self.cfg, self.vocab.mask_id, self.rt
        n_stages = len(cfg.stages_for_validation)
        drop = mask_id if self.zero_masking else None  # a zero-masked model is scored without the [MASK] logit
        metrics = validation.evaluate_batches(
            model, self.val_set, cfg.batch_size, n_stages, self.vocab.n_chars, rt, drop
        )
        clean = self.val_set.y
        metrics |= validation.diffusion_val_bpc(model, clean, mask_id, cfg.elbo_draws, cfg.batch_size, rt)
        return metrics | validation.mask_rate_ce(model, clean, mask_id, cfg.batch_size, rt, drop)

    def start_lines(self, resumed_at: int | None) -> list[str]:
        n = len(self.cfg.stages_for_validation)
        return [
            *super().start_lines(resumed_at),
            f"Validation set: {len(self.val_set)} samples from all {n} validation stages (seed 42), "
            f"{self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        buckets = ", ".join(
            f"{k.removeprefix('val_ce_mask_')}% {v:.3f}" for k, v in m.items() if k.startswith("val_ce_mask_")
        )
        lines = [
            f"  val bpc: {m['val_bpc']:.4f} (ELBO), epochs {m['epochs']:.3f}",
            f"  val model vs random: {m['val_model_vs_random']:.2f}x better",
            f"  val accuracy: {m['val_avg_correct_prob']:.4f} (random baseline: {1 / self.vocab.n_chars:.4f})",
            f"  Most likely guess correct P %: {m['val_most_likely_accuracy']:.1f}%",
            f"  val masked token ratio: {m['val_masked_token_ratio']:.3f} "
            f"(min {m['val_masked_token_ratio_min']:.3f}, max {m['val_masked_token_ratio_max']:.3f})",
            f"  masked CE by mask rate: {buckets}",
            "Per-stage validation losses:",
        ]
        for i, stage in enumerate(self.cfg.stages_for_validation):
            lines.append(
                f"  Stage {i} ({stage.type}): {m[f'val_stage_{i}_loss']:.4f} "
                f"({m[f'val_stage_{i}_samples']} samples) - {stage.ratio_label()}"
            )
        return lines


@register("unmasking")
class Unmasking(DiffusionModel):
    """The stage curriculum: training batches mix stages 0..current; the validation loss advances the stage."""

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg = self.cfg
        self.curriculum = Curriculum(
            cfg.stages,
            cfg.use_all_stages_for_training,
            duration_scale=cfg.stage_duration_scale,
            iters_per_epoch=self.train_size / inputs.chars_per_iter,
        )
        # Stage selections are pre-drawn from the run's masking stream, 256+ rows at a time.
        rows = max(256, 4 * cfg.batch_size)
        self.pool = SelectionPool(cfg.stages, cfg.block_size, inputs.mask_gen, rows)

    def loss(
        self, model: torch.nn.Module, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[Tensor, float]:
        cfg, vocab = self.cfg, self.vocab
        t0 = time.perf_counter()
        counts = self.curriculum.training_mix(cfg.batch_size)
        pool = self.pool if training else None
        batch = self.train_source.batch(counts, cfg.stages, vocab.mask_id, vocab.n_chars, data_gen, mask_gen, pool)
        seconds = time.perf_counter() - t0
        with self.rt.autocast():
            if training and cfg.label_smoothing:
                return smoothed_unmasking_loss(model, batch, cfg.label_smoothing, vocab.n_chars), seconds
            return unmasking_loss(model, batch), seconds

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


@register("mdlm")
class MDLM(DiffusionModel):
    """The continuous-time masked-diffusion ELBO on clean windows (`mdlm_loss`)."""

    def loss(
        self, model: torch.nn.Module, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[Tensor, float]:
        windows, seconds = self.clean_batch(data_gen)
        cfg = self.cfg
        with self.rt.autocast():
            loss = mdlm_loss(
                model,
                windows,
                self.vocab.mask_id,
                mask_gen,
                estimator=cfg.training_estimator,
                zero_masking=cfg.zero_masking,
            )
        return loss, seconds


@register("autoregressive")
class Autoregressive(LanguageModel):
    """Causal attention, next-character cross-entropy on windows of block_size + 1; scored by exact NLL."""

    causal = True

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.val_windows = self.fixed_val_windows()  # block_size + 1 characters, scored by exact NLL

    def loss(
        self, model: torch.nn.Module, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[Tensor, float]:
        windows, seconds = self.clean_batch(data_gen)
        with self.rt.autocast():
            return autoregressive_loss(model, windows, self.vocab.mask_id if self.cfg.zero_masking else None), seconds

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        return validation.autoregressive_val(
            model, self.val_windows, self.vocab.mask_id, cfg.batch_size, self.rt, cfg.zero_masking
        )

    def start_lines(self, resumed_at: int | None) -> list[str]:
        n, width = len(self.val_windows), self.cfg.block_size + 1
        return [
            *super().start_lines(resumed_at),
            f"Validation set: {n} windows of {width} characters (seed 42), {self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        return [f"  val bpc: {m['val_bpc']:.4f} (exact NLL), epochs {m['epochs']:.3f}"]


@register("block_diffusion")
class BlockDiffusion(LanguageModel):
    """Masked diffusion inside blocks of K characters, autoregressive across blocks (`unmask.likelihood.block`):
    one forward pass over [noisy ; clean] per micro-batch; validated by the block negative ELBO."""

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.val_windows = self.fixed_val_windows()  # scored by the block NELBO

    def model_fields(self) -> dict[str, Any]:
        return {"causal": False, "diffusion_block": self.cfg.diffusion_block}

    def loss(
        self, model: torch.nn.Module, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool
    ) -> tuple[Tensor, float]:
        cfg = self.cfg
        windows, seconds = self.clean_batch(data_gen)
        # Evaluations' fresh batches integrate over the full (0, 1], like val_bpc, whatever the training window.
        window = cfg.mask_rate_window if training else (0.0, 1.0)
        with self.rt.autocast():
            K, estimator = cfg.diffusion_block, cfg.training_estimator
            loss = block_diffusion_loss(model, windows, self.vocab.mask_id, K, mask_gen, window, estimator)
        return loss, seconds

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        metrics = validation.block_diffusion_val_bpc(
            model, self.val_windows, self.vocab.mask_id, cfg.diffusion_block, cfg.elbo_draws, cfg.batch_size, self.rt
        )
        return {"val_loss": metrics["val_nats_per_char"], **metrics}

    def start_lines(self, resumed_at: int | None) -> list[str]:
        cfg = self.cfg
        return [
            *super().start_lines(resumed_at),
            f"block diffusion: blocks of {cfg.diffusion_block} characters, training estimator "
            f"{cfg.training_estimator}"
            + (
                f", mask rate t ~ U({cfg.mask_rate_window[0]}, {cfg.mask_rate_window[1]}]"
                if cfg.training_estimator == "antithetic_t"
                else ""
            ),
            f"Validation set: {len(self.val_windows)} windows of {cfg.block_size} characters (seed 42), "
            f"{self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        return [f"  val bpc: {m['val_bpc']:.4f} (block ELBO, K={self.cfg.diffusion_block}), epochs {m['epochs']:.3f}"]
