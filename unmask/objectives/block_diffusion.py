"""The `block_diffusion` objective: masked diffusion inside blocks of K characters, autoregressive across blocks
(Arriola et al. 2025, BD3-LM). Its masks, loss and bound are in `unmask.likelihood.block`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unmask.likelihood.block import block_diffusion_weighted_loss, block_unit_losses, sample_block_training_masks
from unmask.likelihood.self_condition import draw_self_condition
from unmask.objectives.base import LanguageModel, RunInputs, drops_mask_logit
from unmask.objectives.window_search import FULL_WINDOW, MaskRateWindow, Window
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

    params = ("diffusion_block", "mask_rate_window", "elbo_draws", "zero_masking")
    length_flag = "diffusion_block"
    run_only_flags = ("diffusion_block", "mask_rate_window")

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.val_windows = self.fixed_val_windows()  # scored by the block NELBO
        self.rate_window = MaskRateWindow(self.cfg, self.rt)
        self.hooks = self.rate_window.hooks

    @property
    def zero_masking(self) -> bool:
        """--zero_masking (default True): the training loss drops the [MASK] logit; val_bpc always does."""
        return drops_mask_logit(self.cfg, default=True)

    def model_fields(self) -> dict[str, Any]:
        return {**super().model_fields(), "causal": False, "diffusion_block": self.cfg.diffusion_block}

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> BlockBatch:
        # Evaluations' fresh batches integrate over the full (0, 1], like val_bpc, whatever the training window.
        window = self.rate_window.current if training else FULL_WINDOW
        batch = self._draw(self.clean_windows(data_gen), mask_gen, window)
        batch.self_condition = draw_self_condition(self.cfg.self_conditioning, mask_gen, training)
        return batch

    def _draw(self, clean: Tensor, mask_gen: torch.Generator, window: Window) -> BlockBatch:
        K, estimator = self.cfg.diffusion_block, self.cfg.training_estimator
        selected, weight = sample_block_training_masks(clean, K, mask_gen, window, estimator)
        return BlockBatch(clean, selected, weight)

    def loss(self, model: torch.nn.Module, batch: BlockBatch) -> Tensor:
        K, mask_id = self.cfg.diffusion_block, self.vocab.mask_id
        return block_diffusion_weighted_loss(
            model,
            batch.clean,
            batch.selected,
            batch.weight,
            mask_id,
            K,
            self.zero_masking,
            self_condition=batch.self_condition,
        )

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        metrics = validation.block_diffusion_val_bpc(
            model, self.val_windows, self.vocab.mask_id, cfg.diffusion_block, cfg.elbo_draws, cfg.batch_size, self.rt
        )
        search = self.rate_window.search(lambda window, j: self._search_units(model, window, j))
        return {"val_loss": metrics["val_nats_per_char"], **metrics, **search}

    def _search_units(self, model: torch.nn.Module, window: Window, j: int) -> Tensor:
        """The per-(sequence, block) loss terms of search batch j trained with `window`
        (`unmask.objectives.window_search`)."""
        clean, mask_gen = self.rate_window.search_batch(j, self.clean_windows)
        b = self._draw(clean, mask_gen, window)
        K, mask_id = self.cfg.diffusion_block, self.vocab.mask_id
        with self.rt.autocast():
            return block_unit_losses(model, b.clean, b.selected, b.weight, mask_id, K, self.zero_masking)

    def start_lines(self, resumed_at: int | None) -> list[str]:
        cfg = self.cfg
        antithetic = cfg.training_estimator == "antithetic_t"
        return [
            *super().start_lines(resumed_at),
            f"block diffusion: blocks of {cfg.diffusion_block} characters, training estimator "
            f"{cfg.training_estimator}" + (f", {self.rate_window.start_line()}" if antithetic else ""),
            f"Validation set: {len(self.val_windows)} windows of {cfg.block_size} characters (seed 42), "
            f"{self.windows_note()}",
        ]

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        return [
            f"  val bpc: {m['val_bpc']:.4f} (block ELBO, K={self.cfg.diffusion_block}), epochs {m['epochs']:.3f}",
            *self.rate_window.report_lines(m),
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.rate_window.state_dict()

    def load_state(
        self, ckpt: dict[str, Any], rank_rng: dict[str, Any], iter_num: int, epochs: float, path: Path
    ) -> None:
        self.rate_window.load_state(ckpt)
