"""Generating text by iterative unmasking: schedules, float64 sampling, remasking strategies, blocks.

A *canvas* is a `(B, L)` long tensor of character ids with a `fixed` `(B, L)` bool tensor beside it: fixed
positions (a prompt, the text of an infilling template) are never written; every other position starts as
`[MASK]` (`mask_id`) and is filled over `steps` model calls. Ids `>= mask_id` are special tokens (in this
project only `[MASK]`, the last id) and are never emitted.

One step, as in LLaDA's `generate` (Nie et al. 2025) and MaskGIT (Chang et al. 2022):

1. the model sees the canvas (or a window of it) and gives logits `(B, T, V)`;
2. a candidate character is drawn at every position of the current block from the tempered, top-k/top-p
   filtered distribution, in float64 (`sample_categorical`);
3. a *remasking strategy* scores each candidate, and the `num_transfer_tokens` most confident masked positions
   are committed; the others stay `[MASK]`.

Strategies with `refill = True` work the other way round, like the original framework's sampler
(`remask`): every masked position is filled, then positions are masked again down to the schedule's count,
least confident first, so earlier choices can be revised.

Semi-autoregressive generation (`block_length`) fills the canvas block by block, left to right, with the
steps split across the blocks. When the canvas is longer than the model's `block_size`, blocks are
mandatory and each block is generated inside a window of at most `block_size` positions, placed to hold as
much known text (prompt, template, earlier blocks) as possible: see `plan_blocks`.

Every random number comes from explicit generators, and sampling happens on their device. `RowGenerators` gives
every sample (row) its own `torch.Generator`, seeded from the run's seed and the sample's index
(`sample_seed`), and rows draw only from their own: a sample does not depend on the batch it is generated in.
A single `torch.Generator` still works (one stream for the whole batch, as in LLaDA's reference code).

`confidence_threshold` (Fast-dLLM, Wu et al. 2025) replaces the schedule by parallel decoding: each step commits
every masked position of the current block whose drawn character has model probability >= the threshold, and at
least one (the position the strategy ranks first), so the number of forward passes adapts to the model's
certainty.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")
REMASKING = ("low_confidence", "random", "margin", "entropy", "remask")
_MASK64 = (1 << 64) - 1


# --- random streams -------------------------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    """The SplitMix64 finaliser (Steele, Lea & Flood 2014): a bijection of 64-bit integers that scatters nearby
    inputs, so consecutive seeds or sample indices give unrelated generator seeds."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a run seeded with `seed` (a 64-bit integer; the pair determines it)."""
    return _splitmix64((_splitmix64(seed & _MASK64) + index) & _MASK64)


class RowGenerators:
    """One `torch.Generator` per row of a batch; every draw for row b comes from generator b only.

    Drawing `(n, ...)` per row instead of `(B, n, ...)` for the batch costs a Python loop over rows (B is a
    sampling batch, 16 by default), and makes each sample independent of its batch companions and of the batch
    size. Rows that skip a step (nothing to commit) draw nothing, so their streams do not move either.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("RowGenerators needs at least one generator")
        devices = {g.device for g in generators}
        if len(devices) != 1:
            raise ValueError(f"all generators must be on one device, got {sorted(map(str, devices))}")
        self.generators = list(generators)

    @classmethod
    def for_samples(cls, seed: int, first: int, count: int, device: torch.device | str = "cpu") -> RowGenerators:
        """Generators of samples first .. first + count - 1 of a run seeded with `seed`."""
        return cls([torch.Generator(device=device).manual_seed(sample_seed(seed, first + i)) for i in range(count)])

    @property
    def device(self) -> torch.device:
        return self.generators[0].device

    def __len__(self) -> int:
        return len(self.generators)

    def rows(self, index: Tensor) -> RowGenerators:
        """The generators of the rows in `index` (1-D long), in that order (they share state with these)."""
        return RowGenerators([self.generators[i] for i in index.tolist()])

    def rand(self, shape: Sequence[int]) -> Tensor:
        """(B, *shape) float64 uniforms in [0, 1) on `self.device`, row b from generator b."""
        return torch.stack(
            [torch.rand(tuple(shape), dtype=torch.float64, generator=g, device=g.device) for g in self.generators]
        )


Generators: TypeAlias = torch.Generator | RowGenerators


def uniform(shape: Sequence[int], generator: Generators) -> Tensor:
    """float64 uniforms of `shape` on the generator's device; with `RowGenerators`, shape[0] is the batch."""
    if isinstance(generator, RowGenerators):
        if shape[0] != len(generator):
            raise ValueError(f"{len(generator)} row generators for a batch of {shape[0]}")
        return generator.rand(shape[1:])
    return torch.rand(tuple(shape), dtype=torch.float64, generator=generator, device=generator.device)


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


