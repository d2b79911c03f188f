"""Typed configuration of `unmask train`.

Every field is a flag (`--name=value`) and a preset key, with the original framework's names and meanings
(its README is our compatibility contract). The docstring under each field is its `--help` text.
`__post_init__` validates values and names the flag in every error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from unmask.config.flags import MAX_SEED, bounded, check_ranges
from unmask.curriculum.stages import Stage, default_curriculum, parse_stages
from unmask.errors import UserError
from unmask.objectives import registry
from unmask.runtime import MAX_THREADS, check_device_name

# Flags that define the learning-rate schedule: a resume that changes one changes the rest of the run's schedule.
SCHEDULE_FLAGS = (
    "max_iters",
    "learning_rate",
    "warmup_iters",
    "lr_decay_iters",
    "min_lr",
    "min_lr_ratio",
    "decay_lr",
    "lr_schedule",
    "lr_restart_period",
)
# The flags that fix a network's shape: a resumed or transferred run takes them from the checkpoint.
ARCHITECTURE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def differing_fields(flags: Any, saved: dict[str, Any], keys: tuple[str, ...] = ARCHITECTURE_FLAGS) -> list[str]:
    """ "key: flag A vs checkpoint B" for every key in both whose values differ; `flags` is a dict or a config."""
    given = flags if isinstance(flags, dict) else vars(flags)
    return [
        f"{k}: flag {given[k]} vs checkpoint {saved[k]}"
        for k in keys
        if k in saved and k in given and given[k] != saved[k]
    ]


@dataclass
class TrainConfig:
    # --- I/O -----------------------------------------------------------------------------------------------
    out_dir: str = "out"
    """Directory for checkpoints, metrics.jsonl and config.json."""
    data_dir: str = "data"
    """Directory that holds prepared datasets (`unmask prepare` writes there)."""
    dataset: str = "shakespeare_char"
    """Dataset name: the data is read from DATA_DIR/DATASET/{train.bin,val.bin,meta.json}."""
    init_from: Literal["scratch", "resume"] = "scratch"
    """'scratch' starts a new run; 'resume' continues from the newest complete checkpoint in out_dir (with
    --pretrained_checkpoint_path: starts a new run from that checkpoint's weights instead)."""
    overwrite: bool = False
    """A new run in an out_dir that holds another run's files is refused; True deletes those files first
    (checkpoints, sidecars, metrics.jsonl, config.json, run.json)."""
    ckpt_filename: str | None = None
    """With --init_from=resume: a checkpoint file name in out_dir instead of the newest."""
    eval_interval: int = bounded(200, 1, 10**12)
    """Evaluate, update the curriculum and checkpoint every this many iterations."""
    log_interval: int = bounded(10, 1, 10**12)
    """Print and record a training line every this many iterations."""
    eval_iters: int = bounded(20, 1, 10**6)
    """Validation set size in batches (eval_iters * batch_size samples); also the fresh train batches per eval."""
    eval_only: bool = False
    """Evaluate once and exit."""
    always_save_checkpoint: bool = True
    """Write a checkpoint at every evaluation, not only when the validation loss improves."""
    keep_last: int = bounded(3, 0, 10**6)
    """Keep this many newest checkpoints in out_dir (0 keeps all)."""
    wandb_log: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "unmask"
    """W&B project name."""
    wandb_run_name: str = "run"
    """W&B run name."""

    # --- training type and curriculum -----------------------------------------------------------------------
    training_type: Literal["unmasking"] = "unmasking"
    """The original framework's training type; 'unmasking' is the only one (see --objective)."""
    objective: str = field(default="unmasking", metadata={"choices": registry.names})
    """One of the objectives registered in `unmask.objectives.registry`. 'unmasking': masked CE through the stage
    curriculum; 'mdlm': the continuous-time masked-diffusion ELBO (t ~ U(eps, 1), linear schedule);
    'autoregressive': causal attention and next-character targets (a nanoGPT baseline); 'block_diffusion': masked
    diffusion inside blocks of --diffusion_block characters. Every objective logs val_bpc (ELBO for diffusion, exact
    NLL for autoregressive)."""
    diffusion_block: int = bounded(0, 0, 2**20)
    """--objective=block_diffusion: the block length K (divides block_size). Each block is a masked-diffusion
    model of K characters conditioned on the clean blocks before it (Arriola et al. 2025, BD3-LM): K = 1 is an
    autoregressive model, K = block_size is MDLM. Committed blocks are KV-cached exactly when sampling."""
    mask_rate_window: tuple[float, float] | Literal["auto"] = bounded((0.0, 1.0), 0.0, 1.0, words=("auto",))
    """mdlm and block_diffusion with --mdlm_estimator=antithetic_t: LO,HI (0 <= LO < HI <= 1): the training mask rate
    t ~ U(LO, HI], per sequence for mdlm (at least its eps = 1e-3), per block for block_diffusion, stratified over
    the batch inside the window (BD3-LM's clipped schedule, a variance reduction). 'auto': BD3-LM's search: at the
    first evaluation after iteration 0, then whenever the iteration has doubled since the last search, the window of a
    grid (the full one, and widths 0.5..0.9 on a 0.05 grid) whose training-loss terms vary least on fixed training
    batches; the full window until the first search. Evaluation always integrates t over (0, 1], so val_bpc stays a
    bound."""
    zero_masking: bool | None = None
    """mdlm and autoregressive: drop the [MASK] logit from the softmax of the training loss (MDLM's zero-masking,
    the SUBS parameterisation: [MASK] is never a target); False: the full softmax. None (default): the objective's
    own default, as measured (docs/likelihood.md, "Zero-masking per objective"): True for mdlm, False for
    autoregressive, whose early training it slowed down. val_bpc and `unmask eval` always drop [MASK]; the
    unmasking objective always trains with the full softmax."""
    self_conditioning: bool = False
    """mdlm, block_diffusion and unmasking: self-conditioning (Chen et al. 2022, "Analog Bits"): the model takes a
    previous prediction's probabilities as an extra input. Training feeds, in half the batches, the softmax of a
    first no-grad pass (else nothing); sampling feeds each step the step before's prediction (no extra forward
    pass); scoring (val_bpc, `unmask eval`) feeds nothing, so the bound stays valid. Part of the architecture:
    kept on resume, stored in checkpoints and exports."""
    mdlm_estimator: Literal["auto", "antithetic_t", "exact_k"] = "auto"
    """Training estimator of mdlm and block_diffusion: 'antithetic_t' draws t stratified over the batch (per block
    for block diffusion), Bernoulli(t) masks, weight 1/t (MDLM); 'exact_k' draws k uniform in 1..L (1..K per
    block) stratified over the batch, a uniform k-subset masked, weight L/k (t integrated out: never a larger
    variance; for block diffusion with K = 1 exactly the autoregressive loss). 'auto': antithetic_t for mdlm,
    exact_k for block_diffusion."""
    elbo_draws: int = bounded(2, 1, 10**4)
    """Monte-Carlo draws per validation window for val_bpc of diffusion objectives (fixed seed: comparable across
    evaluations)."""
    unmasking_stages: tuple[Stage, ...] | None = None
    """Curriculum: a list of stage dicts (type sticky/random/span and their masking parameters; random takes
    max_masked_ratio or masking_rate_range=[lo, hi]). Every stage may give val_loss_stale_count, epochs, iters
    (it ends at whichever comes first; with a duration and no stale count it is duration-only) and lr_factor
    (multiplies the learning rate while it is current). As a flag, a JSON or Python list literal. Default: the
    README's three sticky stages (0.2, 0.4, 0.6), each for at most 10 % of --max_iters, then a random stage masking
    U(0, 1) of each window until the end, so the model can generate from an empty canvas (the `original` preset
    trains the three sticky stages alone)."""
    validation_stages: tuple[Stage, ...] | None = None
    """Stages the fixed validation set is built from (default: unmasking_stages)."""
    use_all_stages_for_training: bool = False
    """Mix all stages into every training batch instead of stages 0..current."""
    use_paragraph_boundaries: bool = True
    """Start training and validation windows right after blank lines (paragraph starts)."""
    stage_duration_scale: float = bounded(1.0, 0.0, 1e6, lo_open=True)
    """Multiplies every stage's epochs and iters (e.g. 0.01 runs a recipe's curriculum at CPU scale)."""

    # --- transfer learning and binary heads (docs/transfer.md) -----------------------------------------------
    pretrained_checkpoint_path: str | None = None
    """With --init_from=resume: start a NEW run in out_dir from this checkpoint (a file, or a run directory for
    its newest) instead of resuming out_dir: architecture and vocabulary come from it, iteration and optimizer
    start fresh. Without this flag, --init_from=resume continues out_dir (transfer runs included)."""
    switch_to_binary: bool = False
    """Replace the language-model head with a 2-class head and train it on --binary_task."""
    transfer_learning_mode: Literal["feature_extraction", "fine_tuning", "from_scratch"] = "fine_tuning"
    """With --pretrained_checkpoint_path: 'feature_extraction' trains only the new head (backbone frozen),
    'fine_tuning' trains everything from the pretrained weights, 'from_scratch' the same architecture and
    vocabulary from a random init (the baseline)."""
    binary_task: Literal["replaced_token", "sequence"] = "replaced_token"
    """'replaced_token': per-character head; characters of --dataset windows are replaced by a different random
    character at a rate drawn per window from --replace_ratio_range, label 1 = replaced. 'sequence': one label
    per text of --classification_data, from the mean hidden state."""
    replace_ratio_range: tuple[float, float] = bounded((0.1, 0.4), 0.0, 1.0)
    """[lo, hi]: each replaced_token window replaces round(r * block_size) characters, r ~ U(lo, hi) per window
    (the original's critic schedule kept 90% to 60% of the characters)."""
    classification_data: str | None = None
    """--binary_task=sequence: a JSONL file of {"text": ..., "label": 0|1} lines, or a CSV file with a header
    row holding the columns text and label. Texts longer than block_size are cut to their first block_size
    characters."""
    val_fraction: float = bounded(0.1, 0.0, 1.0, lo_open=True, hi_open=True)
    """--binary_task=sequence: share of each class held out for validation (fixed split, seed 42)."""

    # --- model ---------------------------------------------------------------------------------------------
    n_layer: int = bounded(6, 1, 1024)
    """Transformer layers."""
    n_head: int = bounded(6, 1, 1024)
    """Attention heads per layer."""
    n_embd: int = bounded(384, 1, 2**16)
    """Embedding width."""
    dropout: float = bounded(0.2, 0.0, 1.0, hi_open=True)
    """Dropout rate (embeddings, attention, residual)."""
    bias: bool = False
    """Use biases in Linear and LayerNorm layers."""
    block_size: int = bounded(1024, 1, 2**20)
    """Sequence length in characters."""

    # --- optimisation --------------------------------------------------------------------------------------
    batch_size: int = bounded(16, 1, 2**20)
    """Sequences per micro-batch (per process)."""
    gradient_accumulation_steps: int = bounded(1, 1, 2**20)
    """Micro-batches per optimizer step, per process (tokens per step = batch x block x this x world size)."""
    max_iters: int = bounded(50000, 0, 10**12)
    """Total optimizer steps."""
    learning_rate: float = bounded(1e-3, 0.0, 10.0)
    """Peak learning rate."""
    decay_lr: bool = True
    """Cosine-decay the learning rate after warmup (else constant). The current stage's lr_factor multiplies the
    learning rate either way."""
    lr_schedule: Literal["cosine", "cosine_with_restarts"] = "cosine"
    """'cosine': one cosine from warmup_iters to lr_decay_iters. 'cosine_with_restarts': back to learning_rate
    every lr_restart_period iterations (SGDR without cycle growth), or with lr_restart_period=0 at every stage
    change, each cycle then reaching min_lr where the stage's epochs/iters end (else at lr_decay_iters)."""
    lr_restart_period: int = bounded(0, 0, 10**12)
    """Iterations of one cosine cycle for --lr_schedule=cosine_with_restarts (0: restart at every stage change)."""
    warmup_iters: int = bounded(2000, 0, 10**12)
    """Linear warmup steps (once, at the start of training)."""
    lr_decay_iters: int | None = bounded(None, 1, 10**12)
    """Step at which the cosine reaches min_lr (default: max_iters)."""
    min_lr: float | None = bounded(None, 0.0, 10.0)
    """Final learning rate (default: learning_rate / 10, or learning_rate * min_lr_ratio)."""
    min_lr_ratio: float | None = bounded(None, 0.0, 1.0)
    """Final learning rate as a fraction of learning_rate (the guide's eta_min = lr * 0.1); excludes --min_lr."""
    weight_decay: float = bounded(2e-2, 0.0, 100.0)
    """AdamW weight decay, applied to >= 2-D weights only."""
    beta1: float = bounded(0.9, 0.0, 1.0, hi_open=True)
    """AdamW beta1."""
    beta2: float = bounded(0.99, 0.0, 1.0, hi_open=True)
    """AdamW beta2."""
    adam_eps: float = bounded(1e-8, 0.0, 1.0, lo_open=True)
    """AdamW epsilon."""
    label_smoothing: float = bounded(0.0, 0.0, 1.0, hi_open=True)
    """Label smoothing of the unmasking training loss (validation losses stay plain cross-entropy): the target
    keeps 1 - eps, and eps is spread evenly over the real characters, never over [MASK]."""
    grad_clip: float = bounded(1.0, 0.0, 1e6)
    """Clip the global gradient norm to this value (0 disables)."""

    # --- system --------------------------------------------------------------------------------------------
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype: 'auto' is bfloat16 on GPUs that support it, else float16 on CUDA, float32 elsewhere."""
    compile: bool = False
    """Compile the model with torch.compile."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """Attention kernel of block diffusion's explicit masks: 'auto' takes FlexAttention (which skips the masked-out
    tiles) on a CUDA GPU of compute capability >= 8.0 when the training layout (2 * block_size - diffusion_block
    positions) is at least 512 long, PyTorch's SDPA otherwise; 'sdpa' or 'flex' forces one ('flex' trains on such
    GPUs only, with --dropout=0)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """DDP backend under torchrun: 'auto' is nccl on CUDA, gloo on CPU."""
    threads: int = bounded(0, 0, MAX_THREADS)
    """CPU threads for torch. 0 (default): as many as the cores of this process's CPU set that are idle when the run
    starts (measured over 0.15 s from /proc/stat, at least 1): threads that wait for each other on busy cores spin."""
    seed: int = bounded(1337, 0, MAX_SEED)
    """Seed of the model init, data and masking generators (offset by the DDP rank)."""

    def __post_init__(self) -> None:
        check_ranges(self)  # every numeric flag's declared range, before any value is used
        if self.objective not in registry.names():  # the registry is the one list of objectives
            raise UserError(f"--objective={self.objective}: expected one of {', '.join(registry.names())}")
        if self.unmasking_stages is None:
            self.unmasking_stages = default_curriculum(self.max_iters)
        self.unmasking_stages = parse_stages(self.unmasking_stages, "--unmasking_stages")
        if self.validation_stages is not None:
            self.validation_stages = parse_stages(self.validation_stages, "--validation_stages")
        if self.lr_restart_period and self.lr_schedule != "cosine_with_restarts":
            raise UserError(
                f"--lr_restart_period={self.lr_restart_period} needs --lr_schedule=cosine_with_restarts "
                f"(got {self.lr_schedule})"
            )
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd={self.n_embd} must be divisible by --n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise UserError(f"--n_embd/--n_head = {self.n_embd // self.n_head} must be even (rotary embeddings)")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise UserError(f"--min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if self.min_lr_ratio is not None and self.min_lr is not None:
            raise UserError(
                f"--min_lr={self.min_lr} and --min_lr_ratio={self.min_lr_ratio}: give only one of them "
                f"(set the other to None)"
            )
        if self.label_smoothing and self.objective != "unmasking":
            raise UserError(
                f"--label_smoothing={self.label_smoothing} applies to --objective=unmasking only (got {self.objective})"
            )
        if self.self_conditioning and (self.switch_to_binary or self.objective == "autoregressive"):
            what = "--switch_to_binary=True" if self.switch_to_binary else f"--objective={self.objective}"
            raise UserError(
                f"--self_conditioning=True: applies to --objective=mdlm, block_diffusion or unmasking (not {what})"
            )
        self._check_block_diffusion()
        self._check_transfer()
        check_device_name(self.device)

    def _check_mask_rate_window(self) -> None:
        window = self.mask_rate_window
        if window != "auto":
            try:
                lo, hi = (float(v) for v in window)
            except (TypeError, ValueError):
                raise UserError(f"--mask_rate_window={window}: expected LO,HI such as 0.3,0.8, or auto") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
                raise UserError(f"--mask_rate_window={lo},{hi}: need 0 <= LO < HI <= 1")
            self.mask_rate_window = (lo, hi)
            if self.mask_rate_window == (0.0, 1.0):
                return  # the full window: every objective's default
        shown = "auto" if window == "auto" else f"{lo},{hi}"
        # The objectives that take the window say so in their class (`Objective.run_only_flags`), imported now: the
        # objectives import the config, so the config reads them only at run time.
        takers = [n for n in registry.names() if "mask_rate_window" in getattr(registry.load(n), "run_only_flags", ())]
        if self.objective not in takers:
            raise UserError(
                f"--mask_rate_window={shown}: applies to --objective={' and '.join(takers)} only (got {self.objective})"
            )
        if self.training_estimator == "exact_k":
            raise UserError(
                f"--mask_rate_window={shown}: clips the mask rate t of --mdlm_estimator=antithetic_t; exact_k "
                "draws mask counts, not rates"
            )

    @property
    def fixed_mask_rate_window(self) -> tuple[float, float]:
        """--mask_rate_window as (LO, HI); the full (0, 1) for 'auto' (where the search starts)."""
        if self.mask_rate_window == "auto":
            return (0.0, 1.0)
        lo, hi = self.mask_rate_window
        return (float(lo), float(hi))

    def _check_block_diffusion(self) -> None:
        self._check_mask_rate_window()
        if self.attention == "flex":
            if self.objective != "block_diffusion":
                raise UserError(
                    f"--attention=flex: only --objective=block_diffusion has explicit attention masks (got "
                    f"{self.objective}, which attends through SDPA's own kernels)"
                )
            if self.dropout:
                raise UserError(
                    f"--attention=flex: FlexAttention has no dropout; give --dropout=0 (got {self.dropout})"
                )
        if self.objective != "block_diffusion":
            if self.diffusion_block:
                raise UserError(f"--diffusion_block={self.diffusion_block}: needs --objective=block_diffusion")
            return
        K = self.diffusion_block
        if K < 1 or self.block_size % K:
            raise UserError(
                f"--diffusion_block={K}: --objective=block_diffusion needs a block length K >= 1 that divides "
                f"--block_size={self.block_size}"
            )

    def _check_transfer(self) -> None:
        try:
            lo, hi = (float(v) for v in self.replace_ratio_range)
        except (TypeError, ValueError):
            raise UserError(f"--replace_ratio_range={self.replace_ratio_range}: expected [lo, hi]") from None
        if not (0.0 <= lo <= hi <= 1.0 and hi > 0.0):
            raise UserError(f"--replace_ratio_range=[{lo}, {hi}]: need 0 <= lo <= hi <= 1 and hi > 0")
        self.replace_ratio_range = (lo, hi)
        if self.pretrained_checkpoint_path is not None and self.init_from != "resume":
            raise UserError(
                f"--pretrained_checkpoint_path={self.pretrained_checkpoint_path}: transfer learning starts with "
                "--init_from=resume (--init_from=scratch loads no checkpoint)"
            )
        if self.transfer_learning_mode == "feature_extraction":
            if self.pretrained_checkpoint_path is None:
                raise UserError("--transfer_learning_mode=feature_extraction needs --pretrained_checkpoint_path")
            if not self.switch_to_binary:
                # The language-model head is the embedding matrix (tied): freezing the backbone freezes it too.
                raise UserError(
                    "--transfer_learning_mode=feature_extraction needs --switch_to_binary=True (the language-model "
                    "head is tied to the embedding, so nothing would be left to train)"
                )
        if not self.switch_to_binary:
            return
        if self.objective != "unmasking":
            raise UserError(f"--objective={self.objective}: does not apply with --switch_to_binary=True")
        if self.label_smoothing:
            raise UserError(f"--label_smoothing={self.label_smoothing}: not with --switch_to_binary=True")
        if self.binary_task == "sequence" and self.classification_data is None:
            raise UserError("--binary_task=sequence needs --classification_data=FILE (JSONL or CSV)")
        if self.binary_task != "sequence" and self.classification_data is not None:
            raise UserError(f"--classification_data={self.classification_data}: needs --binary_task=sequence")

    @property
    def head(self) -> str:
        """The model head this config trains (`unmask.model.HEADS`)."""
        if not self.switch_to_binary:
            return "lm"
        return "sequence_binary" if self.binary_task == "sequence" else "token_binary"

    @property
    def training_estimator(self) -> str:
        """--mdlm_estimator with 'auto' resolved for the objective."""
        if self.mdlm_estimator != "auto":
            return self.mdlm_estimator
        return "exact_k" if self.objective == "block_diffusion" else "antithetic_t"

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The training curriculum (`unmasking_stages` after the default was filled in)."""
        assert self.unmasking_stages is not None  # __post_init__ fills in the default curriculum
        return self.unmasking_stages

    @property
    def stages_for_validation(self) -> tuple[Stage, ...]:
        return self.validation_stages or self.stages

    @property
    def final_lr(self) -> float:
        if self.min_lr is not None:
            return self.min_lr
        if self.min_lr_ratio is not None:
            return self.learning_rate * self.min_lr_ratio
        return self.learning_rate / 10

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stages as dicts); `from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name in ("unmasking_stages", "validation_stages") and value is not None:
                value = [stage.to_dict() for stage in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)
