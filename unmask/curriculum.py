"""The stage curriculum: which stages feed the training batch, and when to advance.

Rules (the original framework's, with its DDP bug fixed: seed_system.md §2, §10.15):
after each evaluation, if the overall validation loss is not strictly below the current stage's best, the stale
count grows; when it reaches the stage's `val_loss_stale_count` the curriculum advances to the next stage (stale
count reset, stage best reset to +inf so the first evaluation of a new stage counts as an improvement). At the
last stage training simply goes on. The decision is a pure function of the validation loss, which is all-reduced
before it gets here, so every DDP rank takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from unmask.stages import Stage


@dataclass
class CurriculumState:
    stage: int = 0
    stale_count: int = 0
    best_stage_val_loss: float = math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurriculumState:
        return cls(int(d["stage"]), int(d["stale_count"]), float(d["best_stage_val_loss"]))


def split_evenly(n: int, k: int) -> list[int]:
    """`n` items over `k` groups as evenly as possible, the remainder going to the earliest groups."""
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


class Curriculum:
    def __init__(
        self, stages: tuple[Stage, ...], use_all_stages: bool = False, state: CurriculumState | None = None
    ) -> None:
        self.stages = stages
        self.use_all_stages = use_all_stages
        self.state = state or CurriculumState()

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

    def update(self, val_loss: float) -> str:
        """Apply one evaluation's overall validation loss; returns the console line describing the decision."""
        s = self.state
        limit = self.current.val_loss_stale_count
        if val_loss < s.best_stage_val_loss:
            s.best_stage_val_loss = val_loss
            s.stale_count = 0
            return f"  Stage {s.stage}: New best val loss {val_loss:.4f}, reset stale count to 0"
        s.stale_count += 1
        if s.stale_count < limit:
            return f"  Stage {s.stage}: Val loss stale count {s.stale_count}/{limit}"
        if self.is_last:
            return f"  Stage {s.stage}: Val loss stale count {s.stale_count}/{limit} (final stage, continuing training)"
        s.stage += 1
        s.stale_count = 0
        s.best_stage_val_loss = math.inf
        return (
            f"*** ADVANCING TO STAGE {s.stage} ({self.current.type}): {self.current.params()} "
            f"after {limit} evaluations without improvement ***"
        )
