"""Which positions a step commits: the remasking strategies (low_confidence as in LLaDA, random as MDLM's
ancestral order, margin, entropy, and the original framework's `remask`, which fills everything and re-masks the
least confident), `select_top` and the two adaptive rules of parallel decoding: the confidence threshold
(Fast-dLLM) and the entropy budget (EB-sampler)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from unmask.generation.draws import Generators, uniform

REMASKING = ("low_confidence", "random", "margin", "entropy", "remask")


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


def chosen_probability(proposal: Proposal) -> Tensor:
    return proposal.probs.gather(-1, proposal.tokens.to(proposal.probs.device).unsqueeze(-1)).squeeze(-1)


def entropy_nats(probs: Tensor) -> Tensor:
    """Entropy in nats over the last axis; 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


class LowConfidence:
    """Commit the candidates the model gives the highest probability (LLaDA's `low_confidence` remasking)."""

    name = "low_confidence"
    refill = False

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        return chosen_probability(proposal)  # (B, n)


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
        return -entropy_nats(proposal.probs)


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
        entropy = entropy_nats(proposal.probs) / allowed.double().log()  # (B, n) in [0, 1]
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


def threshold_commit(p_drawn: Tensor, score: Tensor, masked: Tensor, threshold: float) -> Tensor:
    """(B, n) bool: the masked positions to commit in one parallel-decoding step (Fast-dLLM, Wu et al. 2025).

    Every masked position whose drawn character has probability `p_drawn` (B, n) >= `threshold`, plus the
    masked position with the highest strategy `score` (B, n), so each row with a masked position commits at
    least one and a block always finishes. threshold 0 commits everything; above 1, exactly one per step.
    """
    best = select_top(score, masked, torch.ones(masked.shape[0], dtype=torch.long, device=masked.device))
    return (masked & (p_drawn >= threshold)) | best


def entropy_budget_commit(entropy: Tensor, score: Tensor, masked: Tensor, budget: float) -> Tensor:
    """(B, n) bool: the masked positions to commit in one entropy-bounded step (the EB-sampler, Ben-Hamu et al.
    2025).

    The masked positions are taken in the strategy's order (`score` (B, n), highest first, ties to the leftmost)
    for as long as the summed `entropy` (B, n), in nats, of those taken stays <= `budget`; the first one is
    always taken, so each row with a masked position commits at least one and a block always finishes. Budget 0
    commits exactly one per step (more only where the model is certain: entropy exactly 0); a budget at least
    the block's summed entropy commits the whole block at once. (The paper bounds the sum minus the largest
    entropy of the set, which makes the first position free; here the budget counts every committed position.)
    """
    B, n = score.shape
    keyed = score.masked_fill(~masked, -math.inf)
    order = keyed.argsort(dim=1, descending=True, stable=True)  # (B, n): masked positions first, best first
    spent = entropy.masked_fill(~masked, 0.0).gather(1, order).cumsum(dim=1)  # (B, n): entropies are >= 0
    first = torch.arange(n, device=score.device) == 0  # (n,)
    taken = (spent <= budget) | first  # (B, n) in sorted order: a prefix, since the sums only grow
    return masked & torch.zeros_like(masked).scatter_(1, order, taken)
