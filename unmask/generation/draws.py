"""Randomness of generation: per-sample generators (`RowGenerators`: a sample does not depend on the batch it is
generated in), uniforms, top-k / top-p filtering and float64 categorical draws (`sample_categorical`). Ids
`>= mask_id` (special tokens: `[MASK]`) are never drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import torch
from torch import Tensor

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
