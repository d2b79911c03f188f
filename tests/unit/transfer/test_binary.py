"""Binary-classification maths: replaced-character labels, class-balanced CE, metrics against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unmask.transfer.binary import auroc, binary_metrics, class_balanced_cross_entropy, replace_characters


def test_replaced_characters_rate_labels_and_never_the_original() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 5, (400, 50), generator=g)
    x, labels = replace_characters(clean, 5, (0.1, 0.4), torch.Generator().manual_seed(1))
    assert torch.equal(labels.bool(), x != clean)  # label 1 exactly where the character changed: never the same
    assert int(x.min()) >= 0 and int(x.max()) < 5
    per_row = labels.sum(dim=1)
    assert int(per_row.min()) >= 5 and int(per_row.max()) <= 20  # round(0.1 * 50) .. round(0.4 * 50)
    assert abs(float(labels.double().mean()) - 0.25) < 0.01  # mean of U(0.1, 0.4)
    assert per_row.unique().numel() > 10  # the rate is drawn per row, not fixed
    # The replacement is uniform over the 4 other characters.
    shift = ((x - clean) % 5)[labels.bool()]
    shares = torch.bincount(shift, minlength=5)[1:].double() / shift.numel()
    assert torch.allclose(shares, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)
    again = replace_characters(clean, 5, (0.1, 0.4), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x) and torch.equal(again[1], labels)


def test_replaced_characters_fixed_rate_and_two_characters() -> None:
    clean = torch.randint(0, 2, (8, 10), generator=torch.Generator().manual_seed(0))
    x, labels = replace_characters(clean, 2, (0.3, 0.3), torch.Generator().manual_seed(2))
    assert labels.sum(dim=1).tolist() == [3] * 8
    assert torch.equal(x[labels.bool()], 1 - clean[labels.bool()])
    with pytest.raises(ValueError, match="at least 2"):
        replace_characters(clean, 1, (0.3, 0.3), torch.Generator())


def test_class_balanced_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    rows = zip(logits.tolist(), labels.tolist(), strict=True)
    ce = [-math.log(math.exp(a[y]) / (math.exp(a[0]) + math.exp(a[1]))) for a, y in rows]
    expected = 0.5 * (sum(ce[:4]) / 4 + ce[4])
    assert float(class_balanced_cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)
    # The original's per-batch weights w_c = N / (2 count_c) under PyTorch's weighted mean give the same number.
    weights = torch.tensor([5 / (2 * 4), 5 / (2 * 1)])
    assert float(F.cross_entropy(logits, labels, weight=weights)) == pytest.approx(expected, rel=1e-6)
    # One class only: the plain mean.
    assert float(class_balanced_cross_entropy(logits[:4], labels[:4])) == pytest.approx(sum(ce[:4]) / 4, rel=1e-6)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # the classic 4-point example
        ([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1], 0.75),  # ties count one half: (0.5 + 0.5 + 1 + 1) / 4
        ([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1], 0.5),  # all tied
        ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
    ],
)
def test_auroc_by_hand(scores: list[float], labels: list[int], expected: float) -> None:
    assert auroc(np.array(scores), np.array(labels)) == pytest.approx(expected)


def test_auroc_equals_pair_counting_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # 5 distinct values: many ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert math.isnan(auroc(scores, np.ones(60)))


def test_binary_metrics_by_hand() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.7, 0.2, 0.6, 0.4, 0.1, 0.3, 0.0])  # predicted 1 1 0 1 0 0 0 0
    m = binary_metrics(scores, labels)
    # TP 2, FN 1, FP 1, TN 4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["accuracy_class_1"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy_class_0"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["trivial_accuracy"] == pytest.approx(5 / 8)
    assert m["auroc"] == pytest.approx(12 / 15)  # 0.9 and 0.7 beat all 5 negatives, 0.2 beats 2 of them
    nothing_predicted = binary_metrics(np.zeros(4), np.array([0, 0, 0, 1]))
    assert nothing_predicted["f1"] == 0.0 and math.isnan(nothing_predicted["precision"])
