"""The Monte-Carlo pieces every masked-diffusion loss and bound is built from, written once.

A masked-diffusion term needs a mask rate (t, with p_mask = t under the linear schedule alpha_t = 1 - t) or a
mask count (k), and masks drawn from it:

- training draws one batch of rates by *systematic* sampling (one u ~ U[0, 1) shifted into each of n equal
  strata, `systematic_uniforms`: MDLM's and MD4's low-discrepancy "antithetic" sampling, applied by BD3-LM over
  rows and blocks);
- likelihood estimates draw each row's D rates by *stratified* sampling (an independent uniform inside each of
  the D strata, `stratified_uniforms`), so that rows are independent and a standard error can be computed;
- a rate becomes a count with `count_from_uniform` (k uniform on {1..L}), a count becomes a uniform k-subset
  (`unmask.curriculum.masking.random_k_subsets`), a rate becomes Bernoulli masks with `bernoulli_masks`;
- exact enumeration for tests and tiny sequences uses `all_subsets`.

Every function takes an explicit generator (on the device the draws are made) and never the global RNG.
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor


def systematic_uniforms(n: int, generator: torch.Generator) -> Tensor:
    """(n,) float32 in [0, 1): (u + i / n) mod 1 with one u ~ U[0, 1): exactly one draw in each of n strata."""
    dev = generator.device
    u = torch.rand(1, generator=generator, device=dev)  # (1,)
    return (u + torch.arange(n, device=dev) / n) % 1.0  # (n,)


def stratified_uniforms(rows: int, strata: int, generator: torch.Generator) -> Tensor:
    """(rows, strata) float64 in [0, 1): column d uniform in [d / D, (d + 1) / D), independently everywhere."""
    dev = generator.device
    d = torch.arange(strata, device=dev, dtype=torch.float64)  # (D,)
    return (d + torch.rand(rows, strata, generator=generator, device=dev, dtype=torch.float64)) / strata


def count_from_uniform(v: Tensor, L: int) -> Tensor:
    """Mask counts k = 1 + floor(L v) in 1..L (long, v's shape): uniform on {1..L} when v ~ U[0, 1)."""
    return (1 + (v * L).floor().long()).clamp(1, L)


def bernoulli_masks(p_mask: Tensor, shape: tuple[int, int], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """(R, L) bool: each position masked independently with probability p_mask (broadcast to `shape`), drawn in
    `dtype` (float32 for training batches, float64 for likelihood estimates)."""
    u = torch.rand(*shape, generator=generator, device=generator.device, dtype=dtype)
    return u < p_mask


def all_subsets(L: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Every nonempty subset of L positions, by size: (masks (2^L - 1, L) bool, sizes (2^L - 1,) long)."""
    rows, sizes = [], []
    for k in range(1, L + 1):
        for subset in combinations(range(L), k):
            row = [False] * L
            for i in subset:
                row[i] = True
            rows.append(row)
            sizes.append(k)
    return torch.tensor(rows, dtype=torch.bool, device=device), torch.tensor(sizes, dtype=torch.long, device=device)
