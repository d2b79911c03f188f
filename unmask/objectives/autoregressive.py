"""The `autoregressive` objective: causal attention and next-character targets on windows of block_size + 1
characters: the nanoGPT baseline, trained and scored (exact NLL) by the same code as the diffusion objectives."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unmask.objectives.base import LanguageModel, RunInputs, char_cross_entropy, drops_mask_logit
from unmask.training import validation


def autoregressive_loss(model: torch.nn.Module, windows: Tensor, mask_id: int | None = None) -> Tensor:
    """Mean next-character cross-entropy: windows (B, T + 1) -> inputs [:, :-1], targets [:, 1:].

    With `mask_id` the [MASK] logit is dropped from the softmax (zero-masking): [MASK] is never a target.
    """
    logits = model(windows[:, :-1])  # (B, T, V)
    return char_cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), mask_id)


class Autoregressive(LanguageModel[Tensor]):
    """Causal attention, next-character cross-entropy on windows of block_size + 1; scored by exact NLL. A batch
    is the clean windows (B, block_size + 1): nothing is masked."""

    causal = True
    params = ("zero_masking",)

    @property
    def zero_masking(self) -> bool:
        """Off unless --zero_masking=True: with it the model learned its order-2 structure later (docs/likelihood.md,
        "Zero-masking per objective": the [MASK] entry of the normaliser speeds early training up)."""
        return drops_mask_logit(self.cfg, default=False)

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.val_windows = self.fixed_val_windows()  # block_size + 1 characters, scored by exact NLL

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> Tensor:
        return self.clean_windows(data_gen)

    def loss(self, model: torch.nn.Module, batch: Tensor) -> Tensor:
        return autoregressive_loss(model, batch, self.vocab.mask_id if self.zero_masking else None)

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        return validation.autoregressive_val(
            model, self.val_windows, self.vocab.mask_id, cfg.batch_size, self.rt, self.zero_masking
        )

    def start_lines(self, resumed_at: int | None) -> list[str]:
        n, width = len(self.val_windows), self.cfg.block_size + 1
        return [
            *super().start_lines(resumed_at),
            f"Validation set: {n} windows of {width} characters (seed 42), {self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        return [f"  val bpc: {m['val_bpc']:.4f} (exact NLL), epochs {m['epochs']:.3f}"]
