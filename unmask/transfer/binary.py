"""Binary classification maths: replaced-character labels, class-balanced cross-entropy, and the metrics.

Class 1 is always the "wrong" class (a replaced character; for sequence tasks the label the data calls 1), so a
classifier's P(class 1) is its score: `unmask classify` prints it and the critic sampler re-masks by it.

Metrics are plain functions of (scores, labels) so they can be checked against hand-computed values:
accuracy per class (the recall of each class), overall and balanced accuracy, precision/recall/F1 of class 1,
AUROC (threshold-free) and the trivial baseline (always predict the majority class).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.curriculum.masking import random_k_subsets


def replace_characters(
    clean: Tensor, n_chars: int, ratio_range: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Replace characters of `clean` (B, T) by a different random real character: returns (x, labels).

    Each row draws its rate r ~ U(lo, hi) and replaces exactly round(r * T) uniformly chosen positions (the
    masking module's exact-count rule). A replacement is `(c + U{1..n_chars-1}) mod n_chars`:
    uniform over the n_chars - 1 other characters, never the original. labels (B, T) long: 1 = replaced.
    All randomness comes from `generator` (on `clean`'s device).
    """
    if n_chars < 2:
        raise ValueError(f"replacing characters needs at least 2 distinct characters, got {n_chars}")
    B, T = clean.shape
    lo, hi = ratio_range
    dev = clean.device
    rates = lo + (hi - lo) * torch.rand(B, dtype=torch.float64, generator=generator, device=dev)  # (B,)
    counts = torch.floor(rates * T + 0.5).long().clamp(0, T)  # (B,): round half up, as `masking.num_masked`
    replaced = random_k_subsets(counts, (B, T), generator)  # (B, T): counts[b] random positions
    shift = torch.randint(1, n_chars, (B, T), generator=generator, device=dev)  # (B, T) in [1, n_chars - 1]
    x = torch.where(replaced, (clean + shift) % n_chars, clean)
    return x, replaced.long()


def class_balanced_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the classes present of each class's mean cross-entropy; logits (N, 2), labels (N,) in {0, 1}.

    This equals the original framework's weighted CE with per-batch weights w_c = N / (2 count_c) (docs/origin.md
    §1.7) under PyTorch's weighted mean, sum_i w_yi l_i / sum_i w_yi: both classes count equally however rare
    replaced characters are, so predicting "kept" everywhere no longer scores well.
    """
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    per_class = []
    for c in (0, 1):
        in_class = labels == c
        if bool(in_class.any()):
            per_class.append(losses[in_class].mean())
    return torch.stack(per_class).mean()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative) + P(tie) / 2.

    Mann-Whitney U statistic (Mann & Whitney 1947; Hanley & McNeil 1982): with ranks 1..N of the pooled scores,
    tied scores sharing their average rank, AUC = (R1 - n1 (n1 + 1) / 2) / (n1 n0), R1 = sum of the positives'
    ranks. NaN when a class is absent.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    n1 = int((labels == 1).sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # rank of the first member of each group of equal scores
    average_rank = first_rank + (counts - 1) / 2.0
    r1 = float(average_rank[inverse][labels == 1].sum())
    return (r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of P(class 1) `scores` against labels {0, 1}; predictions are `scores > threshold`.

    `trivial_accuracy` is the accuracy of always predicting the majority class (whose balanced accuracy is 0.5 and
    AUROC 0.5). F1 = 2 TP / (2 TP + FP + FN) for class 1 (NaN if there are no positives and no predicted
    positives). Per-class accuracies are NaN for an absent class.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(np.int64)
    predicted = (scores > threshold).astype(np.int64)
    n = len(labels)
    n1 = int(labels.sum())
    n0 = n - n1
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp, fn = n0 - tn, n1 - tp
    acc0 = tn / n0 if n0 else math.nan
    acc1 = tp / n1 if n1 else math.nan
    return {
        "accuracy": (tp + tn) / n if n else math.nan,
        "accuracy_class_0": acc0,
        "accuracy_class_1": acc1,
        "balanced_accuracy": float(np.nanmean([acc0, acc1])) if n else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": acc1,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
        "auroc": auroc(scores, labels),
        "trivial_accuracy": max(n0, n1) / n if n else math.nan,
        "positive_rate": n1 / n if n else math.nan,
        "examples": float(n),
    }
