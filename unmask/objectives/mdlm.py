"""The `mdlm` objective: the continuous-time negative ELBO of masked diffusion with the linear schedule (Sahoo et al.
2024, MDLM; Shi et al. 2024, MD4), trained on clean windows with the antithetic-t or the exact-k estimator.

`draw_mdlm_batch` makes every random draw of a step (which positions are masked, and their weights);
`mdlm_batch_loss` is the weighted cross-entropy of a model on such a batch. `unmask.likelihood.elbo` derives
both estimators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unmask.curriculum.masking import random_k_subsets
from unmask.likelihood.estimators import bernoulli_masks, count_from_uniform, systematic_uniforms
from unmask.likelihood.self_condition import draw_self_condition, first_pass_input
from unmask.objectives.base import DiffusionModel, RunInputs, char_cross_entropy
from unmask.objectives.window_search import FULL_WINDOW, MaskRateWindow, Window

MDLM_ESTIMATORS = ("antithetic_t", "exact_k")


def sample_mdlm_batch(
    x: Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    mask_rate_window: tuple[float, float] = (0.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_masked (B, L), selected (B, L) bool, t (B,) float32) for the MDLM training loss.

    t_b = lo + (hi - lo) ((u + b / B) mod 1) with one u ~ U[0, 1) per batch, lo = max(LO, eps), hi = HI of
    `mask_rate_window` (LO, HI): every t_b is uniform on [lo, hi) and the batch puts exactly one t in each of B
    equal strata of the window (the low-discrepancy "antithetic" sampling of MDLM and MD4; with the full window,
    t in [eps, 1)). Then each position is masked with probability p_mask = t_b.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, L), got {tuple(x.shape)}")
    B, L = x.shape
    lo, hi = max(mask_rate_window[0], eps), mask_rate_window[1]
    if not lo < hi <= 1.0:
        raise ValueError(f"mask_rate_window={mask_rate_window} with eps={eps}: need max(LO, eps) < HI <= 1")
    t = lo + (hi - lo) * systematic_uniforms(B, generator)  # (B,)
    p_mask = t
    selected = bernoulli_masks(p_mask[:, None], (B, L), generator, torch.float32)  # (B, L)
    return x.masked_fill(selected, mask_id), selected, t


def sample_exact_k_batch(x: Tensor, mask_id: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_masked (B, L), selected (B, L) bool, k (B,) long) for the exact-k MDLM training loss.

    k_b = 1 + floor(L ((u + b / B) mod 1)) with one u ~ U[0, 1) per batch: every k_b is uniform on {1..L} and the
    batch is stratified over k as `sample_mdlm_batch` stratifies t; then a uniform k_b-subset of row b is masked.
    """
    B, L = x.shape
    k = count_from_uniform(systematic_uniforms(B, generator), L)  # (B,)
    selected = random_k_subsets(k, (B, L), generator)  # (B, L)
    return x.masked_fill(selected, mask_id), selected, k


@dataclass
class MDLMBatch:
    """Clean windows with their masks drawn: x (B, L) clean, x_masked (B, L), selected (B, L) bool, the weight
    of each row's masked cross-entropy (B,) float32, and whether the loss self-conditions
    (`unmask.objectives.self_condition`)."""

    x: Tensor
    x_masked: Tensor
    selected: Tensor
    weight: Tensor
    self_condition: bool = False


def draw_mdlm_batch(
    x: Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    estimator: str = "antithetic_t",
    mask_rate_window: tuple[float, float] = (0.0, 1.0),
) -> MDLMBatch:
    """The masks of the MDLM loss on clean x (B, L), from `generator`.

    `antithetic_t`: t stratified over the batch on [eps, 1), Bernoulli(t) masks, weight 1/t; the loss's expectation
    is (1 / (1 - eps)) int_eps^1 (1/t) E[f | t] dt / L, i.e. NELBO / L up to O(eps) (MDLM trains with eps = 1e-3 to
    keep the 1/t weight bounded). `exact_k`: k uniform in 1..L, a uniform k-subset masked, weight L/k: the same
    NELBO / L exactly, with t integrated out (Rao-Blackwellised, so its variance is never larger).
    `mask_rate_window` (antithetic_t only) clips t to the window (BD3-LM's clipped schedule; a biased objective).
    """
    if estimator not in MDLM_ESTIMATORS:
        raise ValueError(f"unknown MDLM estimator {estimator!r}; expected one of {', '.join(MDLM_ESTIMATORS)}")
    L = x.shape[1]
    if estimator == "exact_k":
        if tuple(mask_rate_window) != (0.0, 1.0):
            raise ValueError("exact_k draws mask counts: a mask-rate window does not apply")
        x_masked, selected, k = sample_exact_k_batch(x, mask_id, generator)
        weight = L / k.to(torch.float32)  # (B,)
    else:
        x_masked, selected, t = sample_mdlm_batch(x, mask_id, generator, eps, mask_rate_window)
        weight = 1.0 / t  # (B,): 1/t = -alpha'_t / (1 - alpha_t)
    return MDLMBatch(x, x_masked, selected, weight)


