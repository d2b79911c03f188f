"""How many positions each step commits (`num_transfer_tokens`, linear or cosine, MaskGIT) and how a canvas is cut
into blocks and windows (`plan_blocks`: semi-autoregressive blocks, each inside a window of at most block_size
positions holding as much known text as fits; the steps split across the blocks)."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")


# --- how many positions per step ------------------------------------------------------------------------------


def num_transfer_tokens(mask_count: Tensor, steps: int, schedule: str = "linear") -> Tensor:
    """Positions to commit at each step: `(B, steps)` long, each row summing exactly to `mask_count[b]`.

    The schedule gives the fraction f(s) of a row's masked positions committed after step s of S; the counts
    are differences of the rounded cumulative amounts, so they are exact integers whatever the ratio.
    - linear: f(s) = s / S, equal counts (+-1), as in LLaDA's `get_num_transfer_tokens`;
    - cosine: f(s) = 1 - cos(pi s / 2S), MaskGIT's schedule (Chang et al. 2022, sec. 3.2): few commits while
      the canvas is mostly masked and the model least sure, many at the end.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    count = mask_count.long().reshape(-1, 1)  # (B, 1)
    s = torch.arange(steps + 1, device=count.device)  # (S + 1,)
    if schedule == "linear":
        cumulative = count * s // steps  # (B, S + 1): integer maths, exact
    elif schedule == "cosine":
        fraction = 1.0 - torch.cos(0.5 * math.pi * s.double() / steps)  # (S + 1,)
        cumulative = torch.round(count.double() * fraction).long()  # (B, S + 1), non-decreasing
        cumulative[:, 0] = 0
        cumulative[:, -1] = count[:, 0]  # cos(pi / 2) is not exactly 0 in floating point
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    return cumulative.diff(dim=1)  # (B, S)


# --- blocks and windows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Canvas positions [start, end) filled in `steps` steps, seen by the model through [window_start, window_end)."""

    start: int
    end: int
    steps: int
    window_start: int
    window_end: int


def split_steps(weights: list[int], steps: int) -> list[int]:
    """Steps per block in proportion to `weights`, at least one each, summing exactly to `steps`.

    Largest remainder (Hamilton) apportionment in integer arithmetic: block i is owed steps * w_i / W. The
    corrections (one step at a time to the most under-served block, or from the most over-served one when the
    one-step minimum overshot; ties to the leftmost) go through a heap: O(n log n) for n blocks.
    """
    n = len(weights)
    if steps < n:
        raise ValueError(f"{steps} steps cannot cover {n} blocks")
    if sum(weights) == 0:
        weights = [1] * n
    total = sum(weights)
    owed = [steps * w for w in weights]  # in units of 1 / total
    alloc = [max(1, o // total) for o in owed]
    excess = sum(alloc) - steps
    if excess > 0:  # only blocks above the minimum give a step back; steps >= n guarantees there are enough
        over = [(owed[i] - alloc[i] * total, i) for i in range(n) if alloc[i] > 1]  # most over-served first
        heapq.heapify(over)
        for _ in range(excess):
            _, i = heapq.heappop(over)
            alloc[i] -= 1
            if alloc[i] > 1:
                heapq.heappush(over, (owed[i] - alloc[i] * total, i))
    elif excess < 0:
        under = [(alloc[i] * total - owed[i], i) for i in range(n)]  # most under-served first
        heapq.heapify(under)
        for _ in range(-excess):
            _, i = heapq.heappop(under)
            alloc[i] += 1
            heapq.heappush(under, (alloc[i] * total - owed[i], i))
    return alloc


def default_block_length(length: int, block_size: int) -> int | None:
    """No blocks when the canvas fits the model; else half a context, so every block after the first sees at
    least block_size / 2 characters of left context inside its window."""
    return None if length <= block_size else max(1, block_size // 2)


def plan_blocks(masked: Tensor, block_size: int, block_length: int | None, steps: int | None) -> list[Block]:
    """Blocks over the span of masked positions of `masked` (B, L), and their model windows.

    Blocks are `block_length` positions wide, starting at the first masked position (so a prompt is never
    part of a block, as in LLaDA); blocks with nothing to fill are dropped. Steps are split across the blocks
    in proportion to their masked positions (equal blocks get equal steps, as in LLaDA); `steps=None` gives
    each block as many steps as it has positions (the most a confidence-threshold run can take).

    The window (at most `block_size` wide, always containing the block) is placed where it holds the most
    known characters at the time the block is generated: fixed text anywhere, plus everything left of the
    block, which earlier blocks have filled. Ties go to the leftmost window. That is always the window ending
    at the block's end (or starting at 0): moving a window one position right trades a position left of the
    block, known in all B rows, for one on the right known in at most B rows, so it never gains. For plain
    continuation this is the block with as much text to its left as fits; for infilling near the start it
    also takes template text on the right.

    Planning is O(L + n log n) for n blocks: no per-block pass over the canvas.
    """
    B, L = masked.shape
    per_position = masked.sum(dim=0).cpu()  # (L,) rows in which each position is to be filled
    where = per_position.nonzero().flatten()
    if where.numel() == 0:
        return []
    first, last = int(where[0]), int(where[-1]) + 1
    if block_length is None:
        block_length = default_block_length(L, block_size) or (last - first)
    if block_length > block_size:
        raise ValueError(f"block_length {block_length} exceeds the model's block_size {block_size}")
    starts = torch.arange(first, last, block_length)  # (n,)
    ends = (starts + block_length).clamp(max=last)  # (n,)
    cumulative = torch.cat((torch.zeros(1, dtype=torch.long), per_position.cumsum(0)))  # (L + 1,)
    weights = cumulative[ends] - cumulative[starts]  # (n,) masked (row, position) pairs per block
    keep = weights > 0
    span_starts, span_ends, span_weights = starts[keep].tolist(), ends[keep].tolist(), weights[keep].tolist()
    if steps is None:
        step_counts = [e - s for s, e in zip(span_starts, span_ends, strict=True)]
    else:
        step_counts = split_steps(span_weights, steps)
    W = min(L, block_size)
    return [
        Block(s, e, n_steps, max(0, e - W), max(0, e - W) + W)
        for s, e, n_steps in zip(span_starts, span_ends, step_counts, strict=True)
    ]
