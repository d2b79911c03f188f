"""Training and validation batches: clean windows from a split, corrupted stage by stage.

Windows are gathered on the CPU with a CPU generator (the data position), then moved to the training device and
masked there with a device generator, so masking never round-trips through the host. Both generators are saved
in checkpoints; nothing here touches the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unmask.data import sample_windows
from unmask.stages import Stage


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) corrupted model input
    y: torch.Tensor  # (B, T) clean character ids
    selected: torch.Tensor  # (B, T) bool, the positions the loss is computed on
    stage_ids: torch.Tensor  # (B,) the stage each row was masked with

    def __len__(self) -> int:
        return int(self.x.shape[0])


def corrupt_by_stage(
    clean: torch.Tensor,
    counts: list[int],
    stages: tuple[Stage, ...],
    mask_id: int,
    n_chars: int,
    generator: torch.Generator,
) -> Batch:
    """Mask consecutive row slices of `clean` (B, T) with stage i for counts[i] rows each (sum(counts) == B)."""
    xs, selecteds, ids = [], [], []
    start = 0
    for i, (stage, n) in enumerate(zip(stages, counts, strict=True)):
        if n == 0:
            continue
        x, selected = stage.apply(clean[start : start + n], mask_id, n_chars, generator)
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
    ) -> Batch:
        return corrupt_by_stage(
            self.clean(sum(counts), data_generator), counts, stages, mask_id, n_chars, mask_generator
        )