# --- drawing characters ---------------------------------------------------------------------------------------


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the nucleus (top-p, Holtzman et al. 2020) to -inf.

    `logits` (..., V); `top_k = 0` and `top_p = 1` switch each filter off. The most likely id always survives.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).indices  # (..., k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kth, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id when the ids before it already hold top_p of the mass: the nucleus is the smallest prefix
        # reaching top_p, and the first id is never dropped.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_categorical(
    logits: Tensor,
    banned: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: Generators,
) -> Tensor:
    """One id per row of `logits` (..., V), never one where `banned` (V,) is True; float64 throughout.

    With `RowGenerators`, the first axis of `logits` is the batch and row b's noise comes from generator b.

    Gumbel-max in float64 (the field's practice since Zheng et al. 2024, arXiv 2409.02908, showed that
    float32 Gumbel noise truncates small probabilities and lowers sample entropy; LLaDA's `add_gumbel_noise`
    follows it). Temperature 0 is greedy (argmax). Computed on `generator.device`.
    """
    scores = logits.to(generator.device, torch.float64).masked_fill(banned.to(generator.device), -math.inf)
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = filter_logits(scores / temperature, top_k, top_p)
    u = uniform(scores.shape, generator)  # (..., V)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: that id simply loses
    return (scores + gumbel).argmax(dim=-1)


def model_probs(logits: Tensor, banned: Tensor, device: torch.device) -> Tensor:
    """The model's own distribution (no temperature or filtering), float64, special ids at probability 0."""
    return logits.to(device, torch.float64).masked_fill(banned.to(device), -math.inf).softmax(dim=-1)


# --- which positions: remasking strategies --------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """What a strategy sees at one step, for the current block of n positions."""

    tokens: Tensor  # (B, n) a drawn candidate at every masked position (the current id elsewhere)
    probs: Tensor  # (B, n, V) float64 untempered model distribution (special ids 0), on the generator's device
    masked: Tensor  # (B, n) bool: still [MASK] before this step
    editable: Tensor  # (B, n) bool: not fixed (prompt/template positions are never editable)
    context: Tensor  # (B, W) the model's input window with the block's masked positions set to `tokens`
    offset: int  # where the block starts inside `context`


class Remasking(Protocol):
    """Scores candidates; the loop commits (or keeps) the highest-confidence positions.

    `refill = False`: commit the `num_transfer_tokens` most confident masked positions per step.
    `refill = True`: fill all masked positions, then re-mask the least confident editable positions down to
    the schedule's remaining count. A critic (per-position probability that a character is wrong) plugs in as
    one more class whose confidence is `1 - P(wrong)` computed from `proposal.context`.
    """

    name: str
    refill: bool

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        """(B, n) float64 on `generator.device`: higher = more sure. Draw random numbers with `uniform`."""
        ...


def _chosen_probability(proposal: Proposal) -> Tensor:
    return proposal.probs.gather(-1, proposal.tokens.to(proposal.probs.device).unsqueeze(-1)).squeeze(-1)


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats over the last axis; 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


class LowConfidence:
    """Commit the candidates the model gives the highest probability (LLaDA's `low_confidence` remasking)."""

    name = "low_confidence"
    refill = False

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        return _chosen_probability(proposal)  # (B, n)


class RandomOrder:
    """Commit uniformly random positions: MDLM's ancestral order (Sahoo et al. 2024), LLaDA's `random`.

    With exact per-step counts this is the ancestral sampler conditioned on how many positions unmask.
    """

    name = "random"
    refill = False

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        return uniform(proposal.tokens.shape, generator)


class Margin:
    """Commit where the top-1 probability most exceeds the top-2 (Dream's `topk_margin`, Ye et al. 2025)."""

    name = "margin"
    refill = False

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        top2 = proposal.probs.topk(2, dim=-1).values  # (B, n, 2)
        return top2[..., 0] - top2[..., 1]


class Entropy:
    """Commit where the predictive distribution has the lowest entropy (Dream's `entropy`)."""

    name = "entropy"
    refill = False

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        return -_entropy(proposal.probs)


