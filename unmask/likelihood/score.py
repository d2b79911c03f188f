"""One likelihood path: the number a checkpoint kind is scored by, on windows of text.

Every caller that reports a likelihood (training validation, `unmask eval`, `Model.score`, the sample judge and
`unmask compare`, which reads the training log) goes through `Scorer`, chosen once from the model's config:

- `autoregressive` (causal attention): the exact NLL by teacher forcing. A window holds L + 1 characters and
  scores the last L (the first is context only), so consecutive windows overlap by one character and every
  character after the first is predicted exactly once.
- `diffusion` (bidirectional: unmasking, mdlm): the masked-diffusion negative ELBO (`unmask.likelihood.elbo`), an
  upper bound on the NLL, by Monte Carlo over `draws` forward passes per window.
- `block_diffusion` (block-causal attention over blocks of K): the block negative ELBO
  (`unmask.likelihood.block`), the sum over blocks of each block's bound given the clean blocks before it.

Diffusion bounds are estimated with `estimator` (exact_k by default: the lowest variance) over the full
t in (0, 1], whatever mask-rate window the model was trained on. The [MASK] logit is dropped before every softmax
(it is never a target). Text longer than one window is scored in consecutive windows of the model's block_size,
each without the others as context: the same windows `unmask eval` takes from a split, so scoring a text and
evaluating it as a split give the same number (up to the Monte-Carlo noise of a bound).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from unmask.data.dataset import gather_windows
from unmask.likelihood.block import block_nelbo
from unmask.likelihood.elbo import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    nelbo_estimate,
    real_char_log_probs,
)
from unmask.runtime import Runtime

Kind = Literal["autoregressive", "diffusion", "block_diffusion"]
KINDS: tuple[Kind, ...] = ("autoregressive", "diffusion", "block_diffusion")
LN2 = math.log(2.0)


def model_kind(causal: bool, diffusion_block: int) -> Kind:
    """The scoring (and generation) family of a model: causal, block-causal, or bidirectional."""
    if causal:
        return "autoregressive"
    return "block_diffusion" if diffusion_block else "diffusion"


@dataclass(frozen=True)
class Scorer:
    """How one checkpoint kind is scored: `window_nats` on windows, `text_nats` on whole texts."""

    kind: Kind
    mask_id: int
    block_size: int
    block_length: int = 0  # K of a block-diffusion model
    draws: int = 4  # forward passes per window of a diffusion bound
    estimator: str = DEFAULT_ESTIMATOR

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.kind == "block_diffusion" and self.block_length < 1:
            raise ValueError("a block-diffusion scorer needs block_length >= 1")

    @property
    def exact(self) -> bool:
        """True when the number is the exact NLL (autoregressive), False for a bound estimated by Monte Carlo."""
        return self.kind == "autoregressive"

    @property
    def context(self) -> int:
        """Characters a window carries before its first scored one (1 for autoregressive windows of L + 1)."""
        return 1 if self.exact else 0

    @property
    def kind_description(self) -> str:
        """What the number is: the exact NLL, or which upper bound on it."""
        return {
            "autoregressive": "exact NLL",
            "diffusion": "negative ELBO (upper bound on the NLL)",
            "block_diffusion": f"block negative ELBO, K={self.block_length} (upper bound on the NLL)",
        }[self.kind]

    @property
    def description(self) -> str:
        if self.kind == "autoregressive":
            return "exact NLL (teacher forcing)"
        what = "negative ELBO" if self.kind == "diffusion" else f"block negative ELBO (K={self.block_length})"
        return f"{what}, {self.estimator}, {self.draws} draws per window"

    def window_nats(
        self, model: torch.nn.Module, x: Tensor, generator: torch.Generator, batch_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(nats per window (B,), Monte-Carlo standard error (B,)) in float64 for windows x (B, n + context).

        Autoregressive: the exact NLL of x[:, 1:] given the characters before each (standard error 0). Diffusion:
        the negative ELBO of each row. `batch_size` bounds the rows of one diffusion forward pass.
        """
        if self.kind == "autoregressive":
            nll = causal_position_nll(model, x, self.mask_id)  # (B, n)
            return nll.sum(dim=1), torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        if self.kind == "block_diffusion":
            return block_nelbo(model, x, self.mask_id, self.block_length, self.draws, generator, self.estimator)
        return nelbo_estimate(model, x, self.mask_id, self.draws, generator, self.estimator, batch_size)

    @torch.no_grad()
    def text_nats(
        self, model: torch.nn.Module, ids: Tensor, generator: torch.Generator, scored: Tensor | None = None
    ) -> Tensor:
        """Nats per character (B,) float64 of texts ids (B, N), in consecutive windows of block_size.

        Autoregressive: characters 1..N-1 (the first is context only), window j predicting characters
        jL+1..jL+L from the L before; `scored` (B, N) bool restricts the mean to those positions (e.g. the
        generated ones, given the prompt). Diffusion: the bound of each window, summed and divided by N; a bound
        covers whole windows, so `scored` cannot restrict it and is ignored.
        """
        B, N = ids.shape
        L = self.block_size
        if self.kind == "autoregressive":
            if N < 2:
                raise ValueError("an autoregressive score needs at least 2 characters")
            nll = torch.zeros(B, N, dtype=torch.float64, device=ids.device)  # NLL of predicting position i
            for start in range(0, N - 1, L):
                window = ids[:, start : start + L + 1]  # (B, n + 1)
                nll[:, start + 1 : start + window.shape[1]] = causal_position_nll(model, window, self.mask_id)
            keep = torch.ones(B, N, dtype=torch.bool, device=ids.device) if scored is None else scored.clone()
            keep[:, 0] = False
            return (nll * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        if N == 0:
            raise ValueError("cannot score an empty text")
        total = torch.zeros(B, dtype=torch.float64, device=ids.device)
        for start in range(0, N, L):
            nats, _ = self.window_nats(model, ids[:, start : start + L], generator)
            total += nats.to(total.device)
        return total / N


def causal_position_nll(model: torch.nn.Module, x: Tensor, mask_id: int) -> Tensor:
    """NLL (B, n) float64 of x[:, 1:] under a causal model fed x[:, :-1], the [MASK] logit dropped."""
    return next_char_nll(model(x[:, :-1]), x[:, 1:], mask_id)


def next_char_nll(logits: Tensor, targets: Tensor, mask_id: int) -> Tensor:
    """NLL (B, n) float64 of targets (B, n) under logits (B, n, V), the [MASK] logit dropped."""
    logp = real_char_log_probs(logits, mask_id)  # (B, n, V)
    return -logp.gather(2, targets[..., None]).squeeze(2).double()


def scorer_for(
    causal: bool, diffusion_block: int, mask_id: int, block_size: int, draws: int, estimator: str = DEFAULT_ESTIMATOR
) -> Scorer:
    """The scorer of a model from its architecture (`ModelConfig.causal`, `ModelConfig.diffusion_block`)."""
    kind = model_kind(causal, diffusion_block)
    return Scorer(kind, mask_id, block_size, diffusion_block if kind == "block_diffusion" else 0, draws, estimator)


VALIDATION_DRAW_SEED = 42  # the mask draws of training validation: the same at every evaluation


@torch.no_grad()
def sharded_bpc(
    scorer: Scorer, model: torch.nn.Module, windows: Tensor, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Bits and nats per scored character over fixed windows (W, n + context), the training validation's number.

    Each DDP rank scores a strided shard and the sums are all-reduced. A diffusion bound's masks come from a
    generator re-seeded at every call (seed 42 + rank), so two evaluations differ by the model, not by the draws.
    """
    gen = torch.Generator(device=runtime.device).manual_seed(VALIDATION_DRAW_SEED + runtime.rank)
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # nats, characters
    rows = torch.arange(runtime.rank, windows.shape[0], runtime.world_size, device=runtime.device)
    scored = windows.shape[1] - scorer.context
    for chunk in rows.split(batch_size):
        with runtime.autocast():
            nats, _ = scorer.window_nats(model, windows[chunk], gen)  # (b,) nats per window
        sums[0] += nats.double().sum()
        sums[1] += chunk.numel() * scored
    runtime.all_reduce_sum(sums)
    nats_per_char = float(sums[0] / sums[1])
    return {"val_bpc": nats_per_char / LN2, "val_nats_per_char": nats_per_char}


# --- a split: every non-overlapping window (`unmask eval`) -----------------------------------------------------------


def split_window_offsets(n_tokens: int, block_size: int, causal: bool) -> np.ndarray:
    """Offsets of the non-overlapping windows of a split: jL for diffusion; jL as well (of L + 1 ids) for causal.

    A causal window tokens[s - 1 : s + L] with s = 1 + jL feeds exactly the diffusion window j as input and
    predicts it shifted by one, so the AR model never scores the split's first character.
    """
    need = block_size + 1 if causal else block_size
    count = (n_tokens - need) // block_size + 1 if n_tokens >= need else 0
    return np.arange(count, dtype=np.int64) * block_size


def evenly_spaced(starts: np.ndarray, max_windows: int | None) -> np.ndarray:
    """`max_windows` evenly spaced offsets of `starts` (all of them when None or not fewer)."""
    if max_windows is None or max_windows >= len(starts):
        return starts
    return starts[np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64))]


@torch.no_grad()
def windows_likelihood(
    scorer: Scorer,
    model: torch.nn.Module,
    tokens: np.ndarray,
    starts: np.ndarray,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
) -> dict[str, Any]:
    """Bits per character over the windows of `tokens` (1-D ids) starting at `starts`, each of
    block_size + context characters (block_size scored).

    `batch_size` is rows per forward pass (a diffusion window takes `draws` of them). The standard error is across
    windows: the sample standard deviation of the per-window nats per character over sqrt(windows), so it counts
    both the data (which windows) and the estimator noise; `bpc_mc_stderr` is the estimator noise alone,
    sqrt(sum_w se_w^2) / windows / L.
    """
    L, W = scorer.block_size, len(starts)
    if W == 0:
        raise ValueError(f"no window of {L + scorer.context} to score")
    per_window = torch.empty(W, dtype=torch.float64)  # nats per character
    mc_var = torch.zeros(W, dtype=torch.float64)  # estimator variance of each window's nats per sequence
    per_chunk = max(1, batch_size if scorer.exact else batch_size // scorer.draws)
    bar = tqdm(total=W, unit="window", desc="eval", disable=not progress or not sys.stderr.isatty(), leave=False)
    for i in range(0, W, per_chunk):
        chunk = torch.from_numpy(starts[i : i + per_chunk])
        x = gather_windows(tokens, chunk, L + scorer.context).to(device)  # (b, L [+ 1])
        nats, se = scorer.window_nats(model, x, generator, batch_size)
        per_window[i : i + len(chunk)] = nats.cpu() / L
        mc_var[i : i + len(chunk)] = se.cpu() ** 2
        bar.update(len(chunk))
    bar.close()
    nats_per_char = float(per_window.mean())
    stderr = float(per_window.std() / math.sqrt(W)) if W > 1 else None
    mc = float(mc_var.sum().sqrt() / W / L)
    return {
        "bpc": nats_per_char / LN2,
        "bpc_stderr": None if stderr is None else stderr / LN2,
        "bpc_mc_stderr": 0.0 if scorer.exact else (None if math.isnan(mc) else mc / LN2),
        "nats_per_char": nats_per_char,
        "nats_stderr": stderr,
        "estimator": "exact" if scorer.exact else scorer.estimator,
        "measure": scorer.kind_description,
        "draws": 1 if scorer.exact else scorer.draws,
        "windows": W,
        "chars": W * L,
        "block_size": L,
    }


def split_likelihood(
    scorer: Scorer,
    model: torch.nn.Module,
    tokens: np.ndarray,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """`windows_likelihood` over every non-overlapping block_size window of a split (`split_window_offsets`), or
    `max_windows` evenly spaced ones; adds `windows_total`."""
    starts = split_window_offsets(len(tokens), scorer.block_size, scorer.exact)
    if len(starts) == 0:
        raise ValueError(f"a split of {len(tokens)} characters has no window of {scorer.block_size + scorer.context}")
    result = windows_likelihood(
        scorer, model, tokens, evenly_spaced(starts, max_windows), generator, batch_size, device, progress
    )
    return {**result, "windows_total": len(starts)}
