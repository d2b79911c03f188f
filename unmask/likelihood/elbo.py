"""Likelihood of character models: the masked-diffusion negative ELBO and the exact autoregressive NLL.

Masked (absorbing-state) diffusion with the linear schedule
------------------------------------------------------------
Every position of a clean sequence x (length L) independently stays itself with probability alpha_t = 1 - t and
becomes [MASK] otherwise, so the per-position mask probability is p_mask = t (all masked at t = 1). The
continuous-time negative ELBO (Sahoo et al. 2024, MDLM; Shi et al. 2024, MD4) is

    -log p(x) <= NELBO(x) = int_0^1 w(t) E_{z_t ~ q(.|x)} [ sum_{i: z_t^i = [MASK]} -log p(x^i | z_t) ] dt

with w(t) = -alpha'_t / (1 - alpha_t) = 1 / t for alpha_t = 1 - t. Unmasked positions contribute nothing (MDLM's
"carry-over unmasking"), and the network needs no time input: given z_t, the optimal prediction does not depend
on t (Ou et al. 2024, RADD).

Discrete form. Given t, the number of masked positions k is Binomial(L, t) and, given k, the masked set M is
uniform among the C(L, k) sets of that size. Write f(M) = sum_{i in M} -log p(x^i | x with M masked) and F_k for
the mean of f over |M| = k. Integrating t out,

    NELBO(x) = sum_k F_k C(L, k) int_0^1 t^(k-1) (1 - t)^(L-k) dt = sum_k F_k C(L, k) B(k, L-k+1) = sum_{k=1}^L F_k / k

because C(L, k) B(k, L-k+1) = [L! / (k! (L-k)!)] [(k-1)! (L-k)! / L!] = 1 / k (k = 0 adds nothing: f of the
empty set is 0). Per character it is (1/L) sum_k F_k / k. `nelbo_exact` computes this by enumerating all 2^L - 1
mask sets. As an expectation over k ~ U{1..L} it is E_k[(L / k) F_k]: the "exact-k masking with L/k weights"
estimator that LLaDA uses for likelihoods (Nie et al. 2025) and RADD derives (Ou et al. 2024; F_k / k is the mean
loss of one masked position when k are masked, so the sum is the any-order autoregressive loss of Hoogeboom et
al. 2022, ARDM).

Estimators (`nelbo_estimate`, D draws per sequence, one forward pass each):
- `exact_k`: k stratified over the draws (draw d takes v_d uniform in [d/D, (d+1)/D), k_d = 1 + floor(L v_d)),
  a uniform k_d-subset masked, weight L / k_d.
- `stratified_t`: t_d uniform in (d/D, (d+1)/D], each position masked with probability t_d, weight 1 / t_d.
- `antithetic_t`: pairs (t, 1 - t), t ~ U(0, 1], Bernoulli(t) masks, weight 1 / t.
All three are unbiased for NELBO(x). exact_k is the Rao-Blackwellised t-estimator: under t ~ U(0, 1), k is
uniform on {0..L} and E[1/t | k] = (L + 1) / k (the posterior of t is Beta(k + 1, L - k + 1)), so conditioning t
out given k gives the L/k weighting, with a variance never larger (law of total variance). The t-estimators
even have infinite variance: for small t, P(k >= 1) ~ L t and then f / t >= c / t, so E[(f/t)^2] >= int L c^2 / t dt,
which diverges at 0 (the reason MDLM trains on t in [eps, 1]). Measured variance of the per-window bits per
character at equal forward passes (a 2 x 64 MDLM-trained model at 3.38 bpc on tiny-Shakespeare val, 32 windows of
64, 60 repetitions), D = 4 / 8 / 16: exact_k 0.090 / 0.037 / 0.017; stratified_t 0.25 / 0.41 / 0.078;
antithetic_t 0.55 / 0.18 / 0.073; i.i.d. t (plain MDLM) 0.45 / 0.22 / 0.10. The t-estimators' numbers jump
around (heavy tails); exact_k is 2.7x to 11x lower, so it is the default.

Standard errors. antithetic_t: the D/2 pair means are i.i.d., so the usual s / sqrt(D/2). Stratified estimators
(one draw per stratum): collapsed strata (Cochran 1977, Sampling Techniques): adjacent strata are
grouped in pairs (a triple at the end when D is odd) and sum_group n/(n-1) sum (y - mean_group)^2 / D^2 estimates
the variance of the mean; it is conservative in expectation. With one draw (or one pair) it is undefined (NaN).

[MASK] is never a target, so likelihoods here drop its logit before the softmax (MDLM's "zero-masking"): each
prediction is a distribution over the real characters only, which is what a character-level likelihood (and
nanoGPT's vocabulary without [MASK]) means, and which can only lower the number. (The training losses live with
their objectives in `unmask.objectives`.)

Functions here never touch the global RNG or the model's train/eval mode: randomness comes from the explicit
generator (on the device of x), and callers put the model in eval mode for likelihoods.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.curriculum.masking import random_k_subsets
from unmask.likelihood.estimators import all_subsets, bernoulli_masks, count_from_uniform, stratified_uniforms

Estimator = Literal["exact_k", "stratified_t", "antithetic_t"]
ESTIMATORS: tuple[Estimator, ...] = typing.get_args(Estimator)
DEFAULT_ESTIMATOR: Estimator = "exact_k"
ESTIMATOR_DESCRIPTIONS = {
    "exact_k": "exact-k masking, k stratified over the draws, L/k weights (Ou et al. 2024; Nie et al. 2025)",
    "stratified_t": "t stratified over the draws, Bernoulli(t) masks, 1/t weights (MDLM/MD4 continuous time)",
    "antithetic_t": "antithetic pairs (t, 1-t), Bernoulli(t) masks, 1/t weights (MDLM/MD4 continuous time)",
    "exact": "exact autoregressive NLL (teacher forcing)",
}
MAX_EXACT_LENGTH = 12  # 2^12 - 1 = 4095 forward passes per sequence
LN2 = math.log(2.0)


def real_char_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """log-softmax (..., V) in float32 over the real characters: the [MASK] logit is set to -inf first."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _check(x: Tensor, generator: torch.Generator | None = None) -> None:
    if x.dim() != 2 or x.dtype != torch.long:
        raise ValueError(f"x must be a (B, L) long tensor, got {x.dtype} {tuple(x.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"the generator is on {generator.device} but x is on {x.device}; use one device")


def masked_nll(
    model: torch.nn.Module, x: Tensor, selected: Tensor, mask_id: int, batch_size: int | None = None
) -> Tensor:
    """f(M) per row (R,) float64: summed -log p(x_i | x with `selected` masked) over the selected positions.

    `batch_size` bounds the rows of one forward pass (None: all rows at once).
    """
    R, L = x.shape
    out = torch.zeros(R, dtype=torch.float64, device=x.device)
    step = R if batch_size is None else max(1, batch_size)
    for start in range(0, R, step):
        xs, sel = x[start : start + step], selected[start : start + step]  # (r, L)
        logits = model(xs.masked_fill(sel, mask_id), positions=sel)  # (N, V): masked positions only
        logp = real_char_log_probs(logits, mask_id)  # (N, V)
        nll = -logp.gather(1, xs[sel][:, None]).squeeze(1)  # (N,)
        rows = torch.arange(start, start + xs.shape[0], device=x.device)[:, None].expand_as(sel)[sel]  # (N,)
        out.index_add_(0, rows, nll.double())
    return out


@torch.no_grad()
def nll_by_mask_count_exact(model: torch.nn.Module, x: Tensor, mask_id: int, batch_size: int = 4096) -> Tensor:
    """F_k (B, L) float64: column k-1 is the mean over all |M| = k mask sets of f(M), by enumeration (L <= 12)."""
    _check(x)
    B, L = x.shape
    if L > MAX_EXACT_LENGTH:
        raise ValueError(f"exact enumeration needs L <= {MAX_EXACT_LENGTH} (2^L - 1 mask sets), got L={L}")
    selected, size = all_subsets(L, x.device)  # (S, L), (S,): S = 2^L - 1
    S = selected.shape[0]
    f = masked_nll(
        model, x.repeat_interleave(S, 0), selected.repeat(B, 1), mask_id, batch_size
    )  # (B * S,): row b * S + s is sequence b under mask set s
    sums = torch.zeros(B, L, dtype=torch.float64, device=x.device)
    sums.index_add_(1, size - 1, f.view(B, S))  # (B, L)
    counts = torch.tensor([math.comb(L, k) for k in range(1, L + 1)], dtype=torch.float64, device=x.device)
    return sums / counts  # (B, L)


def nelbo_exact(model: torch.nn.Module, x: Tensor, mask_id: int) -> Tensor:
    """NELBO (B,) in nats per sequence, exactly: sum_{k=1}^L F_k / k over all mask sets (L <= 12)."""
    F_k = nll_by_mask_count_exact(model, x, mask_id)  # (B, L)
    k = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)  # (L,)
    return (F_k / k).sum(dim=1)


