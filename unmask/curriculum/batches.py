"""Training and validation batches: clean windows from a split, corrupted stage by stage.

Windows are gathered on the CPU with a CPU generator (the data position), then moved to the training device and
masked there with a device generator, so masking never round-trips through the host. Both generators are saved
in checkpoints; nothing here touches the global RNG.

Which positions a stage selects does not depend on the characters, only on the row length and the generator,
and the sticky process costs about the same for 256 rows as for 4 (it is a few rounds of small tensor ops).
`SelectionPool` therefore draws selections in blocks of many rows and hands them out a batch at a time
(measured: about 10x less masking time per row at block 64). Checkpoints save the rows not handed out yet
(`state` / `load_state`), so a resumed run draws exactly the selections the uninterrupted one would, and
evaluations need not touch the pool: how often a run evaluates does not change its training batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unmask.curriculum.stages import Stage
from unmask.data.dataset import sample_windows


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) corrupted model input
    y: torch.Tensor  # (B, T) clean character ids
    selected: torch.Tensor  # (B, T) bool, the positions the loss is computed on
    stage_ids: torch.Tensor  # (B,) the stage each row was masked with

    def __len__(self) -> int:
        return int(self.x.shape[0])


class SelectionPool:
    """Pre-drawn selections (rows of bool (T,)) per stage, refilled `rows` at a time from one generator."""

    def __init__(self, stages: tuple[Stage, ...], T: int, generator: torch.Generator, rows: int = 256) -> None:
        self.stages, self.T, self.generator, self.rows = stages, T, generator, rows
        self.flush()

    def flush(self) -> None:
        """Drop every pre-drawn row."""
        self.buffers: list[torch.Tensor | None] = [None] * len(self.stages)
        self.cursors = [0] * len(self.stages)

    def state(self) -> list[torch.Tensor | None]:
        """The rows not handed out yet, per stage: saved when a run stops between evaluations (preemption)."""
        return [None if b is None else b[c:].clone() for b, c in zip(self.buffers, self.cursors, strict=True)]

    def load_state(self, rows: list[torch.Tensor | None]) -> None:
        if len(rows) != len(self.stages):
            raise ValueError(f"pool state has {len(rows)} stages, the run {len(self.stages)}")
        self.buffers = [None if r is None else r.to(self.generator.device) for r in rows]
        self.cursors = [0] * len(self.stages)

    def take(self, i: int, n: int) -> torch.Tensor:
        """The next `n` selections (n, T) of stage `i`; a block that cannot supply them all is replaced."""
        buffer, cursor = self.buffers[i], self.cursors[i]
        if buffer is None or cursor + n > len(buffer):
            buffer, cursor = self.stages[i].select(max(self.rows, n), self.T, self.generator), 0
            self.buffers[i] = buffer
        self.cursors[i] = cursor + n
        return buffer[cursor : cursor + n]


def corrupt_by_stage(
    clean: torch.Tensor,
    counts: list[int],
    stages: tuple[Stage, ...],
    mask_id: int,
    n_chars: int,
    generator: torch.Generator,
    pool: SelectionPool | None = None,
) -> Batch:
    """Mask consecutive row slices of `clean` (B, T) with stage i for counts[i] rows each (sum(counts) == B).

    Selections come from `pool` when given, else are drawn directly from `generator`.
    """
    xs, selecteds, ids = [], [], []
    start = 0
    for i, (stage, n) in enumerate(zip(stages, counts, strict=True)):
        if n == 0:
            continue
        rows = clean[start : start + n]
        selected = pool.take(i, n) if pool is not None else stage.select(n, clean.shape[1], generator)
        x = stage.corrupt(rows, selected, mask_id, n_chars, generator)
        xs.append(x)
        selecteds.append(selected)
        ids.append(torch.full((n,), i, dtype=torch.long, device=clean.device))
        start += n
    return Batch(torch.cat(xs), clean, torch.cat(selecteds), torch.cat(ids))


class BatchSource:
    """Clean windows of one split, delivered on the training device."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, device: torch.device, paragraphs: np.ndarray | None = None
    ) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.device = device
        self.paragraphs = paragraphs

    def clean(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, T) int64 windows on the device; `generator` is a CPU generator (the data position)."""
        x = sample_windows(self.tokens, self.block_size, batch_size, generator, self.paragraphs)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def batch(
        self,
        counts: list[int],
        stages: tuple[Stage, ...],
        mask_id: int,
        n_chars: int,
        data_generator: torch.Generator,
        mask_generator: torch.Generator,
        pool: SelectionPool | None = None,
    ) -> Batch:
        clean = self.clean(sum(counts), data_generator)
        return corrupt_by_stage(clean, counts, stages, mask_id, n_chars, mask_generator, pool)
