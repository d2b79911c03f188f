"""Tests for `unmask.curriculum.masking`: exact sticky counts, statistics of every selection, BERT corruption."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.curriculum.masking import (
    bert_corruption,
    mask_positions,
    num_masked,
    random_selection,
    run_lengths,
    span_selection,
    sticky_selection,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_sticky(T: int, ratio: float, p1: float, p2: float, rng: random.Random) -> list[bool]:
    """Literal per-row, per-round sticky process (no round cap), to check the vectorised one against."""
    sel = [False] * T
    need = num_masked(ratio, T)
    while need > 0:
        free = [i for i in range(T) if not sel[i]]
        prob = {i: p2 if (i > 0 and sel[i - 1]) or (i < T - 1 and sel[i + 1]) else p1 for i in free}
        if all(p == 0.0 for p in prob.values()):
            proposals = [rng.choice(free)]
        else:
            proposals = [i for i in free if rng.random() < prob[i]]
        if len(proposals) > need:
            proposals = rng.sample(proposals, need)
        for i in proposals:
            sel[i] = True
        need -= len(proposals)
    return sel


def reference_run_lengths(rows: list[list[bool]]) -> list[int]:
    lengths = []
    for row in rows:
        current = 0
        for bit in [*row, False]:
            if bit:
                current += 1
            elif current:
                lengths.append(current)
                current = 0
    return lengths


def runs_per_row(selected: torch.Tensor) -> torch.Tensor:
    rows = selected.to(torch.int8)
    starts = rows[:, :1] + (rows[:, 1:] > rows[:, :-1]).sum(dim=1, keepdim=True)
    return starts.squeeze(1).double()


# --- num_masked ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "T", "expected"),
    [(0.0, 10, 0), (1.0, 10, 10), (0.5, 3, 2), (0.25, 2, 1), (0.6, 256, 154), (0.04, 12, 0), (0.05, 10, 1)],
)
def test_num_masked_rounds_half_up(ratio: float, T: int, expected: int) -> None:
    assert num_masked(ratio, T) == expected


@given(st.floats(-0.5, 1.5), st.integers(0, 5000))
def test_num_masked_matches_formula_and_clamps(ratio: float, T: int) -> None:
    k = num_masked(ratio, T)
    assert 0 <= k <= T
    assert k == min(max(math.floor(ratio * T + 0.5), 0), T)


# --- sticky: counts --------------------------------------------------------------------------------

EDGE_STAGES = [
    (0.6, 0.1, 0.9),
    (0.4, 0.2, 0.8),
    (0.5, 0.0, 0.9),
    (0.5, 0.0, 0.01),
    (0.5, 0.3, 0.0),
    (0.9, 0.1, 0.0),
    (0.5, 0.0, 0.0),
    (0.0, 0.1, 0.9),
    (1.0, 0.1, 0.9),
    (0.5, 1.0, 1.0),
    (0.7, 1.0, 0.0),
    (0.5, 1e-6, 1e-6),
]


@pytest.mark.parametrize("T", [1, 2, 3, 7, 64])
@pytest.mark.parametrize(("ratio", "p1", "p2"), EDGE_STAGES)
def test_sticky_exact_count_edge_cases(T: int, ratio: float, p1: float, p2: float) -> None:
    selected = sticky_selection(5, T, ratio, p1, p2, gen(T))
    assert selected.shape == (5, T)
    assert selected.dtype == torch.bool
    assert selected.sum(dim=1).tolist() == [num_masked(ratio, T)] * 5


probabilities = st.one_of(st.sampled_from([0.0, 1.0, 1e-4]), st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(1, 6),
    T=st.integers(1, 80),
    ratio=st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)),
    p1=probabilities,
    p2=probabilities,
    seed=st.integers(0, 2**31),
)
def test_sticky_exact_count_property(batch: int, T: int, ratio: float, p1: float, p2: float, seed: int) -> None:
    selected = sticky_selection(batch, T, ratio, p1, p2, gen(seed))
    assert selected.shape == (batch, T)
    assert (selected.sum(dim=1) == num_masked(ratio, T)).all()


@pytest.mark.parametrize(("p1", "p2"), [(1e-7, 1e-7), (1e-7, 0.0), (0.0, 1e-7), (0.0, 0.0), (0.05, 0.0)])
def test_sticky_terminates_quickly_when_growth_is_hopeless(p1: float, p2: float) -> None:
    start = time.perf_counter()
    selected = sticky_selection(4, 300, 0.7, p1, p2, gen(1))
    assert time.perf_counter() - start < 2.0
    assert (selected.sum(dim=1) == num_masked(0.7, 300)).all()


def test_sticky_empty_shapes() -> None:
    assert sticky_selection(0, 16, 0.5, 0.1, 0.9, gen()).shape == (0, 16)
    assert sticky_selection(3, 0, 0.5, 0.1, 0.9, gen()).shape == (3, 0)


@pytest.mark.parametrize(("ratio", "p1", "p2"), [(1.5, 0.1, 0.9), (0.5, -0.1, 0.9), (0.5, 0.1, 1.01)])
def test_sticky_rejects_out_of_range_parameters(ratio: float, p1: float, p2: float) -> None:
    with pytest.raises(ValueError):
        sticky_selection(2, 8, ratio, p1, p2, gen())


# --- sticky: distribution --------------------------------------------------------------------------


def test_sticky_p1_zero_grows_one_contiguous_region() -> None:
    selected = sticky_selection(64, 40, 0.5, 0.0, 0.9, gen(2))
    # One run per row, of exactly the target length: nothing can start a second region.
    assert run_lengths(selected).tolist() == [20] * 64
    # The seed is uniform, so regions start all over the row rather than at a fixed place.
    starts = selected.to(torch.int8).argmax(dim=1)
    assert starts.min() == 0 and starts.max() == 20 and len(starts.unique()) > 10


def test_sticky_p2_zero_is_mostly_isolated_singletons() -> None:
    def singleton_fraction(selected: torch.Tensor) -> float:
        return (run_lengths(selected) == 1).double().mean().item()

    anti_sticky = singleton_fraction(sticky_selection(200, 64, 0.2, 0.1, 0.0, gen(3)))
    # iid Bernoulli(0.2) has 80% singleton runs; p2 = 0 avoids neighbours, so it must beat that clearly,
    # while p2 = 0.9 at the same ratio clusters well below it.
    iid = singleton_fraction(random_selection(200, 64, 0.2, 0.2, gen(3)))
    sticky = singleton_fraction(sticky_selection(200, 64, 0.2, 0.1, 0.9, gen(3)))
    assert anti_sticky > 0.88 and anti_sticky > iid + 0.06
    assert sticky < iid - 0.15


@pytest.mark.parametrize(("p1", "p2", "factor"), [(0.2, 0.8, 1.2), (0.1, 0.9, 1.5)])
def test_sticky_runs_are_longer_than_random_at_same_ratio(p1: float, p2: float, factor: float) -> None:
    sticky = run_lengths(sticky_selection(200, 128, 0.4, p1, p2, gen(4))).double().mean()
    # The same per-row ratio as sticky (iid Bernoulli(0.4)): expected mean run length 1 / 0.6.
    same_ratio = run_lengths(random_selection(200, 128, 0.4, 0.4, gen(4))).double().mean()
    assert sticky > factor * same_ratio


def test_sticky_is_clustered_relative_to_random_stage_with_same_mean_ratio() -> None:
    sticky = run_lengths(sticky_selection(300, 128, 0.4, 0.1, 0.9, gen(5))).double().mean()
    random_stage = run_lengths(random_selection(300, 128, 0.0, 0.8, gen(5))).double().mean()
    assert sticky > 1.3 * random_stage


def test_sticky_trim_keeps_a_uniform_subset() -> None:
    # p1 = 1: round one proposes all 5 positions and 2 are kept, uniformly among the 10 pairs.
    selected = sticky_selection(5000, 5, 0.4, 1.0, 1.0, gen(6))
    counts = Counter(tuple(row) for row in selected.nonzero()[:, 1].view(-1, 2).tolist())
    assert set(counts) == set(itertools.combinations(range(5), 2))
    assert all(abs(c - 500) < 100 for c in counts.values()), counts


@pytest.mark.parametrize(
    ("T", "ratio", "p1", "p2"),
    [(10, 0.5, 0.2, 0.8), (10, 0.5, 0.0, 0.6), (10, 0.6, 0.3, 0.0), (9, 0.4, 0.0, 0.0), (8, 0.5, 0.5, 0.5)],
)
def test_sticky_matches_literal_reference_process(T: int, ratio: float, p1: float, p2: float) -> None:
    rng = random.Random(7)
    reference = torch.tensor([reference_sticky(T, ratio, p1, p2, rng) for _ in range(1500)])
    fast = sticky_selection(4000, T, ratio, p1, p2, gen(7))
    for statistic in (runs_per_row, lambda s: s[:, 0].double(), lambda s: s[:, T // 2].double()):
        a, b = statistic(reference), statistic(fast)
        stderr = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b)) + 1e-9
        assert abs(a.mean().item() - b.mean().item()) < 5 * stderr + 1e-6


# --- determinism -----------------------------------------------------------------------------------


SELECTIONS = {
    "sticky": lambda g: sticky_selection(6, 50, 0.5, 0.1, 0.9, g),
    "sticky_p1_zero": lambda g: sticky_selection(6, 50, 0.5, 0.0, 0.9, g),
    "sticky_p2_zero": lambda g: sticky_selection(6, 50, 0.5, 0.2, 0.0, g),
    "random": lambda g: random_selection(6, 50, 0.0, 0.8, g),
    "span": lambda g: span_selection(6, 50, 2, g),
    "bert": lambda g: bert_corruption(
        torch.arange(300).view(6, 50) % 20, torch.ones(6, 50, dtype=torch.bool), 20, 20, g
    ),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_deterministic_per_generator_and_global_rng_untouched(name: str) -> None:
    fn = SELECTIONS[name]
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first, again, other = fn(gen(11)), fn(gen(11)), fn(gen(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert first.device == gen().device


# --- random selection ------------------------------------------------------------------------------


def test_random_selection_ratios() -> None:
    selected = random_selection(400, 2000, 0.2, 0.6, gen(8))
    assert selected.shape == (400, 2000) and selected.dtype == torch.bool
    per_row = selected.double().mean(dim=1)
    assert abs(per_row.mean().item() - 0.4) < 0.02
    # Each row's ratio is within range up to sampling noise (sd ~0.011 at T = 2000)...
    assert per_row.min() > 0.2 - 0.05 and per_row.max() < 0.6 + 0.05
    # ...and rows spread over the range like U(0.2, 0.6) (sd 0.115), not all at the mean.
    assert abs(per_row.std().item() - 0.4 / math.sqrt(12)) < 0.02
    assert per_row.min() < 0.25 and per_row.max() > 0.55


def test_random_selection_degenerate_ranges() -> None:
    assert not random_selection(4, 100, 0.0, 0.0, gen()).any()
    assert random_selection(4, 100, 1.0, 1.0, gen()).all()
    with pytest.raises(ValueError):
        random_selection(4, 100, 0.6, 0.5, gen())


# --- span selection --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_span_coverage_is_about_k_over_2k_plus_1(k: int) -> None:
    coverage = span_selection(1000, 512, k, gen(9)).double().mean().item()
    assert abs(coverage - k / (2 * k + 1)) < 0.015


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 5), T=st.integers(1, 40), k=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_span_rows_are_at_most_k_contiguous_runs(batch: int, T: int, k: int, seed: int) -> None:
    selected = span_selection(batch, T, k, gen(seed))
    assert selected.shape == (batch, T) and selected.dtype == torch.bool
    # Inclusive spans always select at least their start, and k spans give at most k runs.
    assert selected.any(dim=1).all()
    assert (runs_per_row(selected) <= k).all()


def test_span_zero_spans_selects_nothing() -> None:
    assert not span_selection(3, 20, 0, gen()).any()


# --- BERT corruption -------------------------------------------------------------------------------


def test_bert_corruption_proportions_and_ranges() -> None:
    n_chars, mask_id = 50, 50
    x = torch.randint(0, n_chars, (64, 512), generator=gen(10))
    selected = torch.rand(64, 512, generator=gen(11)) < 0.5
    x_before = x.clone()
    out = bert_corruption(x, selected, mask_id, n_chars, gen(12))
    assert torch.equal(x, x_before)
    assert out.shape == x.shape and out.dtype == torch.long
    assert torch.equal(out[~selected], x[~selected])
    assert ((out < n_chars) | (out == mask_id)).all() and (out >= 0).all()
    chosen_in, chosen_out = x[selected], out[selected]
    masked = (chosen_out == mask_id).double().mean().item()
    replaced = ((chosen_out != mask_id) & (chosen_out != chosen_in)).double().mean().item()
    kept = (chosen_out == chosen_in).double().mean().item()
    # A random replacement equals the original with probability 1 / n_chars and then counts as kept.
    assert abs(masked - 0.8) < 0.01
    assert abs(replaced - 0.1 * (1 - 1 / n_chars)) < 0.008
    assert abs(kept - (0.1 + 0.1 / n_chars)) < 0.008
    # Replacements use every real character, including both ends of the range.
    replacements = chosen_out[(chosen_out != mask_id) & (chosen_out != chosen_in)]
    assert set(replacements.unique().tolist()) == set(range(n_chars))


def test_bert_corruption_never_emits_special_tokens_as_random_chars() -> None:
    # Originals are special ids (>= n_chars), so every non-mask change must be a real character.
    n_chars, mask_id = 5, 6
    x = torch.full((32, 64), 7)
    out = bert_corruption(x, torch.ones_like(x, dtype=torch.bool), mask_id, n_chars, gen(13))
    changed = out[(out != mask_id) & (out != 7)]
    assert len(changed) > 0 and (changed < n_chars).all()


def test_bert_corruption_validates_inputs() -> None:
    with pytest.raises(ValueError):
        bert_corruption(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), 9, 5, gen())
    with pytest.raises(ValueError):
        bert_corruption(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 9, 0, gen())


# --- mask_positions --------------------------------------------------------------------------------


def test_mask_positions() -> None:
    x = torch.arange(12).view(3, 4)
    selected = torch.tensor([[True, False, False, True], [False] * 4, [True] * 4])
    out = mask_positions(x, selected, 99)
    assert out.tolist() == [[99, 1, 2, 99], [4, 5, 6, 7], [99, 99, 99, 99]]
    assert x.tolist() == torch.arange(12).view(3, 4).tolist()
    with pytest.raises(ValueError):
        mask_positions(x, selected.long(), 99)


# --- run_lengths -----------------------------------------------------------------------------------


def test_run_lengths_examples() -> None:
    rows = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert run_lengths(rows).tolist() == [2, 1, 4]
    assert run_lengths(torch.zeros(2, 5, dtype=torch.bool)).tolist() == []
    assert run_lengths(torch.tensor([True, False, True, True])).tolist() == [1, 2]


@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=6))
def test_run_lengths_matches_reference(rows: list[list[bool]]) -> None:
    assert run_lengths(torch.tensor(rows)).tolist() == reference_run_lengths(rows)
