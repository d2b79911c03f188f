"""Choosing and corrupting masked positions for masked discrete-diffusion training.

Every function here is pure and vectorised over the batch: selections are boolean `(B, T)` tensors
(`True` = the position is masked/corrupted), and corruptions return new `(B, T)` long tensors.

All randomness comes from the explicit `generator` argument and every random tensor is created on
`generator.device`, so a given generator state always produces the same result and nothing here
touches the global torch RNG (training resumes and data-parallel ranks stay reproducible).
"""

from __future__ import annotations

import math

import torch

# Round cap of the sticky process. With p1 > 0 every free position can start a region each round, so rows
# fill geometrically fast and 64 rounds are only exhausted by tiny probabilities; the p1 = 0 path (a single
# region growing at most one cell per side per round, so up to T - 1 rounds even at p2 = 1) gets max(64, T).
STICKY_MAX_ROUNDS = 64

# BERT-style split of the selected positions: 80% -> mask token, 10% -> random real character, 10% -> kept.
BERT_MASK_FRACTION = 0.8
BERT_RANDOM_FRACTION = 0.1


def num_masked(target_masked_ratio: float, T: int) -> int:
    """Exact number of masked positions per row for a sticky stage: round-half-up of `ratio * T` in [0, T]."""
    return min(max(int(math.floor(target_masked_ratio * T + 0.5)), 0), T)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def key_ranks(keys: torch.Tensor) -> torch.Tensor:
    """Rank (B, T) long of each key within its row: 0 for the smallest. Ranks are distinct even when keys tie."""
    return keys.argsort(dim=1).argsort(dim=1)