def mdlm_unit_losses(model: torch.nn.Module, batch: MDLMBatch, drop_id: int | None = None) -> Tensor:
    """Each row's term of `mdlm_batch_loss` (B,) float32: its weighted masked CE / L (their mean is the loss). The
    terms whose variance the mask-rate window search compares (`unmask.objectives.window_search`)."""
    B, L = batch.x.shape
    selected = batch.selected
    logits = model(batch.x_masked, positions=selected)  # (N, V)
    ce = char_cross_entropy(logits, batch.x[selected], drop_id, reduction="none")  # (N,)
    row = torch.arange(B, device=batch.x.device)[:, None].expand_as(selected)[selected]  # (N,)
    out = torch.zeros(B, dtype=torch.float32, device=batch.x.device)
    return out.index_add_(0, row, (ce * batch.weight[row]).float()) / L


def mdlm_batch_loss(
    model: torch.nn.Module, batch: MDLMBatch, drop_id: int | None = None, mask_id: int | None = None
) -> Tensor:
    """MDLM objective (scalar): mean over the batch of the weighted masked CE, divided by L (nats per character).
    `drop_id` (the [MASK] id under zero-masking) is left out of the softmax. A `batch.self_condition` batch feeds
    the prediction of a first no-grad pass (`mask_id`: the [MASK] id, dropped from it) to the trained pass."""
    B, L = batch.x.shape
    selected = batch.selected
    extra = {}
    if batch.self_condition:
        if mask_id is None:
            raise ValueError("a self-conditioned batch needs mask_id")
        extra["self_cond"] = first_pass_input(model, batch.x_masked, selected, mask_id)  # (B, L, V)
    logits = model(batch.x_masked, positions=selected, **extra)  # (N, V)
    ce = char_cross_entropy(logits, batch.x[selected], drop_id, reduction="none")  # (N,)
    row = torch.arange(B, device=batch.x.device)[:, None].expand_as(selected)[selected]  # (N,)
    return (ce * batch.weight[row]).sum() / (B * L)


def mdlm_loss(
    model: torch.nn.Module,
    x: Tensor,
    mask_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    estimator: str = "antithetic_t",
    zero_masking: bool = False,
) -> Tensor:
    """`mdlm_batch_loss` on masks drawn now (`draw_mdlm_batch`); `zero_masking` drops the [MASK] logit."""
    batch = draw_mdlm_batch(x, mask_id, generator, eps, estimator)
    return mdlm_batch_loss(model, batch, mask_id if zero_masking else None)


class MDLM(DiffusionModel[MDLMBatch]):
    """The continuous-time masked-diffusion ELBO on clean windows."""

    params = ("elbo_draws", "zero_masking", "mdlm_estimator", "mask_rate_window")
    run_only_flags = ("mask_rate_window",)

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.rate_window = MaskRateWindow(self.cfg, self.rt)
        self.hooks = self.rate_window.hooks

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> MDLMBatch:
        window = self.rate_window.current if training else FULL_WINDOW
        batch = self._draw(self.clean_windows(data_gen), mask_gen, window)
        batch.self_condition = draw_self_condition(self.cfg.self_conditioning, mask_gen, training)
        return batch

    def _draw(self, clean: Tensor, mask_gen: torch.Generator, window: Window) -> MDLMBatch:
        estimator = self.cfg.training_estimator
        return draw_mdlm_batch(clean, self.vocab.mask_id, mask_gen, estimator=estimator, mask_rate_window=window)

    def loss(self, model: torch.nn.Module, batch: MDLMBatch) -> Tensor:
        return mdlm_batch_loss(model, batch, self._drop_id, self.vocab.mask_id)

    @property
    def _drop_id(self) -> int | None:
        return self.vocab.mask_id if self.zero_masking else None

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        return super().validate(model) | self.rate_window.search(lambda window, j: self._search_units(model, window, j))

    def _search_units(self, model: torch.nn.Module, window: Window, j: int) -> Tensor:
        """The per-sequence loss terms of search batch j trained with `window` (`unmask.objectives.window_search`)."""
        clean, mask_gen = self.rate_window.search_batch(j, self.clean_windows)
        with self.rt.autocast():
            return mdlm_unit_losses(model, self._draw(clean, mask_gen, window), self._drop_id)

    def start_lines(self, resumed_at: int | None) -> list[str]:
        lines = super().start_lines(resumed_at)
        return lines + [self.rate_window.start_line()] if self.cfg.training_estimator == "antithetic_t" else lines

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        lines = super().report_lines(m)
        return lines[:1] + self.rate_window.report_lines(m) + lines[1:]

    def state_dict(self) -> dict[str, Any]:
        return self.rate_window.state_dict()

    def load_state(
        self, ckpt: dict[str, Any], rank_rng: dict[str, Any], iter_num: int, epochs: float, path: Path
    ) -> None:
        self.rate_window.load_state(ckpt)
