"""The objective interface, the hooks through which an objective steers the training loop, and the bases of the
language-model objectives.

An objective owns what differs between kinds of training: the micro-batch (`batch`: every random draw, from the
run's data and masking generators) and its loss (`loss`: a pure function of the model and that batch), what an
evaluation measures (`validate`), its console block (`start_lines`, `report_lines`), its checkpointed state
(`state_dict`, `rank_state`, `load_state`) and, through `hooks`, how it steers the loop (the unmasking
objective's stage curriculum decides the learning-rate window and when training ends). The trainer
(`unmask.training.trainer`) keeps the model, optimizer, loop, learning rate, autocast, DDP, signals and checkpoints,
times `batch` and calls `loss` under autocast, without knowing which objective it runs. Adding an objective is one
subclass of `Objective` plus `unmask.objectives.registry.register`.

The objectives, one module each: `unmasking` (the original framework's stage curriculum; not a likelihood), `mdlm`
(the continuous-time masked-diffusion ELBO), `autoregressive` (the nanoGPT baseline), `block_diffusion`
(masked diffusion inside blocks, autoregressive across them). The binary tasks of transfer learning are in
`unmask.transfer.tasks`. Every language-model objective reports `val_bpc` at each evaluation: the ELBO for diffusion
models, the exact NLL for the autoregressive one, so objectives and curricula are compared on one number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.config.train_config import TrainConfig
from unmask.curriculum.batches import BatchSource
from unmask.data.dataset import Dataset, Vocab, check_split_length, load_dataset
from unmask.errors import UserError
from unmask.likelihood.elbo import real_char_log_probs
from unmask.objectives import registry
from unmask.runtime import Runtime
from unmask.training import validation

if TYPE_CHECKING:
    from unmask.model import Transformer
    from unmask.transfer.pretrained import Pretrained

BatchT = TypeVar("BatchT")


def char_cross_entropy(logits: Tensor, targets: Tensor, mask_id: int | None, reduction: str = "mean") -> Tensor:
    """CE of logits (N, V); with `mask_id`, over the real characters only (MDLM's zero-masking, the SUBS
    parameterisation of Sahoo et al. 2024: the [MASK] logit is -inf, so no probability is spent on it)."""
    if mask_id is None:
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    logp = real_char_log_probs(logits, mask_id)  # (N, V)
    return F.nll_loss(logp, targets, reduction=reduction)


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


class TrainingHooks:
    """How an objective steers the training loop. These defaults steer nothing: train to max_iters on the plain
    learning-rate schedule (the unmasking objective's `CurriculumHooks` override them)."""

    def before_step(self, iter_num: int, epochs: float) -> str | None:
        """Before every iteration; a line to print, if any."""
        return None

    def finished(self, iter_num: int, epochs: float) -> bool:
        """Whether training ends before max_iters."""
        return False

    def after_eval(self, metrics: dict[str, Any], iter_num: int, epochs: float) -> None:
        """React to an evaluation's metrics (in place: decisions and state go into the record)."""

    def lr_window(self) -> tuple[int, int | None, float]:
        """(window start iteration, window end iteration or None, lr factor) for `unmask.training.schedule.lr_at`."""
        return 0, None, 1.0

    def log_fields(self) -> dict[str, Any]:
        """Extra fields of every training log record."""
        return {}

    def end_lines(self, iter_num: int, epochs: float) -> list[str]:
        """Lines printed when training ends before max_iters."""
        return []


class Objective(Generic[BatchT]):
    """What one kind of training trains on, measures and reports. Subclasses set `vocab` and `train_size` in
    `__init__` and implement `batch`, `loss` and `validate`; every other method has a neutral default."""

    show_parameter_summary: ClassVar[bool] = False  # print total / trainable / frozen parameters at the start
    # Read from the class by `unmask export` and `unmask compare` (no run is built for them):
    params: ClassVar[tuple[str, ...]] = ()  # training-config keys that parameterise the objective (exported)
    length_flag: ClassVar[str | None] = None  # a config key `unmask compare` takes per run as NAME:K
    run_only_flags: ClassVar[tuple[str, ...]] = ()  # train flags `unmask compare` gives to this objective only
    vocab: Vocab
    train_size: int  # units of one epoch (training characters, or texts for the sequence task)

    def __init__(self, inputs: RunInputs) -> None:
        self.cfg, self.rt = inputs.cfg, inputs.runtime
        self.name = objective_name(inputs.cfg)
        self.pretrained = inputs.pretrained
        self.hooks = TrainingHooks()

    # --- model ----------------------------------------------------------------------------------------------------

    def model_fields(self) -> dict[str, Any]:
        """Extra `ModelConfig` fields of this objective's network (e.g. causal attention, a binary head)."""
        return {}

    def prepare_model(self, model: Transformer) -> list[str]:
        """After the model is built, before the optimizer: start from pretrained weights, freeze. Returns lines to
        print. An objective that does not override this cannot start from pretrained weights."""
        if self.pretrained is not None:
            raise UserError(
                f"--pretrained_checkpoint_path: the {self.name} objective cannot start from pretrained weights"
            )
        return []

    # --- training and evaluation ------------------------------------------------------------------------------------

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> BatchT:
        """One micro-batch, with every random draw of the step: data from `data_gen`, masks and corruption from
        `mask_gen`. `training=False` for the fresh train batches of an evaluation (no label smoothing, no
        pre-drawn selections, the full mask-rate range)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: BatchT) -> Tensor:
        """The scalar loss of `model` on `batch`: draws nothing, so it is a function of the two (the trainer runs it
        under autocast)."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics on the fixed validation data (model in eval mode, gradients off); must include `val_loss`."""
        raise NotImplementedError

    def epochs(self, iter_num: int, chars_seen: int) -> float:
        """Passes over the training data."""
        return chars_seen / self.train_size

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


def objective_name(cfg: TrainConfig) -> str:
    """The registered objective a config trains: a binary task with --switch_to_binary, else --objective."""
    return f"binary_{cfg.binary_task}" if cfg.switch_to_binary else cfg.objective


def objective_class(name: str) -> type[Objective[Any]]:
    """The class registered as `name` in `unmask.objectives.registry` (imported now if registered by module path);
    KeyError if none is."""
    target = registry.load(name)
    if not (isinstance(target, type) and issubclass(target, Objective)):
        raise TypeError(f"objective {name!r}: {target!r} is not a subclass of Objective")
    return target


def build_objective(inputs: RunInputs) -> Objective[Any]:
    """The objective of a run, built from its inputs."""
    name = objective_name(inputs.cfg)
    if name not in registry.ENTRIES:
        raise UserError(f"--objective={name}: expected one of {', '.join(registry.names())}")
    return objective_class(name)(inputs)


# --- language-model objectives ---------------------------------------------------------------------------------------


class LanguageModel(Objective[BatchT]):
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
        # --self_conditioning is refused for the autoregressive objective by the config.
        return {"causal": self.causal, "self_conditioning": self.cfg.self_conditioning}

    def prepare_model(self, model: Transformer) -> list[str]:
        """From pretrained weights a language model keeps their vocabulary and copies every weight (unless
        --transfer_learning_mode=from_scratch)."""
        if self.pretrained is None:
            return []
        from unmask.transfer import pretrained as transfer

        return transfer.start_language_model(model, self.cfg, self.pretrained, self.vocab)

    def clean_windows(self, data_gen: torch.Generator) -> Tensor:
        """batch_size clean training windows (B, window) on the device."""
        return self.train_source.clean(self.cfg.batch_size, data_gen)

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


class DiffusionModel(LanguageModel[BatchT]):
    """Bidirectional objectives scored on the fixed, stage-masked validation set and by the ELBO."""

    # Whether --zero_masking applies: training (then validation CE too) drops the [MASK] logit. The unmasking
    # objective keeps the original framework's full softmax.
    zero_masking_applies: ClassVar[bool] = True

    @property
    def zero_masking(self) -> bool:
        return self.zero_masking_applies and drops_mask_logit(self.cfg, default=True)

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


def drops_mask_logit(cfg: TrainConfig, default: bool) -> bool:
    """--zero_masking, or the objective's `default` when the flag is unset (None)."""
    return default if cfg.zero_masking is None else bool(cfg.zero_masking)