def _uniform_open(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform draws in (0, 1] (torch.rand is [0, 1)), so 1/t is finite."""
    return 1.0 - torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)


def exact_k_masks(B: int, L: int, draws: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(selected (B * draws, L) bool, k (B * draws,) long): k stratified over each row's draws, uniform k-subsets."""
    v = stratified_uniforms(B, draws, generator)  # (B, D)
    k = count_from_uniform(v, L).flatten()  # (B * D,) in 1..L
    return random_k_subsets(k, (B * draws, L), generator), k  # (B * D, L): exactly k positions even on ties


def t_masks(B: int, L: int, draws: int, generator: torch.Generator, antithetic: bool) -> tuple[Tensor, Tensor]:
    """(selected (B * draws, L) bool, t (B * draws,) float64): Bernoulli(p_mask = t) masks.

    Stratified: t_d in (d/D, (d+1)/D]. Antithetic: consecutive draws are the pair (t, 1 - t), t ~ U(0, 1].
    """
    dev = generator.device
    if antithetic:
        if draws % 2:
            raise ValueError(f"antithetic_t needs an even number of draws, got {draws}")
        u = _uniform_open((B, draws // 2), generator)  # (B, D/2)
        t = torch.stack((u, 1.0 - u), dim=-1).reshape(B, draws)  # (B, D): pairs side by side
    else:
        strata = torch.arange(draws, device=dev, dtype=torch.float64)
        t = (strata + _uniform_open((B, draws), generator)) / draws  # (B, D) in (d/D, (d+1)/D]
    t = t.flatten()  # (B * D,)
    p_mask = t  # linear schedule: alpha_t = 1 - t
    return bernoulli_masks(p_mask[:, None], (B * draws, L), generator, torch.float64), t


def _row_stats(est: Tensor, estimator: str) -> tuple[Tensor, Tensor]:
    """Per-row mean and standard error (B,) of D draws (B, D); see the module docstring."""
    B, D = est.shape
    mean = est.mean(dim=1)
    nan = torch.full_like(mean, float("nan"))
    if estimator == "antithetic_t":
        pairs = est.view(B, D // 2, 2).mean(dim=2)  # (B, D/2): i.i.d. units
        if D // 2 < 2:
            return mean, nan
        return mean, pairs.std(dim=1) / math.sqrt(D // 2)
    if D < 2:
        return mean, nan
    group = (torch.arange(D, device=est.device) // 2).clamp(max=D // 2 - 1)  # (D,): pairs, a triple at the end
    n = torch.bincount(group).to(est.dtype)  # (G,)
    means = torch.zeros(B, len(n), dtype=est.dtype, device=est.device).index_add_(1, group, est) / n  # (B, G)
    dev2 = (est - means[:, group]) ** 2  # (B, D)
    ss = torch.zeros_like(means).index_add_(1, group, dev2)  # (B, G)
    return mean, ((ss * n / (n - 1)).sum(dim=1) / D**2).sqrt()


@torch.no_grad()
def nelbo_estimate(
    model: torch.nn.Module,
    x: Tensor,
    mask_id: int,
    draws: int,
    generator: torch.Generator,
    estimator: str = DEFAULT_ESTIMATOR,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo NELBO of each row of x (B, L): (mean (B,), standard error (B,)), float64 nats per sequence.

    `draws` forward passes per row (`batch_size` bounds the rows of one pass). Unbiased for `nelbo_exact`.
    """
    _check(x, generator)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    B, L = x.shape
    if estimator == "exact_k":
        selected, k = exact_k_masks(B, L, draws, generator)  # (B * D, L), (B * D,)
        weight = L / k.double()
    else:
        selected, t = t_masks(B, L, draws, generator, antithetic=estimator == "antithetic_t")
        weight = torch.where(selected.any(dim=1), 1.0 / t, 0.0)  # t = 0 only with nothing masked
    f = masked_nll(model, x.repeat_interleave(draws, 0), selected, mask_id, batch_size)  # (B * D,)
    return _row_stats((weight * f).view(B, draws), estimator)


def score_windows(model: torch.nn.Module, x: Tensor, mask_id: int, draws: int, generator: torch.Generator) -> Tensor:
    """Negative ELBO (B,) in nats per character of each row of x (B, L), default estimator (diffusion models)."""
    nats, _ = nelbo_estimate(model, x, mask_id, draws, generator)
    return nats / x.shape[1]


@torch.no_grad()
def ar_nll(model: torch.nn.Module, x: Tensor, mask_id: int | None = None) -> Tensor:
    """Exact NLL (B,) in nats per predicted character of a causal model: inputs x[:, :-1], targets x[:, 1:].

    x is (B, L + 1). `mask_id` (default: the model's last id, [MASK] by the vocabulary convention) is excluded
    from the softmax like everywhere in this module.
    """
    _check(x)
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "causal", True):
        raise ValueError("ar_nll needs a causal model (model_config.causal=True): a bidirectional one sees the targets")
    if mask_id is None:
        mask_id = int(config.vocab_size) - 1 if config is not None else -1
    logp = real_char_log_probs(model(x[:, :-1]), mask_id)  # (B, L, V)
    nll = -logp.gather(2, x[:, 1:, None]).squeeze(2)  # (B, L)
    return nll.double().mean(dim=1)