class EntropyRemask:
    """The original framework's sampler: fill everything, re-mask by s * U + (1 - s) * H(p) / log V.

    s = `randomness_strength`: 1 is uniformly random re-masking, 0 purely by normalised entropy (the
    original's default was 0.4). Positions already visible are scored from the same forward pass, where the
    model sees their current character (as the original did); a model trained only on masked positions
    says little there, so `randomness_strength` matters more than it looks.
    """

    name = "remask"
    refill = True

    def __init__(self, randomness_strength: float = 0.4) -> None:
        if not 0.0 <= randomness_strength <= 1.0:
            raise ValueError(f"randomness_strength must be in [0, 1], got {randomness_strength}")
        self.randomness_strength = randomness_strength

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        allowed = (proposal.probs > 0).sum(dim=-1).clamp(min=2)  # (B, n): non-special ids with mass
        entropy = _entropy(proposal.probs) / allowed.double().log()  # (B, n) in [0, 1]
        noise = uniform(entropy.shape, generator)  # (B, n)
        s = self.randomness_strength
        return -(s * noise + (1.0 - s) * entropy)  # the highest re-masking score is the least confident


def make_remasking(name: str, randomness_strength: float = 0.4) -> Remasking:
    strategies: dict[str, Callable[[], Remasking]] = {
        "low_confidence": LowConfidence,
        "random": RandomOrder,
        "margin": Margin,
        "entropy": Entropy,
        "remask": lambda: EntropyRemask(randomness_strength),
    }
    if name not in strategies:
        raise ValueError(f"unknown remasking {name!r}; expected one of {', '.join(REMASKING)}")
    return strategies[name]()


def select_top(scores: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """(B, n) bool: the `k[b]` highest-scoring candidates of each row (all of them if fewer).

    Ranks come from one stable sort per row (ties go to the leftmost position), so the count is exact and
    there is no Python loop over rows.
    """
    B, n = scores.shape
    keyed = scores.masked_fill(~candidates, -math.inf)
    order = keyed.argsort(dim=1, descending=True, stable=True)  # (B, n)
    positions = torch.arange(n, device=scores.device).expand(B, n)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, n): rank of each position
    return candidates & (rank < k.to(scores.device).unsqueeze(1))


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


def threshold_commit(p_drawn: Tensor, score: Tensor, masked: Tensor, threshold: float) -> Tensor:
    """(B, n) bool: the masked positions to commit in one parallel-decoding step (Fast-dLLM, Wu et al. 2025).

    Every masked position whose drawn character has probability `p_drawn` (B, n) >= `threshold`, plus the
    masked position with the highest strategy `score` (B, n), so each row with a masked position commits at
    least one and a block always finishes. threshold 0 commits everything; above 1, exactly one per step.
    """
    best = select_top(score, masked, torch.ones(masked.shape[0], dtype=torch.long, device=masked.device))
    return (masked & (p_drawn >= threshold)) | best


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 64
    schedule: str = "linear"
    remasking: str = "random"
    randomness_strength: float = 0.4  # for remasking="remask"
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    block_length: int | None = None  # None: one block, or default_block_length for canvases over block_size
    # None: the schedule's counts; a float: commit every masked position of the block whose drawn character has
    # probability >= this, at least one per step (Fast-dLLM); `steps` and `schedule` are then unused.
    confidence_threshold: float | None = None


@dataclass(frozen=True)
class StepEvent:
    """Passed to `on_step` after every step that ran the model."""

    step: int  # 0-based, counted over all blocks
    steps: int  # planned steps (with a confidence threshold: the most possible, one per masked position)
    block: int
    canvas: Tensor  # (B, L) after the step (a view: copy it to keep it)
    changed: Tensor  # (B, L) bool: positions written or re-masked in this step
    forward_passes: int  # model calls so far
    nfe: Tensor | None = None  # (B,) long: model calls so far that each sample took part in


@dataclass
class Generation:
    tokens: Tensor  # (B, L) final canvas
    logprobs: Tensor  # (B, L) float64 on the generator's device: log p of each generated character when it was
    # written (0 where fixed)
    forward_passes: int  # model calls for the batch
    nfe: Tensor  # (B,) long, CPU: number of function evaluations per sample (model calls whose output it used)


