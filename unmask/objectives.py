"""Training objectives: what one micro-batch is, what its loss is, and how each is validated.

- `unmasking` (the original framework's): stage-curriculum corruption, loss = mean cross-entropy over the selected
  positions. Not a likelihood.
- `mdlm`: the continuous-time negative ELBO of masked diffusion with the linear schedule (Sahoo et al. 2024, MDLM;
  Shi et al. 2024, MD4), as implemented in `unmask.elbo.mdlm_training_loss`.
- `autoregressive`: causal attention and next-character targets on windows of block_size + 1 characters: the
  nanoGPT baseline, trained and scored by the same code.

Every objective reports `val_bpc` at each evaluation: the ELBO for diffusion models, the exact NLL for the
autoregressive one, so objectives and curricula are compared on one number.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from unmask.batches import Batch
from unmask.masking import num_masked
from unmask.runtime import Runtime

OBJECTIVES = ("unmasking", "mdlm", "autoregressive")
# Mask rates at which diffusion models report their masked CE ("loss per mask-rate bucket").
MASK_RATE_BUCKETS = (0.1, 0.3, 0.5, 0.7, 0.9)
_BPC_SEED = 42


def is_causal(objective: str) -> bool:
    return objective == "autoregressive"


def window_length(objective: str, block_size: int) -> int:
    """Characters per training window: one more for autoregressive (inputs and shifted targets)."""
    return block_size + 1 if is_causal(objective) else block_size


def unmasking_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the selected positions (the seed's unmasking loss)."""
    logits = model(batch.x, positions=batch.selected)  # (N, V)
    return F.cross_entropy(logits.float(), batch.y[batch.selected])


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float, n_chars: int) -> torch.Tensor:
    """Mean cross-entropy against label-smoothed targets (Szegedy et al. 2016, "Rethinking the Inception
    Architecture", §7; Müller et al. 2019, "When Does Label Smoothing Help?").

    logits (N, V) over the full vocabulary, targets (N,) real-character ids. The target distribution is
    q = (1 - eps) * onehot(target) + eps / n_chars on every real character (ids < n_chars) and 0 on the special
    tokens (ids >= n_chars, i.e. [MASK]); loss = -sum_v q_v log p_v with p the softmax over all V entries.
    `F.cross_entropy(label_smoothing=eps)` would spread eps over [MASK] too, teaching the model to predict a token
    that never is an answer, hence this function.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    uniform = -logp[:, :n_chars].mean(dim=1)  # (N,): cross-entropy against the uniform distribution on characters
    return ((1.0 - eps) * nll + eps * uniform).mean()


def smoothed_unmasking_loss(model: torch.nn.Module, batch: Batch, eps: float, n_chars: int) -> torch.Tensor:
    """`unmasking_loss` with label smoothing `eps` over the `n_chars` real characters (training only)."""
    logits = model(batch.x, positions=batch.selected)  # (N, V)
    return label_smoothed_cross_entropy(logits, batch.y[batch.selected], eps, n_chars)


def autoregressive_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy: windows (B, T + 1) -> inputs [:, :-1], targets [:, 1:]."""
    logits = model(windows[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


def mdlm_loss(model: torch.nn.Module, clean: torch.Tensor, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    from unmask.elbo import mdlm_training_loss

    return mdlm_training_loss(model, clean, mask_id, generator)


@torch.no_grad()
def diffusion_val_bpc(
    model: torch.nn.Module, clean: torch.Tensor, mask_id: int, draws: int, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Negative ELBO in bits per character over fixed validation windows (B, T), same draws at every evaluation.

    The generator is re-seeded each time, so differences between evaluations come from the model, not the draws.
    """
    from unmask.elbo import nelbo_estimate

    gen = torch.Generator(device=runtime.device).manual_seed(_BPC_SEED + runtime.rank)
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # nats, characters
    rows = torch.arange(runtime.rank, clean.shape[0], runtime.world_size, device=runtime.device)
    for chunk in rows.split(batch_size):
        with runtime.autocast():
            nats, _ = nelbo_estimate(model, clean[chunk], mask_id, draws, gen)  # (b,) nats per sequence
        sums[0] += nats.double().sum()
        sums[1] += chunk.numel() * clean.shape[1]
    runtime.all_reduce_sum(sums)
    nats_per_char = float(sums[0] / sums[1])
    return {"val_bpc": nats_per_char / math.log(2), "val_nats_per_char": nats_per_char}


@torch.no_grad()
def mask_rate_ce(
    model: torch.nn.Module, clean: torch.Tensor, mask_id: int, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Masked CE at fixed mask rates (uniformly chosen positions, exactly round(rate * T) per row)."""
    out: dict[str, float] = {}
    T = clean.shape[1]
    rows = torch.arange(runtime.rank, clean.shape[0], runtime.world_size, device=runtime.device)
    for rate in MASK_RATE_BUCKETS:
        gen = torch.Generator(device=runtime.device).manual_seed(_BPC_SEED + int(100 * rate) + runtime.rank)
        k = max(1, num_masked(rate, T))
        sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        for chunk in rows.split(batch_size):
            x = clean[chunk]
            keys = torch.rand(x.shape, generator=gen, device=runtime.device)  # (b, T)
            selected = keys.argsort(dim=1).argsort(dim=1) < k  # (b, T): k uniformly chosen positions per row
            with runtime.autocast():
                logits = model(x.masked_fill(selected, mask_id), positions=selected)  # (N, V)
            sums[0] += F.cross_entropy(logits.float(), x[selected], reduction="sum").double()
            sums[1] += selected.sum()
        runtime.all_reduce_sum(sums)
        out[f"val_ce_mask_{int(round(100 * rate))}"] = float(sums[0] / sums[1])
    return out


@torch.no_grad()
def autoregressive_val(
    model: torch.nn.Module, windows: torch.Tensor, mask_id: int, batch_size: int, runtime: Runtime
) -> dict[str, Any]:
    """Exact NLL per character over fixed validation windows (N, T + 1).

    `val_loss` is the training cross-entropy (softmax over the whole vocabulary); `val_bpc` drops the [MASK]
    logit first, as `unmask eval` and every diffusion likelihood do (`unmask.elbo.real_char_log_probs`), so the
    logged number and `unmask eval` agree on the same windows.
    """
    from unmask.elbo import real_char_log_probs

    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # CE nats, NLL nats, characters
    rows = torch.arange(runtime.rank, windows.shape[0], runtime.world_size, device=runtime.device)
    for chunk in rows.split(batch_size):
        w = windows[chunk]
        with runtime.autocast():
            logits = model(w[:, :-1])  # (b, T, V)
        targets = w[:, 1:]  # (b, T)
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
        sums[1] -= real_char_log_probs(logits, mask_id).gather(2, targets[..., None]).sum().double()
        sums[2] += targets.numel()
    runtime.all_reduce_sum(sums)
    nats = float(sums[1] / sums[2])
    return {"val_loss": float(sums[0] / sums[2]), "val_nats_per_char": nats, "val_bpc": nats / math.log(2)}
