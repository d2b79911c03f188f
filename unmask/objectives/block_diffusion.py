"""The `block_diffusion` objective: masked diffusion inside blocks of K characters, autoregressive across blocks
(Arriola et al. 2025, BD3-LM). Its masks, loss and bound are in `unmask.likelihood.block`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unmask.likelihood.block import block_diffusion_weighted_loss, sample_block_training_masks
from unmask.likelihood.self_condition import draw_self_condition
from unmask.objectives.base import LanguageModel, RunInputs
from unmask.training import validation


@dataclass
class BlockBatch:
    """Clean windows (B, L) with their block masks drawn: selected (B, L) bool, weight (B, L) float32, and whether
    the loss self-conditions (`unmask.objectives.self_condition`)."""

    clean: Tensor
    selected: Tensor
    weight: Tensor
    self_condition: bool = False


class BlockDiffusion(LanguageModel[BlockBatch]):
    """Masked diffusion inside blocks of K characters, autoregressive across blocks (`unmask.likelihood.block`):
    one forward pass over [noisy ; clean] per micro-batch; validated by the block negative ELBO."""

    params = ("diffusion_block", "mask_rate_window", "elbo_draws")
    length_flag = "diffusion_block"
    run_only_flags = ("diffusion_block", "mask_rate_window")

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.val_windows = self.fixed_val_windows()  # scored by the block NELBO

    def model_fields(self) -> dict[str, Any]:
        return {**super().model_fields(), "causal": False, "diffusion_block": self.cfg.diffusion_block}

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> BlockBatch:
        cfg = self.cfg
        windows = self.clean_windows(data_gen)
        # Evaluations' fresh batches integrate over the full (0, 1], like val_bpc, whatever the training window.
        window = cfg.mask_rate_window if training else (0.0, 1.0)
        K, estimator = cfg.diffusion_block, cfg.training_estimator
        selected, weight = sample_block_training_masks(windows, K, mask_gen, window, estimator)
        return BlockBatch(windows, selected, weight, draw_self_condition(cfg.self_conditioning, mask_gen, training))

    def loss(self, model: torch.nn.Module, batch: BlockBatch) -> Tensor:
        K, mask_id = self.cfg.diffusion_block, self.vocab.mask_id
        return block_diffusion_weighted_loss(
            model, batch.clean, batch.selected, batch.weight, mask_id, K, self_condition=batch.self_condition
        )

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        metrics = validation.block_diffusion_val_bpc(
            model, self.val_windows, self.vocab.mask_id, cfg.diffusion_block, cfg.elbo_draws, cfg.batch_size, self.rt
        )
        return {"val_loss": metrics["val_nats_per_char"], **metrics}

    def start_lines(self, resumed_at: int | None) -> list[str]:
        cfg = self.cfg
        return [
            *super().start_lines(resumed_at),
            f"block diffusion: blocks of {cfg.diffusion_block} characters, training estimator "
            f"{cfg.training_estimator}"
            + (
                f", mask rate t ~ U({cfg.mask_rate_window[0]}, {cfg.mask_rate_window[1]}]"
                if cfg.training_estimator == "antithetic_t"
                else ""
            ),
            f"Validation set: {len(self.val_windows)} windows of {cfg.block_size} characters (seed 42), "
            f"{self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        return [f"  val bpc: {m['val_bpc']:.4f} (block ELBO, K={self.cfg.diffusion_block}), epochs {m['epochs']:.3f}"]