def _token_logprob(probs: Tensor, tokens: Tensor) -> Tensor:
    return probs.gather(-1, tokens.to(probs.device).unsqueeze(-1)).squeeze(-1).log()  # (B, n)


LogitsFor = Callable[[Tensor], Tensor]  # rows (R,) -> logits (R, n, V) of the current block for those rows


class _Denoiser:
    """The state of one generation: canvas, log-probabilities, counters; fills one block at a time.

    The model is reached through a `LogitsFor` per block, so windowed models and cached ones (block diffusion)
    share the step logic. Only the rows that have something to do in a step are run and draw random numbers.
    """

    def __init__(
        self,
        x: Tensor,
        fixed: Tensor,
        mask_id: int,
        config: SamplingConfig,
        strategy: Remasking,
        generator: Generators,
        on_step: Callable[[StepEvent], None] | None,
        total_steps: int,
    ) -> None:
        if config.confidence_threshold is not None:
            if strategy.refill:
                raise ValueError(f"confidence_threshold does not apply to the refill strategy {strategy.name!r}")
            if config.confidence_threshold < 0:
                raise ValueError(f"confidence_threshold must be >= 0, got {config.confidence_threshold}")
        if isinstance(generator, RowGenerators) and len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} row generators for a batch of {x.shape[0]}")
        B, L = x.shape
        self.x, self.fixed, self.mask_id, self.config, self.strategy = x, fixed, mask_id, config, strategy
        self.generator, self.on_step, self.total_steps = generator, on_step, total_steps
        self.sampling_device = generator.device  # float64 lives here (MPS has none: the caller passes CPU ones)
        self.logprobs = torch.zeros(B, L, dtype=torch.float64, device=self.sampling_device)  # (B, L)
        self.nfe = torch.zeros(B, dtype=torch.long)  # (B,)
        self.forward_passes = 0
        self.step = 0
        self.banned: Tensor | None = None

    def result(self) -> Generation:
        return Generation(self.x, self.logprobs, self.forward_passes, self.nfe)

    def fill_block(self, b: int, block: Block, logits_for: LogitsFor) -> None:
        x, config, strategy, mask_id = self.x, self.config, self.strategy, self.mask_id
        s, e = block.start, block.end
        offset = s - block.window_start
        threshold = config.confidence_threshold
        editable = ~self.fixed[:, s:e]  # (B, n): all masked at the start of the block
        counts = remaining = None
        if threshold is None:
            counts = num_transfer_tokens(editable.sum(dim=1), block.steps, config.schedule)  # (B, S_b)
            remaining = editable.sum(dim=1, keepdim=True) - counts.cumsum(dim=1)  # (B, S_b): masked after each step
        for i in range(block.steps):
            current = x[:, s:e]  # (B, n)
            masked = editable & (current == mask_id)  # (B, n)
            if threshold is not None:
                active = masked.any(dim=1)  # (B,)
                if not bool(active.any()):
                    break  # the block is done: a threshold run takes only the steps it needs
            elif strategy.refill:
                active = editable.any(dim=1)
            else:
                assert counts is not None
                active = counts[:, i] > 0
            if not bool(active.any()):
                self.step += 1  # nothing to commit in this step: skip the model
                continue
            rows = active.nonzero().flatten()  # (R,)
            generator = self.generator.rows(rows) if isinstance(self.generator, RowGenerators) else self.generator
            logits = logits_for(rows)  # (R, n, V)
            self.forward_passes += 1
            self.nfe[rows.cpu()] += 1
            if self.banned is None:
                # Special tokens are the ids from mask_id up; they are never drawn and carry probability 0.
                self.banned = torch.arange(logits.shape[-1], device=self.sampling_device) >= mask_id  # (V,)
            current, masked, row_editable = current[rows], masked[rows], editable[rows]  # (R, n)
            drawn = sample_categorical(logits, self.banned, config.temperature, config.top_k, config.top_p, generator)
            probs = model_probs(logits, self.banned, self.sampling_device)  # (R, n, V)
            tokens = torch.where(masked, drawn.to(x.device), current)  # (R, n)
            context = x[rows, block.window_start : block.window_end].clone()  # (R, W)
            context[:, offset : offset + e - s] = tokens
            proposal = Proposal(tokens, probs, masked, row_editable, context, offset)
            confidence = strategy.confidence(proposal, generator).to(x.device)  # (R, n)
            if strategy.refill:
                assert remaining is not None
                remask = select_top(-confidence, row_editable, remaining[rows, i])  # (R, n)
                new = torch.where(remask, torch.full_like(tokens, mask_id), tokens)
                written = masked & ~remask
            else:
                if threshold is not None:
                    # Confidence for the threshold is the model's probability of the drawn character, as in
                    # LLaDA's and Fast-dLLM's `x0_p` (untempered, whatever the strategy ranks by).
                    p_drawn = _chosen_probability(proposal).to(x.device)  # (R, n)
                    written = threshold_commit(p_drawn, confidence, masked, threshold)
                else:
                    assert counts is not None
                    written = select_top(confidence, masked, counts[rows, i])  # (R, n)
                new = torch.where(written, tokens, current)
            token_logp = _token_logprob(probs, tokens)  # (R, n) on the sampling device
            sampling_rows = rows.to(self.sampling_device)
            self.logprobs[sampling_rows, s:e] = torch.where(
                written.to(self.sampling_device), token_logp, self.logprobs[sampling_rows, s:e]
            )
            x[rows, s:e] = new
            if self.on_step is not None:
                changed = torch.zeros_like(self.fixed)  # (B, L)
                changed[rows, s:e] = new != current
                self.on_step(
                    StepEvent(self.step, self.total_steps, b, x, changed, self.forward_passes, self.nfe.clone())
                )
            self.step += 1


