"""The training loop of `unmask train`, the same for every objective.

`Trainer.run` reads as the list of what happens: evaluate (and let the objective react), checkpoint, train step,
log. The trainer owns the model, optimizer, loop, learning rate, DDP, signals and checkpoints; a micro-batch, its
loss, what an evaluation measures and shows belong to the run's objective (`unmask.objectives.base`), which the
trainer never inspects; how the objective steers the loop (a curriculum's learning-rate window, an early end) comes
through `objective.hooks`. Building and restoring pieces live in `state.py`, the log line's numbers in `progress.py`.

Everything a resumed run needs to continue bit for bit is in `Trainer.state_dict`: model, optimizer, scaler,
iteration, training characters seen, best validation loss, the data and masking generators, the global RNG
(dropout), the objective's own state (curriculum, pre-drawn selections) and the config.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from unmask.config.train_config import TrainConfig
from unmask.errors import UserError
from unmask.model import Transformer
from unmask.objectives.base import Objective, RunInputs, build_objective
from unmask.runtime import Runtime, environment_record, peak_flops
from unmask.storage import checkpoint as ckpt_io
from unmask.storage import run_dir
from unmask.training import state
from unmask.training.preemption import StopSignal, TrainingInterrupted
from unmask.training.progress import Interval, Progress, banner, summary_line
from unmask.training.run_log import RunLog
from unmask.training.schedule import lr_at

# Fixed offsets keep the generators of a run independent of each other (and of the validation seed 42).
MASK_SEED_OFFSET = 1_000_003
_EVAL_SEED_OFFSET = 2_000_003
_MAX_NONFINITE_STEPS = 5


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        runtime: Runtime,
        checkpoint: dict[str, Any] | None = None,
        checkpoint_path: Path | None = None,
        pretrained: Any = None,
        seen_seq: int | None = None,
    ) -> None:
        """`pretrained` (an `unmask.transfer.pretrained.Pretrained`): a new run from those weights. `seen_seq` (a
        plain resume): the highest `seq` of the run's checkpoints before `checkpoint` was read; a higher one found
        under the lock means another resume of the run wrote meanwhile, and this one is refused."""
        self.cfg, self.rt = cfg, runtime
        # A user error on any rank (an occupied out_dir, a missing dataset, another world size) stops every rank
        # here, reported once, before DDP's first collective would fail on the ranks that did not see it.
        with runtime.shared_user_errors():
            self.build(checkpoint, checkpoint_path, pretrained, seen_seq)
        self.model: torch.nn.Module = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.raw_model)  # type: ignore[assignment]
        if runtime.ddp:
            idx = [runtime.local_rank] if runtime.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=idx)  # frozen parameters take no part in the all-reduce
        self.progress = Progress()  # step timings, smoothed ms/iter, the ETA
        self.step_lr = 0.0  # the learning rate of the last step, for its log line
        self.last_checkpoint: Path | None = None
        self.seq = 1  # the write sequence number of the next checkpoint (set from out_dir when the run opens)

    def build(
        self, checkpoint: dict[str, Any] | None, checkpoint_path: Path | None, pretrained: Any, seen_seq: int | None
    ) -> None:
        """Everything a rank can refuse before the first collective: out_dir, data, objective, model, checkpoint."""
        cfg, runtime = self.cfg, self.rt
        self.out_dir = Path(cfg.out_dir)
        self.resumed = checkpoint is not None
        if not self.resumed:
            # Early, on every rank, so that all refuse before any work; `open_run` checks again under the lock.
            run_dir.check_new_run(self.out_dir, cfg.overwrite)
        # The run id: kept by a resume, new otherwise (also for a run that starts from pretrained weights).
        saved_id = None if checkpoint is None else checkpoint.get("run_id")
        self.run_id = saved_id if isinstance(saved_id, str) else run_dir.new_run_id()
        saved_seq = None if checkpoint is None else checkpoint.get("seq")
        self.resumed_from: tuple[Path, int] | None = None  # checked again under the lock: (path, newest seq seen)
        if seen_seq is not None and isinstance(saved_id, str) and isinstance(saved_seq, int) and checkpoint_path:
            self.resumed_from = (checkpoint_path, max(seen_seq, saved_seq))
        self.lock = run_dir.RunLock(self.out_dir)
        self.log = RunLog(self.out_dir, runtime.is_master, cfg.to_dict() if cfg.wandb_log else None, self.run_id)
        # Per-rank streams: different data on every rank, reproducible for a seed.
        self.data_gen = torch.Generator().manual_seed(cfg.seed + runtime.rank)
        self.mask_gen = torch.Generator(device=runtime.device).manual_seed(cfg.seed + MASK_SEED_OFFSET + runtime.rank)
        inputs = RunInputs(cfg, runtime, self.mask_gen, checkpoint, None if checkpoint is not None else pretrained)
        self.objective: Objective[Any] = build_objective(inputs)
        self.vocab = self.objective.vocab
        self.chars_per_iter = inputs.chars_per_iter
        self.raw_model = self.build_model()
        self.notes = self.objective.prepare_model(self.raw_model)  # pretrained weights, freezing
        self.optimizer = self.build_optimizer()
        if self.objective.show_parameter_summary or inputs.pretrained is not None:
            from unmask.transfer.pretrained import parameter_summary

            self.notes += parameter_summary(self.raw_model, self.optimizer)
        self.iter_num = 0
        self.train_chars_seen = 0
        self.best_val_loss = math.inf
        self.best: dict[str, tuple[float, int]] = {}  # metric -> (best value, its iteration), for the summary
        self.last_eval_iter = -1
        self.nonfinite_steps = 0
        if checkpoint is not None:
            self.load_state_dict(checkpoint, checkpoint_path or Path("checkpoint"))

    # --- construction -----------------------------------------------------------------------------------------

    def build_model(self) -> Transformer:
        """The model for the objective's vocabulary and the config's architecture."""
        self.model_config, model = state.build_model(
            self.cfg, self.vocab.size, self.objective.model_fields(), self.rt.device
        )
        return model

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; also creates the GradScaler (float16 only)."""
        optimizer, self.scaler = state.build_optimizer(self.cfg, self.raw_model, self.rt)
        return optimizer

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to `max_iters` (or until the objective says it is finished); returns the last eval's metrics."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict[str, Any]:
        self.start()
        metrics: dict[str, Any] = {}
        with StopSignal() as stop:
            while True:
                self.before_step()
                if self.due_for_eval():
                    metrics = self.evaluate()
                    self.after_eval(metrics)
                    self.report(metrics)
                    self.save_checkpoint(metrics)
                    if self.cfg.eval_only:
                        break
                    signum = stop.agreed(self.rt)  # a signal during the evaluation: stop before training on
                    if signum is not None:
                        self.stop_for_signal(signum)
                if self.done():
                    break
                loss = self.train_step()
                self.log_step(loss)
                signum = stop.agreed(self.rt)
                if signum is not None:
                    self.stop_for_signal(signum)
                if self.nonfinite_steps >= _MAX_NONFINITE_STEPS:
                    self.stop_diverged()
        self.finish()
        return metrics

    @property
    def epochs(self) -> float:
        return self.objective.epochs(self.iter_num, self.train_chars_seen)

    def done(self) -> bool:
        """Training ends at max_iters, or when the objective says so (the final stage has lasted its duration)."""
        return self.iter_num >= self.cfg.max_iters or self.objective.hooks.finished(self.iter_num, self.epochs)

    def before_step(self) -> None:
        line = self.objective.hooks.before_step(self.iter_num, self.epochs)
        if line is not None:
            self.log.print(line)

    def current_lr(self) -> float:
        """The learning rate of the step taken at the current iteration (schedule x the objective's factor)."""
        start, end, factor = self.objective.hooks.lr_window()
        return lr_at(self.iter_num, self.cfg, start, end, factor)

    def open_run(self) -> None:
        """Take the lock, then check and write: a new run starts only in a directory that holds no other run (or with
        --overwrite=True, which removes that run's files), a resume only from what is still the run's newest
        checkpoint. Then config.json and run.json; a resumed run keeps its metrics.jsonl up to the checkpoint."""
        # Rank 0 alone takes the lock and writes; the others learn here whether it could (a locked out_dir ends
        # every rank with one line, not rank 0's line and the others' backend tracebacks at their next collective).
        with self.rt.shared_user_errors():
            if self.rt.is_master:
                try:
                    self.out_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise UserError(f"{self.out_dir}: cannot create: {ckpt_io.describe_os_error(exc)}") from None
                self.lock.acquire(self.run_id)  # held until the run ends; a second run on out_dir is refused
                # Under the lock, before anything is written: what was checked before may have changed meanwhile (a
                # run that finished in between, another resume of this run).
                if self.resumed_from is not None:
                    path, seq = self.resumed_from
                    run_dir.check_resume_current(self.out_dir, self.run_id, seq, path)
                if not self.resumed:
                    run_dir.check_new_run(self.out_dir, self.cfg.overwrite)
                if not self.resumed and self.cfg.overwrite:
                    removed = run_dir.remove_run_files(self.out_dir)
                    if removed:
                        self.log.print(
                            f"--overwrite=True: removed {removed} file(s) of the previous run in {self.out_dir}"
                        )
                swept = ckpt_io.sweep_temp_files(self.out_dir)
                if swept:
                    self.log.print(f"removed {swept} temporary file(s) left by interrupted writes in {self.out_dir}")
                run_dir.write_manifest(self.out_dir, self.run_id)
                self.seq = run_dir.next_seq(self.out_dir, self.run_id)
                record = {**self.cfg.to_dict(), "run_id": self.run_id, **environment_record()}
                ckpt_io.atomic_write_json(self.out_dir / "config.json", record)
                if self.resumed:
                    self.log.truncate_after(self.iter_num)

    def start(self) -> None:
        rt = self.rt
        self.open_run()
        for line in self.notes:
            self.log.print(line)
        self.log.print(banner(self.raw_model.num_params(), self.vocab.n_chars, rt, self.chars_per_iter))
        for line in self.objective.start_lines(self.iter_num if self.resumed else None):
            self.log.print(line)
        if self.resumed and self.done() and self.last_eval_iter == self.iter_num:
            self.log.print(
                f"the run is already finished at iteration {self.iter_num} (max_iters {self.cfg.max_iters}): nothing "
                "to train; give a larger --max_iters to continue it"
            )

    def due_for_eval(self) -> bool:
        it = self.iter_num
        due = it % self.cfg.eval_interval == 0 or self.done() or self.cfg.eval_only
        return due and it != self.last_eval_iter

    def evaluate(self) -> dict[str, Any]:
        """Fresh training batches (own generators, seeded by the iteration) and the objective's validation."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.raw_model.eval()
        gen_seed = cfg.seed + _EVAL_SEED_OFFSET + 7919 * self.iter_num + self.rt.rank
        data_gen = torch.Generator().manual_seed(gen_seed)
        mask_gen = torch.Generator(device=self.rt.device).manual_seed(gen_seed)
        # A progress bar on a terminal (fresh batches, then the validation metrics); a one-line summary otherwise.
        tty = self.rt.is_master and sys.stderr.isatty()
        bar = tqdm(total=cfg.eval_iters + 1, desc=f"eval {self.iter_num}", unit="batch", disable=not tty, leave=False)
        with torch.no_grad():
            fresh = []
            for _ in range(cfg.eval_iters):
                batch = self.objective.batch(data_gen, mask_gen, False)
                with self.rt.autocast():
                    fresh.append(self.objective.loss(self.raw_model, batch))
                bar.update()
            train_loss = self.rt.all_reduce_sum(torch.stack(fresh).mean().double()) / self.rt.world_size
            metrics: dict[str, Any] = {"iter": self.iter_num, "epochs": self.epochs, "train_loss": float(train_loss)}
            bar.set_postfix_str("validation")
            metrics |= self.objective.validate(self.raw_model)
            bar.update()
        bar.close()
        self.raw_model.train()
        self.last_eval_iter = self.iter_num
        self.progress.eval_seconds = time.perf_counter() - t0
        metrics["eval_seconds"] = self.progress.eval_seconds
        if not tty:
            self.log.print(f"evaluation at iteration {self.iter_num}: {self.progress.eval_seconds:.1f} s")
        if not (math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])):
            raise UserError(
                f"evaluation at iteration {self.iter_num} gave a non-finite loss "
                f"(train {metrics['train_loss']}, val {metrics['val_loss']}); lower --learning_rate "
                f"or raise --warmup_iters, and resume from the last checkpoint"
            )
        return metrics

    def after_eval(self, m: dict[str, Any]) -> None:
        """The objective reacts (the curriculum may change stage); then the learning rate of the next step."""
        self.objective.hooks.after_eval(m, self.iter_num, self.epochs)
        m["lr"] = self.current_lr()  # after the decision: a stage change restarts the schedule
        for key in ("val_loss", "val_bpc"):
            if key in m and m[key] < self.best.get(key, (math.inf, 0))[0]:
                self.best[key] = (m[key], self.iter_num)

    def report(self, m: dict[str, Any]) -> None:
        """The README's "Training Logs Example" block, then one metrics.jsonl record."""
        p = self.log.print
        p(f"step {m['iter']}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, lr {m['lr']:.6f}")
        for line in self.objective.report_lines(m):
            p(line)
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
        # This agreement is also the barrier after the write: a write that fails on rank 0 (a full disk) ends every
        # rank with its one line instead of leaving the others to a backend traceback.
        with self.rt.shared_user_errors():
            if self.rt.is_master:
                state = self.state_dict(rng)
                sidecar = {
                    "iter": self.iter_num,
                    "run_id": self.run_id,
                    "seq": self.seq,
                    **extra,
                    "best_val_loss": self.best_val_loss,
                    **self.objective.state_dict(),
                    "model_config": self.model_config.__dict__,
                    "vocab": list(self.vocab.itos),
                    "task": state["task"],
                    "config": self.cfg.to_dict(),
                    "versions": state["versions"],
                }
                own = partial(run_dir.lineage, self.out_dir, self.run_id)  # rotation never touches another run's files
                path = ckpt_io.save_checkpoint(self.out_dir, self.iter_num, state, sidecar, self.cfg.keep_last, own)
                self.seq += 1
                self.last_checkpoint = path
                self.log.print(f"saved checkpoint {path}")
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

    def finish(self) -> None:
        """Say why training ended, then the run's summary."""
        if self.iter_num < self.cfg.max_iters and not self.cfg.eval_only:
            for line in self.objective.hooks.end_lines(self.iter_num, self.epochs):
                self.log.print(line)
        self.log.print(self.summary_line())
        self.log.close()

    def summary_line(self) -> str:
        sample = self.last_checkpoint is not None and self.model_config.head == "lm"
        return summary_line(self.iter_num, self.progress.elapsed(), self.best, self.last_checkpoint, sample)

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch_time = 0.0
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.gradient_accumulation_steps
        total = torch.zeros((), device=self.rt.device)
        for micro in range(accum):
            t_batch = time.perf_counter()
            batch = self.objective.batch(self.data_gen, self.mask_gen, True)  # every random draw of the micro-step
            batch_time += time.perf_counter() - t_batch
            # Under DDP, all-reduce gradients only on the last micro-step.
            sync = isinstance(self.model, DDP) and micro < accum - 1
            with self.model.no_sync() if sync else nullcontext():  # type: ignore[operator]
                with self.rt.autocast():
                    loss = self.objective.loss(self.model, batch)
                loss = loss / accum
                self.scaler.scale(loss).backward()
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
        self.progress.add_step(time.perf_counter() - t0, batch_time)
        return float(total)

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (float16) and clip to --grad_clip; returns the total gradient norm, measured even without
        clipping (a factor min(1, inf / norm) = 1 leaves the gradients bit for bit as they are)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)

    def step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether to take the optimizer step (`unmask.training.state.step_is_finite`: on every rank)."""
        return state.step_is_finite(loss, grad_norm, self.scaler.is_enabled(), self.rt)

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
        """Every log_interval iterations: loss, smoothed ms/iter, tokens/s, MFU (known peak only), ETA."""
        cfg = self.cfg
        if self.iter_num % cfg.log_interval and self.iter_num != cfg.max_iters:
            return
        step_s, batch_share = self.progress.close_interval()
        line, record = self.progress.report(
            Interval(self.iter_num, cfg.max_iters, cfg.eval_interval, self.epochs, loss, self.step_lr),
            step_s,
            batch_share,
            self.chars_per_iter / step_s,
            self.mfu(step_s),
            self.objective.hooks.log_fields(),
        )
        self.log.print(line)
        self.log.record("train", record)

    def mfu(self, step_s: float) -> float | None:
        """Model FLOPs utilisation (nanoGPT's estimate: PaLM's 6N + 12 L T C FLOPs per token) against the
        device's peak; None where the peak is unknown (CPUs)."""
        peak = peak_flops(self.rt.device, self.rt.dtype)
        if peak is None:
            return None
        flops = self.raw_model.flops_per_token(self.cfg.block_size) * self.chars_per_iter / self.rt.world_size
        return flops / step_s / peak

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (index = rank): each rank draws its own data and masks."""
        own = state.rank_rng_state(self.rt.device, self.data_gen, self.mask_gen, self.objective.rank_state())
        return state.gather_rank_states(self.rt, own)

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iter_num,
            "run_id": self.run_id,
            "seq": self.seq,
            "last_eval_iter": self.last_eval_iter,
            "nonfinite_steps": self.nonfinite_steps,
            "train_chars_seen": self.train_chars_seen,
            "best_val_loss": self.best_val_loss,
            **self.objective.state_dict(),
            "rng": rng,
            "model_config": dict(self.model_config.__dict__),
            "vocab": list(self.vocab.itos),
            "task": self.objective.task_record(self.model_config.head),
            "config": self.cfg.to_dict(),
            "versions": environment_record()["versions"],
        }

    def load_state_dict(self, ckpt: dict[str, Any], path: Path) -> None:
        saved_vocab = ckpt.get("vocab")
        if saved_vocab is not None and list(saved_vocab) != list(self.vocab.itos):
            raise UserError(f"{path}: the checkpoint's vocabulary differs from {self.cfg.dataset}'s meta.json")
        state.check_architecture(self.cfg, ckpt["model_config"], path)
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num = int(ckpt["iter_num"])
        # Written right after this iteration's evaluation, or (stopped by a signal) possibly before a due one.
        self.last_eval_iter = int(ckpt.get("last_eval_iter", self.iter_num))
        # A resumed run starts a fresh count: the checkpoint's streak ended with the stop that wrote it.
        self.nonfinite_steps = 0
        # Checkpoints from before epochs were tracked: every step so far had this run's batch shape.
        self.train_chars_seen = int(ckpt.get("train_chars_seen", self.iter_num * self.chars_per_iter))
        self.best_val_loss = float(ckpt["best_val_loss"])
        rng = state.own_rank_state(ckpt, self.rt, path)
        self.objective.load_state(ckpt, rng, self.iter_num, self.epochs, path)
        state.restore_rng_state(rng, self.rt.device, self.data_gen, self.mask_gen)
