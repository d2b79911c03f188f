"""The learning-rate schedule: a pure function of the iteration and the current stage's window.

The learning rate needs no state of its own, so a resumed run recomputes it exactly.
"""

from __future__ import annotations

import math

from unmask.config.train_config import TrainConfig


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
