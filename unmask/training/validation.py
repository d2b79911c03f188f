"""Every evaluation metric of training: the fixed validation set, the README's "Validation and Monitoring"
metrics, `val_bpc` (ELBO or exact NLL) and the masked CE per mask rate.

The set is built once per run from val.bin with its own generators (seed 42), spread evenly over all validation
stages (remainder to the earliest), and every sample carries its true stage id. Every sample is evaluated at
every evaluation (the original evaluated only the first `eval_iters` batches and mislabelled stages; see
docs/origin.md). Under DDP each rank evaluates a strided shard and the sums are all-reduced, so every rank
sees the same numbers.

Losses are token-weighted: the mean cross-entropy over all masked positions (overall, and per stage).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unmask.curriculum.batches import Batch, BatchSource
from unmask.curriculum.masking import num_masked, random_k_subsets
from unmask.curriculum.plateau import split_evenly
from unmask.curriculum.stages import Stage
from unmask.likelihood.elbo import real_char_log_probs
from unmask.likelihood.score import Scorer, next_char_nll, sharded_bpc
from unmask.runtime import Runtime

VALIDATION_SEED = 42
# Mask rates at which diffusion models report their masked CE ("loss per mask-rate bucket").
MASK_RATE_BUCKETS = (0.1, 0.3, 0.5, 0.7, 0.9)
_BPC_SEED = 42  # the mask draws of the masked CE by mask rate


def build_validation_set(
    tokens: np.ndarray,
    paragraphs: np.ndarray | None,
    stages: tuple[Stage, ...],
    n_samples: int,
    block_size: int,
    mask_id: int,
    n_chars: int,
    device: torch.device,
) -> Batch:
    """`n_samples` windows of val.bin, masked stage by stage; identical across runs, ranks and resumes."""
    data_gen = torch.Generator().manual_seed(VALIDATION_SEED)
    mask_gen = torch.Generator(device=device).manual_seed(VALIDATION_SEED)
    source = BatchSource(tokens, block_size, device, paragraphs)
    counts = split_evenly(n_samples, len(stages))
    return source.batch(counts, stages, mask_id, n_chars, data_gen, mask_gen)


def validation_window_offsets(tokens: np.ndarray, paragraphs: np.ndarray | None, window: int, count: int) -> np.ndarray:
    """Offsets of the fixed validation windows of a run: `count` windows of `window` characters drawn with seed 42
    (at paragraph starts when `paragraphs` is given), the windows `fixed_windows` and `build_validation_set` take."""
    from unmask.data.dataset import window_starts

    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    return window_starts(len(tokens), window, paragraphs, count, generator).numpy()


def fixed_windows(
    tokens: np.ndarray, paragraphs: np.ndarray | None, window: int, count: int, device: torch.device
) -> torch.Tensor:
    """(count, window) clean validation windows on the device: the same at every evaluation and in every run."""
    return BatchSource(tokens, window, device, paragraphs).clean(count, torch.Generator().manual_seed(VALIDATION_SEED))


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    data: Batch,
    batch_size: int,
    n_stages: int,
    n_chars: int,
    runtime: Runtime,
    drop_id: int | None = None,
) -> dict[str, Any]:
    """Per-stage and overall metrics of `model` on every row of `data` (sharded over DDP ranks); with `drop_id`
    that logit ([MASK], for zero-masked models) is left out of the softmax."""
    dev = runtime.device
    # Per stage: [ce sum, masked tokens, samples, correct-prob sum, top-1 correct]
    sums = torch.zeros(n_stages, 5, dtype=torch.float64, device=dev)
    rows = torch.arange(runtime.rank, len(data), runtime.world_size, device=dev)
    for chunk in rows.split(batch_size):
        x, y, sel, sid = data.x[chunk], data.y[chunk], data.selected[chunk], data.stage_ids[chunk]
        with runtime.autocast():
            logits = model(x, positions=sel)  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1) if drop_id is None else real_char_log_probs(logits, drop_id)
        target = y[sel]  # (N,)
        tok_logp = logp.gather(1, target[:, None]).squeeze(1)  # (N,)
        tok_stage = sid[:, None].expand_as(sel)[sel]  # (N,)
        correct = (logp.argmax(dim=-1) == target).double()
        per_token = torch.stack(
            [
                -tok_logp.double(),
                torch.ones_like(correct),
                torch.zeros_like(correct),
                tok_logp.double().exp(),
                correct,
            ],
            dim=1,
        )  # (N, 5)
        sums.index_add_(0, tok_stage, per_token)
        sums[:, 2] += torch.bincount(sid, minlength=n_stages).double()
    runtime.all_reduce_sum(sums)
    s = sums.cpu()
    total = s.sum(0)
    n_tok = max(float(total[1]), 1.0)
    ratios = data.selected.double().mean(dim=1)
    avg_p = float(total[3]) / n_tok
    out: dict[str, Any] = {
        "val_loss": float(total[0]) / n_tok,
        "val_avg_correct_prob": avg_p,
        # Relative to guessing uniformly among the real characters (README: "random baseline 0.0154" = 1/65).
        "val_model_vs_random": avg_p * n_chars,
        "val_most_likely_accuracy": 100.0 * float(total[4]) / n_tok,
        "val_masked_token_ratio": float(ratios.mean()),
        "val_masked_token_ratio_min": float(ratios.min()),
        "val_masked_token_ratio_max": float(ratios.max()),
        "val_masked_tokens": int(total[1]),
    }
    for i in range(n_stages):
        out[f"val_stage_{i}_loss"] = float(s[i, 0]) / max(float(s[i, 1]), 1.0)
        out[f"val_stage_{i}_samples"] = int(s[i, 2])
    return out


def diffusion_val_bpc(
    model: torch.nn.Module, clean: torch.Tensor, mask_id: int, draws: int, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Negative ELBO in bits per character over fixed validation windows (B, T), same draws at every evaluation
    (`unmask.likelihood.score.sharded_bpc`: the one likelihood path)."""
    scorer = Scorer("diffusion", mask_id, clean.shape[1], draws=draws)
    return sharded_bpc(scorer, model, clean, batch_size, runtime)


