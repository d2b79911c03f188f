"""The fixed validation set and the metrics of the README's "Validation and Monitoring".

The set is built once per run from val.bin with its own generators (seed 42), spread evenly over all validation
stages (remainder to the earliest), and every sample carries its true stage id. Every sample is evaluated at
every evaluation (the original evaluated only the first `eval_iters` batches and mislabelled stages:
seed_system.md §10.11). Under DDP each rank evaluates a strided shard and the sums are all-reduced, so every rank
sees the same numbers.

Losses are token-weighted: the mean cross-entropy over all masked positions (overall, and per stage).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unmask.batches import Batch, BatchSource
from unmask.curriculum import split_evenly
from unmask.runtime import Runtime
from unmask.stages import Stage

VALIDATION_SEED = 42


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


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module, data: Batch, batch_size: int, n_stages: int, n_chars: int, runtime: Runtime
) -> dict[str, Any]:
    """Per-stage and overall metrics of `model` on every row of `data` (sharded over DDP ranks)."""
    dev = runtime.device
    # Per stage: [ce sum, masked tokens, samples, correct-prob sum, top-1 correct]
    sums = torch.zeros(n_stages, 5, dtype=torch.float64, device=dev)
    rows = torch.arange(runtime.rank, len(data), runtime.world_size, device=dev)
    for chunk in rows.split(batch_size):
        x, y, sel, sid = data.x[chunk], data.y[chunk], data.selected[chunk], data.stage_ids[chunk]
        with runtime.autocast():
            logits = model(x, positions=sel)  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1)
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
