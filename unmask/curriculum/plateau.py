"""The stage curriculum: which stages feed the training batch, and when to advance.

Rules (the original framework's, with its DDP bug fixed: docs/origin.md §1.6, §2.6):
after each evaluation, if the overall validation loss is not strictly below the current stage's best, the stale
count grows; when it reaches the stage's `val_loss_stale_count` the curriculum advances to the next stage (stale
count reset, stage best reset to +inf so the first evaluation of a new stage counts as an improvement). At the
last stage training simply goes on.

Stages may also last a duration (the parameter guide's epoch-based stages): `epochs` (training characters seen
during the stage / training characters available) or `iters` optimizer steps, both multiplied by
`--stage_duration_scale`. The duration is checked before every iteration, not only at evaluations, so a stage
given in iterations ends exactly on time; whichever of stale count and duration comes first ends the stage. A
final stage whose duration is over ends training.

Every decision is a pure function of the all-reduced validation loss, the iteration and the epochs seen (the same
on every rank), so every DDP rank takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from unmask.curriculum.stages import Stage

# Epoch durations are compared with this slack: the epochs seen are a ratio of integers, and a stage of 0.3 epochs
# must not need one extra iteration because 0.3 is not exact in binary.
_EPOCH_TOLERANCE = 1e-9


@dataclass
class CurriculumState:
    stage: int = 0
    stale_count: int = 0
    best_stage_val_loss: float = math.inf
    stage_start_iter: int = 0
    """Iteration at which the current stage started."""
    stage_start_epochs: float = 0.0
    """Epochs seen when the current stage started."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], iteration: int = 0, epochs: float = 0.0) -> CurriculumState:
        """Read a checkpoint's curriculum state. Checkpoints written before stages had durations lack the stage
        start: the current stage then counts as started at `iteration` / `epochs` (the resume point)."""
        return cls(
            int(d["stage"]),
            int(d["stale_count"]),
            float(d["best_stage_val_loss"]),
            int(d.get("stage_start_iter", iteration)),
            float(d.get("stage_start_epochs", epochs)),
        )


def split_evenly(n: int, k: int) -> list[int]:
    """`n` items over `k` groups as evenly as possible, the remainder going to the earliest groups."""
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


