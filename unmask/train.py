"""The training loop of `unmask train`.

`Trainer.run` reads as the list of what happens: evaluate (and advance the curriculum), checkpoint, train step,
log. Everything a resumed run needs to continue bit for bit is in `Trainer.state_dict`: model, optimizer,
scaler, iteration, training characters seen, best validation loss, curriculum state, the data and masking
generators, the global RNG (dropout) and the config.

The learning rate is a pure function of the iteration and the curriculum state (`lr_at`), so it needs no state
of its own: a resumed run recomputes it exactly.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from unmask import checkpoint as ckpt_io
from unmask import objectives
from unmask.batches import BatchSource, SelectionPool
from unmask.config import TrainConfig
from unmask.curriculum import Curriculum, CurriculumState
from unmask.data import check_split_length, load_dataset
from unmask.errors import UserError
from unmask.metrics import RunLogger
from unmask.model import ModelConfig, Transformer
from unmask.preemption import StopSignal, TrainingInterrupted
from unmask.runtime import Runtime
from unmask.validation import build_validation_set, evaluate_batches

ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")
# Fixed offsets keep the generators of one run independent of each other (and of the validation seed 42).
MASK_SEED_OFFSET = 1_000_003
_EVAL_SEED_OFFSET = 2_000_003
_MAX_NONFINITE_STEPS = 5


def lr_at(it: int, cfg: TrainConfig, stage_start: int = 0, stage_end: int | None = None, factor: float = 1.0) -> float:
    """Learning rate of the optimizer step taken at iteration `it`: `factor` (the current stage's lr_factor) times
    the schedule.

    The schedule is a linear warmup to `learning_rate` over the first `warmup_iters` steps of training, then:
    - `cosine`: one cosine to `min_lr` at `lr_decay_iters`, then `min_lr`;
    - `cosine_with_restarts`, `lr_restart_period` P > 0: cosine cycles of P steps counted from the end of warmup,
      each starting again at `learning_rate` (SGDR, Loshchilov & Hutter 2017, without cycle growth);
    - `cosine_with_restarts`, P = 0: a cycle per stage, from the current stage's start (`stage_start`, or the end
      of warmup if later) to `min_lr` where its duration runs out (`stage_end`), or at `lr_decay_iters` for a
      stage without a duration; then `min_lr` until the next stage.
    """
    return factor * _schedule(it, cfg, stage_start, stage_end)


def _schedule(it: int, cfg: TrainConfig, stage_start: int, stage_end: int | None) -> float:
    top, low = cfg.learning_rate, cfg.final_lr
    if not cfg.decay_lr:
        return top
    if it < cfg.warmup_iters:
        return top * (it + 1) / (cfg.warmup_iters + 1)
    start, end = cfg.warmup_iters, cfg.decay_iters
    if cfg.lr_schedule == "cosine_with_restarts":
        if cfg.lr_restart_period:
            period = cfg.lr_restart_period
            return low + 0.5 * (1.0 + math.cos(math.pi * ((it - start) % period) / period)) * (top - low)
        start = max(stage_start, cfg.warmup_iters)
        if stage_end is not None:
            end = stage_end
    if it >= end:
        return low
    progress = (it - start) / max(1, end - start)
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - low)


def check_architecture(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run must keep the checkpoint's architecture; list every differing field."""
    diffs = [
        f"{k}: flag {getattr(cfg, k)} vs checkpoint {saved[k]}"
        for k in ARCHITECTURE_KEYS
        if k in saved and getattr(cfg, k) != saved[k]
    ]
    if diffs:
        raise UserError(f"{path}: architecture differs from the flags ({'; '.join(diffs)})")


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        runtime: Runtime,
        checkpoint: dict[str, Any] | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        self.bind(cfg, runtime, checkpoint)
        self.data = load_dataset(Path(cfg.data_dir) / cfg.dataset)
        for split in ("train", "val"):
            check_split_length(self.data, split, cfg.block_size)
        self.vocab = self.data.vocab
        self.raw_model = self.build_model(causal=objectives.is_causal(cfg.objective))
        self.optimizer = self.build_optimizer()
        # Characters of training text one optimizer step consumes, over all ranks: epochs = seen / available.
        self.chars_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * runtime.world_size
        self.curriculum = Curriculum(
            cfg.unmasking_stages,
            cfg.use_all_stages_for_training,
            duration_scale=cfg.stage_duration_scale,
            iters_per_epoch=len(self.data.train) / self.chars_per_iter,
        )
        self.init_state(checkpoint, checkpoint_path)

        paragraphs = self.data.paragraphs if cfg.use_paragraph_boundaries else {"train": None, "val": None}
        window = objectives.window_length(cfg.objective, cfg.block_size)
        self.train_source = BatchSource(self.data.train, window, runtime.device, paragraphs["train"])
        rows = max(256, 4 * cfg.batch_size)
        self.pool: SelectionPool | None = SelectionPool(cfg.unmasking_stages, cfg.block_size, self.mask_gen, rows)
        if checkpoint is not None and "pool" in checkpoint["rng"][runtime.rank]:
            # (Checkpoints written before the pool was saved were written right after a flush: empty pool.)
            self.pool.load_state(checkpoint["rng"][runtime.rank]["pool"])
        n_val = cfg.eval_iters * cfg.batch_size
        if self.model_config.causal:
            # Fixed validation windows of block_size + 1 characters (seed 42), scored by exact NLL.
            val_source = BatchSource(self.data.val, window, runtime.device, paragraphs["val"])
            self.val_windows = val_source.clean(n_val, torch.Generator().manual_seed(42))
        else:
            self.val_set = build_validation_set(
                self.data.val,
                paragraphs["val"],
                cfg.stages_for_validation,
                n_val,
                cfg.block_size,
                self.vocab.mask_id,
                self.vocab.n_chars,
                runtime.device,
            )

    # --- construction (shared with BinaryTrainer) -------------------------------------------------------------

    def bind(self, cfg: TrainConfig, runtime: Runtime, checkpoint: dict[str, Any] | None) -> None:
        """Config, runtime, out_dir and the logger."""
        self.cfg, self.rt = cfg, runtime
        self.out_dir = Path(cfg.out_dir)
        self.log = RunLogger(self.out_dir, runtime.is_master, cfg.to_dict() if cfg.wandb_log else None)
        self.resumed = checkpoint is not None  # a transfer run starts anew despite --init_from=resume

    def build_model(self, **config: Any) -> Transformer:
        """The model for `self.vocab` and the config's architecture (`config`: extra `ModelConfig` fields)."""
        cfg = self.cfg
        # Model init draws from the global RNG; seed it identically on every rank (DDP also broadcasts).
        torch.manual_seed(cfg.seed)
        self.model_config = ModelConfig(
            vocab_size=self.vocab.size,
            block_size=cfg.block_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=cfg.dropout,
            bias=cfg.bias,
            **config,
        )
        return Transformer(self.model_config).to(self.rt.device)

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; also creates the GradScaler (float16 only)."""
        cfg, device = self.cfg, self.rt.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.rt.dtype == torch.float16)
        return torch.optim.AdamW(
            self.raw_model.optimizer_groups(cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
            fused=device.type == "cuda",
        )

    def init_state(self, checkpoint: dict[str, Any] | None, checkpoint_path: Path | None) -> None:
        """Generators and counters, restored from `checkpoint` on resume; then compile and DDP wrapping."""
        cfg, runtime = self.cfg, self.rt
        # Per-rank streams: different data on every rank, reproducible for a seed.
        self.data_gen = torch.Generator().manual_seed(cfg.seed + runtime.rank)
        self.mask_gen = torch.Generator(device=runtime.device).manual_seed(cfg.seed + MASK_SEED_OFFSET + runtime.rank)
        self.iter_num = 0
        self.train_chars_seen = 0
        self.best_val_loss = math.inf
        self.last_eval_iter = -1
        self.nonfinite_steps = 0
        if checkpoint is not None:
            self.load_state_dict(checkpoint, checkpoint_path or Path("checkpoint"))
        self.model: torch.nn.Module = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.raw_model)  # type: ignore[assignment]
        if runtime.ddp:
            idx = [runtime.local_rank] if runtime.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=idx)  # frozen parameters take no part in the all-reduce
        self.step_times: list[float] = []
        self.batch_times: list[float] = []
        self.step_lr = 0.0  # the learning rate of the last step, for its log line

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to `max_iters` (or the end of the final stage's duration); returns the last evaluation's metrics."""
        self.start()
        metrics: dict[str, Any] = {}
        with StopSignal() as stop:
            while True:
                self.advance_by_duration()
                if self.due_for_eval():
                    metrics = self.evaluate()
                    self.advance_curriculum(metrics)
                    self.report(metrics)
                    self.save_checkpoint(metrics)
                    if self.cfg.eval_only:
                        break
                if self.done():
                    break
                loss = self.train_step()
                self.log_step(loss)
                signum = stop.agreed(self.rt)
                if signum is not None:
                    self.stop_for_signal(signum)
                if self.nonfinite_steps >= _MAX_NONFINITE_STEPS:
                    self.stop_diverged()
        if self.iter_num < self.cfg.max_iters and self.curriculum_active and not self.cfg.eval_only:
            stage = self.curriculum.state.stage
            self.log.print(
                f"Final stage {stage} ({self.curriculum.current.type}) has lasted its duration: training ends at "
                f"iteration {self.iter_num} ({self.epochs:.3f} epochs)"
            )
        self.log.close()
        return metrics

    @property
    def curriculum_active(self) -> bool:
        """Only the unmasking objective trains through the stage curriculum."""
        return self.cfg.objective == "unmasking"

    @property
    def epochs(self) -> float:
        """Training characters seen / training characters available."""
        return self.train_chars_seen / len(self.data.train)

    def done(self) -> bool:
        """Training ends at max_iters, or when the final stage has lasted its epochs/iters."""
        if self.iter_num >= self.cfg.max_iters:
            return True
        return self.curriculum_active and self.curriculum.finished(self.iter_num, self.epochs)

    def advance_by_duration(self) -> None:
        """Before every iteration: a stage that has lasted its epochs/iters hands over to the next one."""
        if self.curriculum_active:
            line = self.curriculum.advance_by_duration(self.iter_num, self.epochs)
            if line is not None:
                self.log.print(line)

    def current_lr(self) -> float:
        """The learning rate of the step taken at the current iteration (schedule x the stage's lr_factor)."""
        if not self.curriculum_active:
            return lr_at(self.iter_num, self.cfg)
        c = self.curriculum
        return lr_at(self.iter_num, self.cfg, c.state.stage_start_iter, c.stage_end_iter(), c.current.lr_factor)

    def open_run(self) -> None:
        """Create out_dir and config.json; a resumed run keeps its metrics.jsonl up to the checkpoint, a new one
        starts it afresh."""
        if self.rt.is_master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.atomic_write_json(self.out_dir / "config.json", self.cfg.to_dict())
            if self.resumed:
                self.log.truncate_after(self.iter_num)
            elif self.log.path.exists():
                self.log.path.unlink()

    def start(self) -> None:
        cfg = self.cfg
        self.open_run()
        n = self.raw_model.num_params()
        tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.log.print(
            f"unmask: {n:,} parameters, vocabulary {self.vocab.n_chars} characters + [MASK], "
            f"{self.rt.device} {str(self.rt.dtype).removeprefix('torch.')}, world size {self.rt.world_size}"
        )
        self.log.print(
            f"dataset {cfg.dataset}: {len(self.data.train):,} train / {len(self.data.val):,} val characters; "
            f"{tokens * self.rt.world_size:,} tokens per iteration"
        )
        self.log.print(
            f"objective {cfg.objective}: {self.model_config.causal and 'causal' or 'bidirectional'} attention"
        )
        if self.model_config.causal:
            self.log.print(
                f"Validation set: {len(self.val_windows)} windows of {cfg.block_size + 1} characters (seed 42)"
            )
            return
        stages = self.cfg.stages_for_validation
        self.log.print(
            f"Validation set: {len(self.val_set)} samples from all {len(stages)} validation stages (seed 42)"
        )
        if cfg.objective != "unmasking":
            return
        for i, stage in enumerate(self.cfg.unmasking_stages):
            self.log.print(f"  Stage {i} ({stage.type}): {stage.params()}, {self.curriculum.describe_duration(i)}")
        if self.iter_num:
            self.log.print(f"Resumed at iteration {self.iter_num}, stage {self.curriculum.state.stage}")

    def due_for_eval(self) -> bool:
        it = self.iter_num
        due = it % self.cfg.eval_interval == 0 or self.done() or self.cfg.eval_only
        return due and it != self.last_eval_iter

    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        self.raw_model.eval()
        gen_seed = cfg.seed + _EVAL_SEED_OFFSET + 7919 * self.iter_num + self.rt.rank
        data_gen = torch.Generator().manual_seed(gen_seed)
        mask_gen = torch.Generator(device=self.rt.device).manual_seed(gen_seed)
        with torch.no_grad():
            fresh = [self.micro_batch_loss(self.raw_model, data_gen, mask_gen, None)[0] for _ in range(cfg.eval_iters)]
        train_loss = self.rt.all_reduce_sum(torch.stack(fresh).mean().double()) / self.rt.world_size
        metrics: dict[str, Any] = {
            "iter": self.iter_num,
            "epochs": self.epochs,
            "train_loss": float(train_loss),
        }
        metrics |= self.validation_metrics()
        self.raw_model.train()
        self.last_eval_iter = self.iter_num
        if not (math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])):
            raise UserError(
                f"evaluation at iteration {self.iter_num} gave a non-finite loss "
                f"(train {metrics['train_loss']}, val {metrics['val_loss']}); lower --learning_rate "
                f"or raise --warmup_iters, and resume from the last checkpoint"
            )
        return metrics

    def validation_metrics(self) -> dict[str, Any]:
        """Metrics on the fixed validation data (the model is in eval mode, gradients off)."""
        cfg, model, mask_id = self.cfg, self.raw_model, self.vocab.mask_id
        if self.model_config.causal:
            return objectives.autoregressive_val(model, self.val_windows, mask_id, cfg.batch_size, self.rt)
        n_stages = len(cfg.stages_for_validation)
        metrics = evaluate_batches(model, self.val_set, cfg.batch_size, n_stages, self.vocab.n_chars, self.rt)
        clean = self.val_set.y
        metrics |= objectives.diffusion_val_bpc(model, clean, mask_id, cfg.elbo_draws, cfg.batch_size, self.rt)
        return metrics | objectives.mask_rate_ce(model, clean, mask_id, cfg.batch_size, self.rt)

    def advance_curriculum(self, m: dict[str, Any]) -> None:
        """The stage curriculum (unmasking objective only) reacts to the overall validation loss."""
        if self.curriculum_active:
            m["decision"] = self.curriculum.update(m["val_loss"], self.iter_num, self.epochs)
            state = self.curriculum.state
            m |= {
                "stage": state.stage,
                "stale_count": state.stale_count,
                "best_stage_val_loss": state.best_stage_val_loss,
            }
        m["lr"] = self.current_lr()  # after the decision: a stage change restarts the schedule

    def report(self, m: dict[str, Any]) -> None:
        """The README's "Training Logs Example" block, then one metrics.jsonl record."""
        p = self.log.print
        p(f"step {m['iter']}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, lr {m['lr']:.6f}")
        if self.cfg.objective == "unmasking":
            cur, state = self.curriculum.current, self.curriculum.state
            progress = self.curriculum.progress(self.iter_num, self.epochs)
            p(
                f"Stage {state.stage} ({cur.type}): {cur.params()}, stale_count={state.stale_count}"
                + (f", {progress}" if progress else "")
            )
        p(
            f"  val bpc: {m['val_bpc']:.4f} ({'exact NLL' if self.model_config.causal else 'ELBO'}), "
            f"epochs {m['epochs']:.3f}"
        )
        if not self.model_config.causal:
            p(f"  val model vs random: {m['val_model_vs_random']:.2f}x better")
            p(f"  val accuracy: {m['val_avg_correct_prob']:.4f} (random baseline: {1 / self.vocab.n_chars:.4f})")
            p(f"  Most likely guess correct P %: {m['val_most_likely_accuracy']:.1f}%")
            p(
                f"  val masked token ratio: {m['val_masked_token_ratio']:.3f} "
                f"(min {m['val_masked_token_ratio_min']:.3f}, max {m['val_masked_token_ratio_max']:.3f})"
            )
            p(
                "  masked CE by mask rate: "
                + ", ".join(
                    f"{k.removeprefix('val_ce_mask_')}% {v:.3f}" for k, v in m.items() if k.startswith("val_ce_mask_")
                )
            )
            p("Per-stage validation losses:")
            for i, stage in enumerate(self.cfg.stages_for_validation):
                p(
                    f"  Stage {i} ({stage.type}): {m[f'val_stage_{i}_loss']:.4f} "
                    f"({m[f'val_stage_{i}_samples']} samples) - {stage.ratio_label()}"
                )
        if "decision" in m:
            p(m.pop("decision"))
        self.log.record("eval", m)

    def save_checkpoint(self, m: dict[str, Any]) -> None:
        improved = m["val_loss"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, m["val_loss"])
        if self.iter_num == 0 or not (improved or self.cfg.always_save_checkpoint):
            return
        self.write_checkpoint({"val_loss": m["val_loss"]})

    def write_checkpoint(self, extra: dict[str, Any]) -> Path | None:
        """Write the checkpoint of the current state (rank 0; every rank takes part); returns its path on rank 0."""
        rng = self.gather_rng_states()  # collective: every rank takes part
        path = None
        if self.rt.is_master:
            sidecar = {
                "iter": self.iter_num,
                **extra,
                "best_val_loss": self.best_val_loss,
                "curriculum": self.curriculum.state.to_dict(),
                "model_config": self.model_config.__dict__,
                "vocab": list(self.vocab.itos),
                "task": self.task_record(),
                "config": self.cfg.to_dict(),
            }
            path = ckpt_io.save_checkpoint(
                self.out_dir, self.iter_num, self.state_dict(rng), sidecar, self.cfg.keep_last
            )
            self.log.print(f"saved checkpoint {path}")
        self.rt.barrier()
        return path

    def stop_for_signal(self, signum: int) -> None:
        """Checkpoint the state after the step just taken (no evaluation), then end the run."""
        path = self.write_checkpoint({"val_loss": None, "stopped_by": signal.Signals(signum).name})
        self.log.close()
        raise TrainingInterrupted(signum, self.iter_num, None if path is None else str(path))

    def stop_diverged(self) -> None:
        """Several non-finite steps in a row: save the state they left untouched (skipped steps change no weight),
        so that a resume with a lower learning rate loses no work, then stop with advice."""
        finite = all(bool(torch.isfinite(t).all()) for t in self.raw_model.state_dict().values())
        path = self.write_checkpoint({"val_loss": None, "stopped_by": "non-finite steps"}) if finite else None
        self.log.close()
        saved = f"the weights before them are saved in {path}; " if path is not None else ""
        raise UserError(
            f"training diverged at iteration {self.iter_num}: {_MAX_NONFINITE_STEPS} non-finite losses or gradients "
            f"in a row; {saved}lower --learning_rate and continue with --init_from=resume"
        )

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss."""
        cfg, rt = self.cfg, self.rt
        t0 = time.perf_counter()
        batch_time = 0.0
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        smoothing = cfg.label_smoothing
        accum = cfg.gradient_accumulation_steps
        total = torch.zeros((), device=rt.device)
        for micro in range(accum):
            # Under DDP, all-reduce gradients only on the last micro-step.
            sync = isinstance(self.model, DDP) and micro < accum - 1
            with self.model.no_sync() if sync else nullcontext():  # type: ignore[operator]
                loss, seconds = self.micro_batch_loss(self.model, self.data_gen, self.mask_gen, self.pool, smoothing)
                loss = loss / accum
                self.scaler.scale(loss).backward()
            batch_time += seconds
            total += loss.detach()
        grad_norm = self.clip_gradients()
        if self.step_is_finite(total, grad_norm):
            self.nonfinite_steps = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.skip_nonfinite_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        self.train_chars_seen += self.chars_per_iter
        self.step_lr = lr
        self.batch_times.append(batch_time)
        self.step_times.append(time.perf_counter() - t0)
        return float(total)

    def micro_batch_loss(
        self,
        model: torch.nn.Module,
        data_gen: torch.Generator,
        mask_gen: torch.Generator,
        pool: SelectionPool | None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, float]:
        """One micro-batch of the objective: (loss, seconds spent making the batch and its masks).

        `label_smoothing` is given for training steps only: evaluation losses stay plain cross-entropy."""
        cfg, vocab = self.cfg, self.vocab
        t0 = time.perf_counter()
        if cfg.objective == "unmasking":
            counts = self.curriculum.training_mix(cfg.batch_size)
            batch = self.train_source.batch(
                counts, cfg.unmasking_stages, vocab.mask_id, vocab.n_chars, data_gen, mask_gen, pool
            )
            seconds = time.perf_counter() - t0
            with self.rt.autocast():
                if label_smoothing:
                    return objectives.smoothed_unmasking_loss(model, batch, label_smoothing, vocab.n_chars), seconds
                return objectives.unmasking_loss(model, batch), seconds
        windows = self.train_source.clean(cfg.batch_size, data_gen)
        seconds = time.perf_counter() - t0
        with self.rt.autocast():
            if cfg.objective == "mdlm":
                return objectives.mdlm_loss(model, windows, vocab.mask_id, mask_gen), seconds
            return objectives.autoregressive_loss(model, windows), seconds

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (float16) and clip to --grad_clip; returns the total gradient norm, measured even without
        clipping (a factor min(1, inf / norm) = 1 leaves the gradients bit for bit as they are)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)

    def step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether to take the optimizer step: the loss and the gradient norm are finite on every rank.

        The answer is all-reduced, so all ranks skip together: a NaN on one rank already reached the others'
        gradients through DDP's all-reduce, and ranks that stepped on them would diverge silently (torchtitan
        checks loss and grad norm the same way). With float16 an infinite gradient is an overflow, which the
        GradScaler handles by skipping the step and lowering the scale; only the loss counts then.
        """
        bad = ~torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():
            bad = bad | ~torch.isfinite(grad_norm)
        flag = bad.to(torch.float32).reshape(1)
        return float(self.rt.all_reduce_sum(flag).item()) == 0.0

    def skip_nonfinite_step(self) -> None:
        """A non-finite loss or gradient skips the update (several in a row stop the run: `stop_diverged`)."""
        self.nonfinite_steps += 1
        self.log.print(
            f"iter {self.iter_num}: non-finite loss or gradient, update skipped "
            f"({self.nonfinite_steps}/{_MAX_NONFINITE_STEPS})"
        )
        if self.scaler.is_enabled():
            self.scaler.update()  # let the float16 loss scale back off, as GradScaler does for inf gradients

    def log_step(self, loss: float) -> None:
        if self.iter_num % self.cfg.log_interval and self.iter_num != self.cfg.max_iters:
            return
        n = len(self.step_times)
        step_s = sum(self.step_times) / n
        batch_share = sum(self.batch_times) / sum(self.step_times)
        tokens = self.chars_per_iter
        lr = self.step_lr  # the effective learning rate of the step just taken (schedule x stage lr_factor)
        self.log.print(
            f"iter {self.iter_num}: loss {loss:.4f}, time {1000 * step_s:.2f}ms, "
            f"{tokens / step_s:,.0f} tok/s, batch+mask {100 * batch_share:.1f}%, lr {lr:.6f}, "
            f"stage {self.curriculum.state.stage}, epochs {self.epochs:.3f}"
        )
        self.log.record(
            "train",
            {
                "iter": self.iter_num,
                "epochs": self.epochs,
                "train_loss_step": loss,
                "lr": lr,
                "ms_per_iter": 1000 * step_s,
                "tokens_per_s": tokens / step_s,
                "batch_share": batch_share,
                "stage": self.curriculum.state.stage,
            },
        )
        self.step_times.clear()
        self.batch_times.clear()

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (index = rank): each rank draws its own data and masks."""
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "data": self.data_gen.get_state(),
            "mask": self.mask_gen.get_state(),
        }
        if self.pool is not None:
            rng["pool"] = self.pool.state()  # the pre-drawn selections not used yet belong to the mask stream
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        if not self.rt.ddp:
            return [rng]
        gathered: list[Any] = [None] * self.rt.world_size
        torch.distributed.all_gather_object(gathered, rng)
        return gathered

    def task_record(self) -> dict[str, Any]:
        """What the model was trained for, recorded in checkpoints and sidecars (read by `unmask.loading`)."""
        return {"head": self.model_config.head, "objective": self.cfg.objective}

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iter_num,
            "last_eval_iter": self.last_eval_iter,
            "nonfinite_steps": self.nonfinite_steps,
            "train_chars_seen": self.train_chars_seen,
            "best_val_loss": self.best_val_loss,
            "curriculum": self.curriculum.state.to_dict(),
            "rng": rng,
            "model_config": dict(self.model_config.__dict__),
            "vocab": list(self.vocab.itos),
            "task": self.task_record(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, ckpt: dict[str, Any], path: Path) -> None:
        saved_vocab = ckpt.get("vocab")
        if saved_vocab is not None and list(saved_vocab) != list(self.vocab.itos):
            raise UserError(f"{path}: the checkpoint's vocabulary differs from {self.cfg.dataset}'s meta.json")
        check_architecture(self.cfg, ckpt["model_config"], path)
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num = int(ckpt["iter_num"])
        # Written right after this iteration's evaluation, or (stopped by a signal) possibly before a due one.
        self.last_eval_iter = int(ckpt.get("last_eval_iter", self.iter_num))
        self.nonfinite_steps = int(ckpt.get("nonfinite_steps", 0))
        # Checkpoints from before epochs were tracked: every step so far had this run's batch shape.
        self.train_chars_seen = int(ckpt.get("train_chars_seen", self.iter_num * self.chars_per_iter))
        self.best_val_loss = float(ckpt["best_val_loss"])
        self.curriculum.state = CurriculumState.from_dict(ckpt["curriculum"], self.iter_num, self.epochs)
        if self.curriculum.state.stage >= len(self.cfg.unmasking_stages):
            raise UserError(
                f"{path}: checkpoint is at stage {self.curriculum.state.stage} but only "
                f"{len(self.cfg.unmasking_stages)} --unmasking_stages are configured"
            )
        if len(ckpt["rng"]) != self.rt.world_size:
            raise UserError(
                f"{path}: saved by {len(ckpt['rng'])} process(es), resumed with {self.rt.world_size}; "
                f"resume with the same number of processes to continue the same data streams"
            )
        rng = ckpt["rng"][self.rt.rank]
        torch.set_rng_state(rng["torch"])
        self.data_gen.set_state(rng["data"])
        self.mask_gen.set_state(rng["mask"])
        if "cuda" in rng and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.rt.device)