def random_k_subsets(k: torch.Tensor | int, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool: in each row b exactly min(k[b], T) positions, a uniformly random subset of that size.

    Every position gets a uniform key and the k smallest keys are kept (distinct ranks, so the count is exact).
    `k` is an int or a (B,) tensor; the draws come from `generator` (on its device).
    """
    keys = torch.rand(shape, generator=generator, device=generator.device)  # (B, T)
    count = k if isinstance(k, int) else k[:, None]
    return key_ranks(keys) < count


def _keep_random(candidates: torch.Tensor, count: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keep `min(count[b], candidates[b].sum())` uniformly random `True` positions of each row.

    Candidates get uniform keys and everything else a key above any uniform draw; a position survives when
    its rank within its row is below the row's count, so no per-row Python loop is needed.
    """
    B, T = candidates.shape
    keys = torch.rand(B, T, generator=generator, device=generator.device)  # (B, T)
    keys = keys.masked_fill(~candidates, 2.0)
    return candidates & (key_ranks(keys) < count.unsqueeze(1))


def _single_region(batch_size: int, T: int, k: int, p2: float, generator: torch.Generator) -> torch.Tensor:
    """The sticky process for p1 = 0 < p2 and 0 < k < T, simulated in closed form per row.

    With p1 = 0 the first round seeds one uniform cell (every probability is 0), and from then on only the
    (at most two) cells just outside the region can be proposed, each with probability p2 per round, so the
    row is always one region `[seed - left, seed + right]`. Each side's growth is a clipped cumulative sum of
    its per-round successes, which turns the sequential rounds into a handful of tensor ops.
    """
    device = generator.device
    rounds = max(STICKY_MAX_ROUNDS, T) - 1  # growth rounds; the seed took round one
    seed = torch.randint(0, T, (batch_size, 1), generator=generator, device=device)  # (B, 1)
    room = torch.cat((seed, T - 1 - seed), dim=1).unsqueeze(1)  # (B, 1, 2): free cells left / right
    tries = torch.rand(batch_size, rounds, 2, generator=generator, device=device) < p2  # (B, R, 2)
    grown = torch.minimum(tries.cumsum(dim=1), room)  # (B, R, 2): cells gained per side after each round
    # Prepend the seed-only state so k = 1 finishes in round zero.
    grown = torch.cat((torch.zeros_like(grown[:, :1]), grown), dim=1)  # (B, R + 1, 2)
    size = 1 + grown.sum(dim=2)  # (B, R + 1), non-decreasing
    # Index of the first state with at least k cells; R + 1 means the round cap came first.
    reached = (size < k).sum(dim=1)  # (B,)
    last = reached.clamp(max=rounds).view(batch_size, 1, 1).expand(batch_size, 1, 2)
    final = grown.gather(1, last).squeeze(1)  # (B, 2)
    # Sizes grow by at most 2 per round, so an overshoot is exactly k + 1: both ends were proposed while one
    # cell was needed, and keeping a uniform one of the two proposals means dropping a fair-coin side.
    over = (1 + final.sum(dim=1)) > k  # (B,)
    drop_left = torch.rand(batch_size, generator=generator, device=device) < 0.5  # (B,)
    final = final - torch.stack((over & drop_left, over & ~drop_left), dim=1).long()
    positions = torch.arange(T, device=device)  # (T,)
    left = seed - final[:, :1]  # (B, 1)
    right = seed + final[:, 1:]  # (B, 1)
    selected = (positions >= left) & (positions <= right)  # (B, T)
    if bool((reached > rounds).any()):
        selected |= _keep_random(~selected, k - selected.sum(dim=1), generator)
    return selected


def sticky_selection(
    batch_size: int,
    T: int,
    target_masked_ratio: float,
    p1_probability: float,
    p2_probability: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Select exactly `num_masked(target_masked_ratio, T)` positions per row, grown in clustered rounds.

    Semantics (the `sticky` stage): positions `i - 1` and `i + 1` of the same row are the neighbours of
    `i`. In each round, every unselected position of a row still short of its target is proposed
    independently with probability `p2_probability` if a neighbour was selected before this round, else
    `p1_probability`. If a row's proposals exceed what it still needs, a uniformly random subset of exactly
    the needed size is kept; earlier picks are never undone, so clusters are never punched through.

    A short row whose candidates all have probability 0 is seeded with one uniformly random candidate that
    round. With p1 = 0 that happens once (in round one), after which a single region grows with p2; this
    case is simulated in closed form with a cap of `max(64, T)` rounds. With p2 = 0 it happens once every
    free position touches a selected one; such a row stays stuck and would get one uniform seed per round
    until full, so its whole shortfall is drawn uniformly at once, which has the same distribution. After
    the round cap (64 when p1 > 0), any remaining shortfall (reachable only with small probabilities) is
    filled uniformly at random among the unselected positions.

    Returns a bool tensor of shape `(batch_size, T)` on `generator.device`.
    """
    _check_probability("target_masked_ratio", target_masked_ratio)
    _check_probability("p1_probability", p1_probability)
    _check_probability("p2_probability", p2_probability)
    p1, p2 = p1_probability, p2_probability
    device = generator.device
    k = num_masked(target_masked_ratio, T)
    if k == 0 or batch_size == 0:
        return torch.zeros(batch_size, T, dtype=torch.bool, device=device)
    if k == T:
        return torch.ones(batch_size, T, dtype=torch.bool, device=device)
    if p1 == 0.0 and p2 > 0.0:
        return _single_region(batch_size, T, k, p2, generator)

    # Selection with a never-selected border column on each side, so the neighbour test is one shifted OR.
    # The views are made once: they alias `padded`, so they always see the current selection.
    padded = torch.zeros(batch_size, T + 2, dtype=torch.bool, device=device)  # (B, T + 2)
    selected, left, right = padded[:, 1:-1], padded[:, :-2], padded[:, 2:]  # (B, T) views
    need = torch.full((batch_size,), k, dtype=torch.long, device=device)  # (B,) still to select per row
    finished_rows: torch.Tensor | None = None  # (B, 1) once some row has hit its target
    # Rows that overshoot are finished in that round; their proposals wait here and all such rows are trimmed
    # by one sort after the loop instead of one sort per round in which some row overshoots.
    parked = torch.zeros_like(selected)  # (B, T)
    parked_need = torch.zeros_like(need)  # (B,)
    any_parked = False
    for _ in range(STICKY_MAX_ROUNDS):
        prob = torch.where(left | right, p2, p1)  # (B, T)
        prob.masked_fill_(selected, 0.0)
        if finished_rows is not None:
            prob.masked_fill_(finished_rows, 0.0)
        proposals = torch.rand(batch_size, T, generator=generator, device=device) < prob  # (B, T)
        if p2 == 0.0:
            # Stuck rows (no positive probability left) propose every free position and the trim keeps
            # exactly their shortfall. Finished rows are all-zero too, so they are excluded from `free`.
            stuck = ~(prob > 0.0).any(dim=1, keepdim=True)  # (B, 1)
            free = ~selected if finished_rows is None else ~(selected | finished_rows)  # (B, T)
            proposals = torch.where(stuck, free, proposals)
        new_need = need - proposals.sum(dim=1)  # (B,)
        # One host sync per round: whether any row overshot (needs a trim) and whether any is still short.
        lowest, highest = (int(v) for v in torch.aminmax(new_need))
        if lowest < 0:
            if highest <= 0 and not any_parked:
                # Every row finishes now and none is parked: trim in place, no parking needed.
                proposals = _keep_random(proposals, need, generator)
            else:
                overshot = new_need < 0  # (B,)
                parked |= proposals & overshot.unsqueeze(1)
                parked_need = torch.where(overshot, need, parked_need)
                proposals &= ~overshot.unsqueeze(1)
                any_parked = True
            new_need.clamp_(min=0)
        selected |= proposals
        need = new_need
        if highest <= 0:
            break
        if lowest <= 0:
            finished_rows = (need == 0).unsqueeze(1)
    else:
        # Round cap reached: top the short rows up uniformly (a no-op for rows that hit the target).
        selected |= _keep_random(~selected, need, generator)
    if any_parked:
        selected |= _keep_random(parked, parked_need, generator)
    return selected.contiguous()


def random_selection(
    batch_size: int, T: int, min_ratio: float, max_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Per row draw a ratio `r ~ U(min_ratio, max_ratio)`, then select each position independently with
    probability `r` (the `random` stage: `(0, max_masked_ratio)` or its `masking_rate_range`).

    Returns a bool tensor of shape `(batch_size, T)` on `generator.device`.
    """
    _check_probability("min_ratio", min_ratio)
    _check_probability("max_ratio", max_ratio)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio ({min_ratio}) must not exceed max_ratio ({max_ratio})")
    device = generator.device
    u = torch.rand(batch_size, 1, generator=generator, device=device)  # (B, 1)
    ratio = min_ratio + (max_ratio - min_ratio) * u  # (B, 1)
    return torch.rand(batch_size, T, generator=generator, device=device) < ratio  # (B, T)


def span_selection(batch_size: int, T: int, spans_count: int, generator: torch.Generator) -> torch.Tensor:
    """Select the union of `spans_count` inclusive spans per row (the `span` stage).

    Per row, `2k` cut points are drawn uniformly from `[0, T)` and sorted; consecutive pairs `(s1, e1),
    (s2, e2), ...` become spans and every `i` with `s <= i <= e` is selected. The sorted points cut the row
    into `2k + 1` gaps of equal expected size and the spans cover `k` of them, so the expected coverage is
    about `k / (2k + 1)` whatever `k` is (slightly more from the inclusive ends).

    Returns a bool tensor of shape `(batch_size, T)` on `generator.device`.
    """
    if spans_count < 0:
        raise ValueError(f"spans_count must be >= 0, got {spans_count}")
    device = generator.device
    if spans_count == 0 or T == 0:
        return torch.zeros(batch_size, T, dtype=torch.bool, device=device)
    points = torch.randint(0, T, (batch_size, 2 * spans_count), generator=generator, device=device)
    points = points.sort(dim=1).values  # (B, 2k)
    starts, ends = points[:, 0::2], points[:, 1::2]  # (B, k) each
    # Difference array: +1 at each start, -1 just past each end; the prefix sum counts covering spans.
    # Spans from sorted pairs only overlap at shared endpoints, and "> 0" takes the union either way.
    diff = torch.zeros(batch_size, T + 1, dtype=torch.long, device=device)  # (B, T + 1)
    diff.scatter_add_(1, starts, torch.ones_like(starts))
    diff.scatter_add_(1, ends + 1, -torch.ones_like(ends))
    return diff.cumsum(dim=1)[:, :T] > 0  # (B, T)


def _check_pair(x: torch.Tensor, selected: torch.Tensor) -> None:
    if x.shape != selected.shape:
        raise ValueError(f"x shape {tuple(x.shape)} and selected shape {tuple(selected.shape)} differ")
    if selected.dtype != torch.bool:
        raise ValueError(f"selected must be a bool tensor, got {selected.dtype}")


def bert_corruption(
    x: torch.Tensor, selected: torch.Tensor, mask_id: int, n_chars: int, generator: torch.Generator
) -> torch.Tensor:
    """BERT 80/10/10 corruption of the selected positions of `x` (B, T); returns a new long tensor.

    One uniform `u` per position: `u < 0.8` -> `mask_id`; `0.8 <= u < 0.9` -> a uniformly random real
    character id in `[0, n_chars)` (never a special token, possibly equal to the original); otherwise the
    original id is kept. Unselected positions are always unchanged and `x` is not modified.
    """
    _check_pair(x, selected)
    if n_chars < 1:
        raise ValueError(f"n_chars must be >= 1, got {n_chars}")
    device = generator.device
    u = torch.rand(x.shape, generator=generator, device=device).to(x.device)  # (B, T)
    random_chars = torch.randint(0, n_chars, x.shape, generator=generator, device=device)  # (B, T)
    random_chars = random_chars.to(device=x.device, dtype=x.dtype)
    to_mask = selected & (u < BERT_MASK_FRACTION)  # (B, T)
    to_random = selected & (u >= BERT_MASK_FRACTION) & (u < BERT_MASK_FRACTION + BERT_RANDOM_FRACTION)
    out = torch.where(to_random, random_chars, x)  # (B, T)
    return out.masked_fill(to_mask, mask_id)


def mask_positions(x: torch.Tensor, selected: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Replace the selected positions of `x` (B, T) with `mask_id`; returns a new tensor."""
    _check_pair(x, selected)
    return x.masked_fill(selected, mask_id)


def run_lengths(selected: torch.Tensor) -> torch.Tensor:
    """Lengths of all maximal runs of `True` in every row of `selected` (..., T), as a 1-D long tensor.

    Runs never cross rows. Order is row-major (row by row, left to right). For tests and diagnostics.
    """
    if selected.dim() == 0:
        raise ValueError("selected must have at least one dimension")
    rows = selected.reshape(-1, selected.shape[-1]).to(torch.int8)  # (R, T)
    # Pad with False on both sides so every run has a rising edge (start) and a falling edge (one past end).
    padded = torch.nn.functional.pad(rows, (1, 1))  # (R, T + 2)
    edges = padded[:, 1:] - padded[:, :-1]  # (R, T + 1)
    # nonzero() is row-major, so the i-th start and the i-th end belong to the same run.
    starts = (edges == 1).nonzero()[:, 1]
    ends = (edges == -1).nonzero()[:, 1]
    return ends - starts