class Curriculum:
    def __init__(
        self,
        stages: tuple[Stage, ...],
        use_all_stages: bool = False,
        state: CurriculumState | None = None,
        duration_scale: float = 1.0,
        iters_per_epoch: float | None = None,
    ) -> None:
        """`duration_scale` multiplies every stage's epochs/iters; `iters_per_epoch` (training characters available
        / characters per iteration) converts epochs to iterations for the learning-rate schedule."""
        self.stages = stages
        self.use_all_stages = use_all_stages
        self.state = state or CurriculumState()
        self.duration_scale = duration_scale
        self.iters_per_epoch = iters_per_epoch

    @property
    def current(self) -> Stage:
        return self.stages[self.state.stage]

    @property
    def is_last(self) -> bool:
        return self.state.stage == len(self.stages) - 1

    def training_mix(self, batch_size: int) -> list[int]:
        """Rows of a training batch per stage: even over stages 0..current (or all stages), earliest first."""
        active = len(self.stages) if self.use_all_stages else self.state.stage + 1
        counts = split_evenly(batch_size, active)
        return counts + [0] * (len(self.stages) - active)

    # --- durations ---------------------------------------------------------------------------------------------

    def stage_epochs(self, i: int) -> float | None:
        """Stage `i`'s duration in epochs after scaling (None: no epoch limit)."""
        epochs = self.stages[i].epochs
        return None if epochs is None else epochs * self.duration_scale

    def stage_iters(self, i: int) -> int | None:
        """Stage `i`'s duration in iterations after scaling (None: no iteration limit); at least one."""
        iters = self.stages[i].iters
        return None if iters is None else max(1, round(iters * self.duration_scale))

    def stage_length(self, i: int) -> int | None:
        """Iterations stage `i` lasts at most: its iteration limit or its epochs converted at `iters_per_epoch`
        (the smaller), None if it has neither (it then ends by stale count, or never)."""
        lengths = []
        iters, epochs = self.stage_iters(i), self.stage_epochs(i)
        if iters is not None:
            lengths.append(iters)
        if epochs is not None and self.iters_per_epoch is not None:
            lengths.append(max(1, math.ceil((epochs - _EPOCH_TOLERANCE) * self.iters_per_epoch)))
        return min(lengths) if lengths else None

    def describe_duration(self, i: int) -> str:
        """Stage `i`'s duration keys for the console, with the scaled duration, e.g. ``epochs=50, lr_factor=0.8
        (x0.01: 0.5 epochs, at most 123 iterations)``."""
        text = self.stages[i].duration()
        length = self.stage_length(i)
        if length is None:
            return text
        parts = [f"at most {length:,} iterations"]
        if self.duration_scale == 1.0:
            return f"{text} ({parts[0]})"
        if (epochs := self.stage_epochs(i)) is not None:
            parts.insert(0, f"{epochs:.4g} epochs")
        return f"{text} (x{self.duration_scale:g}: {', '.join(parts)})"

    def stage_end_iter(self) -> int | None:
        """Iteration at which the current stage's duration runs out (None: it has no duration)."""
        length = self.stage_length(self.state.stage)
        return None if length is None else self.state.stage_start_iter + length

    def duration_over(self, iteration: int, epochs: float) -> str | None:
        """Why the current stage's duration is over at `iteration` with `epochs` seen (None: it is not)."""
        s, i = self.state, self.state.stage
        iters, stage_epochs = self.stage_iters(i), self.stage_epochs(i)
        done_iters = iteration - s.stage_start_iter
        done_epochs = epochs - s.stage_start_epochs
        if iters is not None and done_iters >= iters:
            return f"{done_iters} iterations"
        if stage_epochs is not None and done_epochs >= stage_epochs - _EPOCH_TOLERANCE:
            return f"{done_epochs:.4g} epochs ({done_iters} iterations)"
        return None

    def progress(self, iteration: int, epochs: float) -> str:
        """The current stage's elapsed duration for the console, e.g. ``epochs 1.20/1.50`` ('' without one)."""
        s, i = self.state, self.state.stage
        parts = []
        if (stage_epochs := self.stage_epochs(i)) is not None:
            parts.append(f"stage epochs {epochs - s.stage_start_epochs:.3f}/{stage_epochs:.3f}")
        if (iters := self.stage_iters(i)) is not None:
            parts.append(f"stage iters {iteration - s.stage_start_iter}/{iters}")
        return ", ".join(parts)

    def finished(self, iteration: int, epochs: float) -> bool:
        """True once the final stage has lasted its duration: training ends there."""
        return self.is_last and self.duration_over(iteration, epochs) is not None

    # --- decisions ---------------------------------------------------------------------------------------------

    def _advance(self, iteration: int, epochs: float) -> None:
        s = self.state
        s.stage += 1
        s.stale_count = 0
        s.best_stage_val_loss = math.inf
        s.stage_start_iter = iteration
        s.stage_start_epochs = epochs

    def _advancing(self, reason: str) -> str:
        return f"*** ADVANCING TO STAGE {self.state.stage} ({self.current.type}): {self.current.params()} {reason} ***"

    def advance_by_duration(self, iteration: int, epochs: float) -> str | None:
        """Before each iteration: start the next stage if the current one has lasted its duration; returns the
        console line, or None when nothing changes (the final stage never advances)."""
        if self.is_last:
            return None
        reason = self.duration_over(iteration, epochs)
        if reason is None:
            return None
        self._advance(iteration, epochs)
        return self._advancing(f"at iteration {iteration}, after {reason}")

    def update(self, val_loss: float, iteration: int = 0, epochs: float = 0.0) -> str:
        """Apply one evaluation's overall validation loss (at `iteration`, `epochs` seen); returns the console line
        describing the decision."""
        s = self.state
        limit = self.current.val_loss_stale_count
        if val_loss < s.best_stage_val_loss:
            s.best_stage_val_loss = val_loss
            s.stale_count = 0
            return f"  Stage {s.stage}: New best val loss {val_loss:.4f}, reset stale count to 0"
        s.stale_count += 1
        if limit is None:
            return f"  Stage {s.stage}: Val loss stale count {s.stale_count} (the stage ends by its duration)"
        if s.stale_count < limit:
            return f"  Stage {s.stage}: Val loss stale count {s.stale_count}/{limit}"
        if self.is_last:
            return f"  Stage {s.stage}: Val loss stale count {s.stale_count}/{limit} (final stage, continuing training)"
        self._advance(iteration, epochs)
        return self._advancing(f"after {limit} evaluations without improvement")