@torch.inference_mode()
def generate(
    model: Callable[[Tensor], Tensor],
    canvas: Tensor,
    fixed: Tensor,
    mask_id: int,
    block_size: int,
    config: SamplingConfig,
    generator: Generators,
    on_step: Callable[[StepEvent], None] | None = None,
    remasking: Remasking | None = None,
) -> Generation:
    """Fill every non-fixed position of `canvas` (B, L); `model` maps ids (B, T) to logits (B, T, V).

    `generator`: `RowGenerators` (one per row: each sample independent of the batch) or one `torch.Generator`
    for the whole batch. `remasking` overrides `config.remasking` (e.g. a critic). Steps in which no row commits
    anything are skipped without calling the model (they happen when a block has fewer masked positions than
    steps), and a row with nothing to commit in a step is left out of that step's model call and draws.
    """
    strategy = remasking if remasking is not None else make_remasking(config.remasking, config.randomness_strength)
    x = torch.where(fixed, canvas, torch.full_like(canvas, mask_id))  # (B, L)
    steps = None if config.confidence_threshold is not None else config.steps
    blocks = plan_blocks(~fixed, block_size, config.block_length, steps)
    total_steps = sum(block.steps for block in blocks)
    denoiser = _Denoiser(x, fixed, mask_id, config, strategy, generator, on_step, total_steps)
    for b, block in enumerate(blocks):
        offset, n = block.start - block.window_start, block.end - block.start

        def logits_for(rows: Tensor, block: Block = block, offset: int = offset, n: int = n) -> Tensor:
            window = x[rows, block.window_start : block.window_end]  # (R, W)
            return model(window)[:, offset : offset + n]  # (R, n, V)

        denoiser.fill_block(b, block, logits_for)
    return denoiser.result()


# --- canvases -------------------------------------------------------------------------------------------------


def prompt_canvas(prompt_ids: list[int], length: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """(L,) ids and (L,) fixed mask for a fixed prefix continued to `length` characters."""
    if len(prompt_ids) >= length:
        raise ValueError(f"a prompt of {len(prompt_ids)} characters leaves nothing to generate in {length}")
    canvas = torch.full((length,), mask_id, dtype=torch.long)
    canvas[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    fixed = torch.arange(length) < len(prompt_ids)
    return canvas, fixed


def placeholder_spans(template: str, placeholder: str) -> list[tuple[int, int]]:
    """[start, end) of every run of `placeholder` in `template`."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, ch in enumerate(template + "\0"):
        if ch == placeholder and start is None:
            start = i
        elif ch != placeholder and start is not None:
            spans.append((start, i))
            start = None
    return spans


def infill_canvas(template_ids: list[int | None], mask_id: int) -> tuple[Tensor, Tensor]:
    """(L,) ids and fixed mask from a template already encoded, with None at the positions to fill."""
    canvas = torch.tensor([mask_id if t is None else t for t in template_ids], dtype=torch.long)
    fixed = torch.tensor([t is not None for t in template_ids], dtype=torch.bool)
    return canvas, fixed
