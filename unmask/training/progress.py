"""Progress of a training run: step timings over a log interval, the smoothed ms/iter, tokens/s, MFU and the ETA
that the log line and metrics.jsonl report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.runtime import Runtime


@dataclass(frozen=True)
class Interval:
    """Where a log line stands: the iteration, the run's length, the epoch, the step's loss and learning rate."""

    iter_num: int
    max_iters: int
    eval_interval: int
    epochs: float
    loss: float
    lr: float  # the effective learning rate of the step just taken (schedule x stage lr_factor)


@dataclass
class Progress:
    step_times: list[float] = field(default_factory=list)  # seconds of each step since the last log line
    batch_times: list[float] = field(default_factory=list)  # of which making the batch (`objective.batch`)
    ms_per_iter: float | None = None  # smoothed over log intervals, for the ETA
    eval_seconds: float = 0.0  # the last evaluation's wall time, for the ETA
    started: float = field(default_factory=time.time)

    def add_step(self, seconds: float, batch_seconds: float) -> None:
        self.step_times.append(seconds)
        self.batch_times.append(batch_seconds)

    def close_interval(self) -> tuple[float, float]:
        """(mean seconds per step, share of it spent making batches) of the interval, which starts afresh; the
        smoothed ms/iter takes the interval in (an exponential average, as nanoGPT smooths its MFU)."""
        step_s = sum(self.step_times) / len(self.step_times)
        batch_share = sum(self.batch_times) / sum(self.step_times)
        ms = 1000 * step_s
        self.ms_per_iter = ms if self.ms_per_iter is None else 0.9 * self.ms_per_iter + 0.1 * ms
        self.step_times.clear()
        self.batch_times.clear()
        return step_s, batch_share

    def eta_seconds(self, iter_num: int, max_iters: int, eval_interval: int) -> float:
        """Remaining iterations at the smoothed step time, plus the remaining evaluations at the last one's time."""
        left = max(0, max_iters - iter_num)
        evals = left // eval_interval + 1
        return left * (self.ms_per_iter or 0.0) / 1000 + evals * self.eval_seconds

    def report(
        self,
        at: Interval,
        step_s: float,
        batch_share: float,
        tokens_per_s: float,
        mfu: float | None,
        fields: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """The log line and the metrics.jsonl record of a closed interval."""
        eta = self.eta_seconds(at.iter_num, at.max_iters, at.eval_interval)
        line = (
            f"iter {at.iter_num}/{at.max_iters}: loss {at.loss:.4f}, {self.ms_per_iter:.2f}ms/iter, "
            f"{tokens_per_s:,.0f} tok/s"
            + (f", mfu {100 * mfu:.1f}%" if mfu is not None else "")
            + f", eta {duration(eta)}, batch+mask {100 * batch_share:.1f}%, lr {at.lr:.6f}"
            + "".join(f", {k} {v}" for k, v in fields.items())
            + f", epochs {at.epochs:.3f}"
        )
        record: dict[str, Any] = {
            "iter": at.iter_num,
            "epochs": at.epochs,
            "train_loss_step": at.loss,
            "lr": at.lr,
            "ms_per_iter": 1000 * step_s,
            "ms_per_iter_smoothed": self.ms_per_iter,
            "tokens_per_s": tokens_per_s,
            "batch_share": batch_share,
            "eta_s": eta,
            **fields,
        }
        if mfu is not None:
            record["mfu"] = mfu
        return line, record

    def elapsed(self) -> float:
        return time.time() - self.started


def duration(seconds: float) -> str:
    """h:mm:ss."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def banner(n_params: int, n_chars: int, rt: Runtime, chars_per_iter: int) -> str:
    """The run's first line: parameters, vocabulary, device, dtype, threads (on a CPU), world size, tokens."""
    threads = torch.get_num_threads()  # --threads, or what its default chose: it decides CPU speed
    cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if rt.device.type == "cpu" else ""
    return (
        f"unmask: {n_params:,} parameters, vocabulary {n_chars} characters + [MASK], "
        f"{rt.device} {str(rt.dtype).removeprefix('torch.')}{cpu_threads}, world size {rt.world_size}, "
        f"{chars_per_iter:,} tokens per iteration"
    )


def summary_line(
    iter_num: int, seconds: float, best: dict[str, tuple[float, int]], checkpoint: Path | None, sample: bool
) -> str:
    """Best val loss / val_bpc with their iterations, wall time, the newest checkpoint, the command to sample."""
    parts = [f"done: {iter_num} iterations in {seconds:.1f} s"]
    for key, (value, it) in best.items():
        parts.append(f"best {key.replace('_', ' ')} {value:.4f} (iter {it})")
    if checkpoint is not None:
        parts.append(f"checkpoint {checkpoint}")
        if sample:
            parts.append(f"sample with: unmask sample --ckpt={checkpoint}")
    return "; ".join(parts)
