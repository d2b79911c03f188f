"""The training mask-rate window of mdlm and block_diffusion (`--mask_rate_window`), and BD3-LM's search for it.

A window (LO, HI] clips the training mask rate t (BD3-LM's "clipped" noise schedule, Arriola et al. 2025, section 4):
the 1/t-weighted loss of a very lightly masked sequence or block is the largest source of the estimator's variance,
so training on t in a narrower window trades a (small) bias of the training objective for a lower gradient variance.
Evaluation always integrates t over the full (0, 1]: val_bpc stays a bound.

`--mask_rate_window=auto` chooses the window as BD3-LM does (its `_clipped_schedule_search`): for every window of a
grid (the full one, and every window of width 0.5, 0.6, ..., 0.9 starting at 0, 0.05, 0.1, ...), the training loss
is computed on the same batches, and the window whose loss terms vary least is kept. The variance is BD3-LM's: per
batch, the sample variance of the loss's terms (one per sequence for mdlm, one per (sequence, block) for block
diffusion: the weighted masked negative log-likelihoods summed over the sequence or block, divided by its length,
whose mean is the batch's training loss), averaged over the batches. Every window sees the same clean windows and
the same uniform draws (a generator re-seeded per batch: common random numbers, so the windows differ only by
where t lands), drawn from a generator of their own so the run's training streams are not touched and a resumed run
searches exactly as an uninterrupted one.

When: at the first evaluation after iteration 0 (an untrained model's losses say nothing about the training to
come; BD3-LM likewise skips its sanity-check validation), then at the first evaluation at or after twice the
iteration of the previous search (e.g. 200, 400, 800, ... with --eval_interval=200). BD3-LM searches at every
validation, but a search costs 36 x --eval_iters forward passes, about as much as --eval_interval=200 training
steps of a small model (measured in docs/likelihood.md), so searching at every evaluation would double a run's cost,
while the doubling schedule costs a few per cent of a long run and still follows the model as it trains. Until the
first search the run trains on the full window. The chosen window and the iteration of its search are checkpointed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unmask.config.train_config import TrainConfig
from unmask.objectives.base import TrainingHooks
from unmask.runtime import Runtime

Window = tuple[float, float]
FULL_WINDOW: Window = (0.0, 1.0)
SEARCH_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)  # BD3-LM's `clip_search_widths` of its LM1B and OpenWebText runs
SEARCH_STEP = 0.05  # BD3-LM's `clip_search_delta`
_SEARCH_SEED_OFFSET = 104_729  # the search's own generators: apart from the training and evaluation seeds
CHECKPOINT_KEY = "mask_rate_window_chosen"
SEARCHED_AT_KEY = "mask_rate_window_searched_at"


def candidate_windows(widths: Sequence[float] = SEARCH_WIDTHS, step: float = SEARCH_STEP) -> list[Window]:
    """The full window, then for each width every window (lo, lo + width) with lo = 0, step, 2 step, ... <= 1 - width
    (36 windows with the defaults)."""
    out = [FULL_WINDOW]
    for width in widths:
        for i in range(round((1.0 - width) / step) + 1):
            lo = round(i * step, 6)
            window = (lo, round(lo + width, 6))
            if window not in out and window[1] <= 1.0:
                out.append(window)
    return out


@dataclass
class SearchResult:
    """The window of least variance, its variance and the full window's, every window's, and the seconds taken."""

    window: Window
    variance: float
    full_variance: float
    variances: dict[Window, float]
    seconds: float


def search_window(
    unit_losses: Callable[[Window, int], Tensor],
    n_batches: int,
    windows: Sequence[Window],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> SearchResult:
    """The window of `windows` (the full window first) whose loss terms vary least.

    `unit_losses(window, j)`: the loss terms (1-D) of batch j trained with `window`; per window, the mean over the
    n_batches batches of their sample variance. `reduce` (e.g. the mean over DDP ranks) makes every rank decide
    alike. Ties and non-finite variances go to the earlier window.
    """
    if n_batches < 1 or not windows:
        raise ValueError(f"need n_batches >= 1 and at least one window (got {n_batches}, {len(windows)})")
    t0 = time.perf_counter()
    sums: Tensor | None = None
    for j in range(n_batches):
        per_window = torch.stack([unit_losses(w, j).double().var() for w in windows])  # (W,)
        sums = per_window if sums is None else sums + per_window
    assert sums is not None
    variances = sums / n_batches
    if reduce is not None:
        variances = reduce(variances)
    ranked = torch.where(torch.isfinite(variances), variances, torch.inf)
    best = int(torch.argmin(ranked))  # the first of equal minima
    values = [float(v) for v in variances.cpu()]
    full = values[list(windows).index(FULL_WINDOW)] if FULL_WINDOW in windows else float("nan")
    by_window = dict(zip(windows, values, strict=True))
    return SearchResult(windows[best], values[best], full, by_window, time.perf_counter() - t0)


class MaskRateWindow:
    """The training window of one run: --mask_rate_window, or with 'auto' the latest search's choice (the full
    window before the first). `hooks` tells it the iteration; the objective runs `search` from its `validate`."""

    def __init__(self, cfg: TrainConfig, rt: Runtime) -> None:
        self.auto = cfg.mask_rate_window == "auto"
        self.current: Window = cfg.fixed_mask_rate_window
        self.seed = cfg.seed + _SEARCH_SEED_OFFSET + rt.rank
        self.n_batches = cfg.eval_iters
        self.rt = rt
        self.iter_num = 0
        self.searched_at = 0  # the iteration of the latest search (0: none yet)
        self.hooks = WindowHooks(self)
        self._cleans: dict[int, Tensor] = {}  # the clean windows of the search batches, during a search

    @property
    def due(self) -> bool:
        """Whether this evaluation searches: 'auto', training has begun, and no search yet or the iteration has at
        least doubled since the last one."""
        return self.auto and self.iter_num > 0 and (self.searched_at == 0 or self.iter_num >= 2 * self.searched_at)

    def search_batch(
        self, j: int, clean_windows: Callable[[torch.Generator], Tensor]
    ) -> tuple[Tensor, torch.Generator]:
        """(clean windows, mask generator) of search batch j: the same at every search and in every run of this seed,
        and for every window (the clean windows drawn once, the mask generator seeded afresh at each call)."""
        seed = self.seed + 7919 * j
        if j not in self._cleans:
            self._cleans[j] = clean_windows(torch.Generator().manual_seed(seed))
        return self._cleans[j], torch.Generator(device=self.rt.device).manual_seed(seed)

    def search(self, unit_losses: Callable[[Window, int], Tensor]) -> dict[str, Any]:
        """Search (when due), train on its choice from now on; the evaluation record's fields."""
        if not self.auto:
            return {}
        fields: dict[str, Any] = {}
        if self.due:
            rt = self.rt
            self._cleans.clear()
            try:
                result = search_window(
                    unit_losses, self.n_batches, candidate_windows(), lambda v: rt.all_reduce_sum(v) / rt.world_size
                )
            finally:
                self._cleans.clear()
            self.current, self.searched_at = result.window, self.iter_num
            fields = {
                "mask_rate_window_variance_full": result.full_variance,
                "mask_rate_window_variance": result.variance,
                "mask_rate_window_search_seconds": result.seconds,
            }
        return {"mask_rate_window": list(self.current), **fields}

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        if "mask_rate_window_variance" not in m:
            return []
        lo, hi = m["mask_rate_window"]
        return [
            f"  mask rate window: ({lo:g}, {hi:g}] by variance search: loss-term variance "
            f"{m['mask_rate_window_variance_full']:.4g} on (0, 1] -> {m['mask_rate_window_variance']:.4g} "
            f"({m['mask_rate_window_search_seconds']:.1f} s)"
        ]

    def start_line(self) -> str:
        if self.auto:
            lo, hi = self.current
            when = "variance search after iteration 0, then as the iteration doubles"
            return f"mask rate window: auto ({when}), now ({lo:g}, {hi:g}]"
        lo, hi = self.current
        return f"mask rate window: t ~ U({lo:g}, {hi:g}]"

    def state_dict(self) -> dict[str, Any]:
        return {CHECKPOINT_KEY: list(self.current), SEARCHED_AT_KEY: self.searched_at} if self.auto else {}

    def load_state(self, ckpt: dict[str, Any]) -> None:
        if self.auto and CHECKPOINT_KEY in ckpt:
            lo, hi = (float(v) for v in ckpt[CHECKPOINT_KEY])
            self.current = (lo, hi)
            self.searched_at = int(ckpt.get(SEARCHED_AT_KEY, 0))


class WindowHooks(TrainingHooks):
    """Tells the window which iteration an evaluation is at (the search skips iteration 0)."""

    def __init__(self, window: MaskRateWindow) -> None:
        self.window = window

    def before_step(self, iter_num: int, epochs: float) -> str | None:
        self.window.iter_num = iter_num
        return None