@torch.no_grad()
def mask_rate_ce(
    model: torch.nn.Module,
    clean: torch.Tensor,
    mask_id: int,
    batch_size: int,
    runtime: Runtime,
    drop_id: int | None = None,
) -> dict[str, float]:
    """Masked CE at fixed mask rates (uniformly chosen positions, exactly round(rate * T) per row); `drop_id` as
    in `evaluate_batches`."""
    out: dict[str, float] = {}
    T = clean.shape[1]
    rows = torch.arange(runtime.rank, clean.shape[0], runtime.world_size, device=runtime.device)
    for rate in MASK_RATE_BUCKETS:
        gen = torch.Generator(device=runtime.device).manual_seed(_BPC_SEED + int(100 * rate) + runtime.rank)
        k = max(1, num_masked(rate, T))
        sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        for chunk in rows.split(batch_size):
            x = clean[chunk]
            selected = random_k_subsets(k, (x.shape[0], T), gen)  # (b, T): k uniformly chosen positions per row
            with runtime.autocast():
                logits = model(x.masked_fill(selected, mask_id), positions=selected)  # (N, V)
            logp = F.log_softmax(logits.float(), dim=-1) if drop_id is None else real_char_log_probs(logits, drop_id)
            sums[0] -= logp.gather(1, x[selected][:, None]).sum().double()
            sums[1] += selected.sum()
        runtime.all_reduce_sum(sums)
        out[f"val_ce_mask_{int(round(100 * rate))}"] = float(sums[0] / sums[1])
    return out


@torch.no_grad()
def autoregressive_val(
    model: torch.nn.Module,
    windows: torch.Tensor,
    mask_id: int,
    batch_size: int,
    runtime: Runtime,
    zero_masking: bool = False,
) -> dict[str, Any]:
    """Exact NLL per character over fixed validation windows (N, T + 1).

    `val_loss` is the training cross-entropy (softmax over the whole vocabulary); `val_bpc` drops the [MASK]
    logit first, as `unmask eval` and every diffusion likelihood do (`unmask.likelihood.score.next_char_nll`, the
    autoregressive scorer's own function), so the logged number and `unmask eval` agree on the same windows.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # CE nats, NLL nats, characters
    rows = torch.arange(runtime.rank, windows.shape[0], runtime.world_size, device=runtime.device)
    for chunk in rows.split(batch_size):
        w = windows[chunk]
        with runtime.autocast():
            logits = model(w[:, :-1])  # (b, T, V)
        targets = w[:, 1:]  # (b, T)
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
        sums[1] += next_char_nll(logits, targets, mask_id).sum()
        sums[2] += targets.numel()
    runtime.all_reduce_sum(sums)
    nats = float(sums[1] / sums[2])
    val_loss = nats if zero_masking else float(sums[0] / sums[2])  # the training loss of the same windows
    return {"val_loss": val_loss, "val_nats_per_char": nats, "val_bpc": nats / math.log(2)}


def block_diffusion_val_bpc(
    model: torch.nn.Module,
    clean: torch.Tensor,
    mask_id: int,
    block_length: int,
    draws: int,
    batch_size: int,
    runtime: Runtime,
) -> dict[str, float]:
    """Block negative ELBO (exact_k per block) in bits per character over fixed windows (B, T), same draws at
    every evaluation, sharded over DDP ranks (`unmask.likelihood.score.sharded_bpc`)."""
    scorer = Scorer("block_diffusion", mask_id, clean.shape[1], block_length=block_length, draws=draws)
    return sharded_bpc(scorer, model, clean, batch_size, runtime)
