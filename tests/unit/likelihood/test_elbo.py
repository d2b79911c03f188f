"""Tests for unmask.likelihood.elbo: exact enumeration vs the continuous-time bound, estimators vs exact, AR NLL,
pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmask.likelihood.elbo import (
    ESTIMATORS,
    ar_nll,
    exact_k_masks,
    nelbo_estimate,
    nelbo_exact,
    nll_by_mask_count_exact,
    real_char_log_probs,
    score_windows,
    t_masks,
)
from unmask.likelihood.score import Scorer, split_likelihood, split_window_offsets
from unmask.model import ModelConfig, Transformer
from unmask.objectives.mdlm import mdlm_loss as mdlm_training_loss
from unmask.objectives.mdlm import sample_exact_k_batch, sample_mdlm_batch

VOCAB = 7  # 6 characters + [MASK]
MASK_ID = VOCAB - 1


def tiny_model(seed: int, causal: bool = False, sharpness: float = 4.0) -> Transformer:
    """A random model made confident (weights scaled up), so per-position losses differ a lot between contexts."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=8, causal=causal))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(sharpness)
    return model.eval()


def tokens(B: int, L: int, seed: int) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (B, L), generator=torch.Generator().manual_seed(seed))


def hand_masked_nll(model: nn.Module, x: torch.Tensor, mask: list[bool]) -> float:
    """f(M) for one row, from the full logits and an explicit loop (independent of the batched code)."""
    z = x.clone()
    z[torch.tensor(mask)] = MASK_ID
    logits = model(z[None])[0]  # (L, V)
    total = 0.0
    for i, masked in enumerate(mask):
        if masked:
            row = logits[i].clone()
            row[MASK_ID] = -math.inf
            total -= float(torch.log_softmax(row, dim=0)[x[i]])
    return total


@torch.no_grad()
def test_exact_enumeration_equals_the_continuous_time_integral() -> None:
    # NELBO = int_0^1 (1/t) sum_M t^|M| (1-t)^(L-|M|) f(M) dt, integrated by Gauss-Legendre quadrature: the
    # integrand is a polynomial of degree L - 1, so 8 nodes are exact. This checks the sum_k F_k / k derivation.
    model, L = tiny_model(0), 5
    x = tokens(2, L, seed=1)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts, ws = (nodes + 1) / 2, weights / 2  # on [0, 1]
    for b in range(2):
        integral = 0.0
        for bits in range(1, 2**L):
            mask = [bool(bits >> i & 1) for i in range(L)]
            k = sum(mask)
            f = hand_masked_nll(model, x[b], mask)
            integral += f * float(np.sum(ws * ts ** (k - 1) * (1 - ts) ** (L - k)))
        assert float(nelbo_exact(model, x[b : b + 1], MASK_ID)[0]) == pytest.approx(integral, rel=1e-5)


def test_exact_refuses_long_sequences() -> None:
    with pytest.raises(ValueError, match="L <= 12"):
        nelbo_exact(tiny_model(0), torch.zeros(1, 13, dtype=torch.long), MASK_ID)


@pytest.mark.parametrize(("seed", "L"), [(0, 4), (1, 6), (2, 8)])
def test_exact_k_estimate_agrees_with_exact_within_its_error(seed: int, L: int) -> None:
    model = tiny_model(seed)
    x = tokens(4, L, seed=10 + seed)
    exact = nelbo_exact(model, x, MASK_ID)  # (B,)
    zs = []
    for draw_seed in range(3):
        g = torch.Generator().manual_seed(draw_seed)
        mean, se = nelbo_estimate(model, x, MASK_ID, 64, g, "exact_k")
        assert torch.all(se > 0) and torch.all(se < 0.06 * exact), "the error must be small enough to mean something"
        zs.append((mean - exact) / se)
    z = torch.cat(zs)
    # The error is calibrated (mean se^2 matches the variance over 400 repetitions), but with few draws per k the
    # t-statistic has heavier tails than a normal one (measured: |z| > 4 in about 0.5 % of rows), hence 5.
    assert torch.all(z.abs() < 5) and float((z**2).mean()) < 4, f"z = {z}"


@pytest.mark.parametrize("estimator", ["stratified_t", "antithetic_t"])
def test_t_estimators_are_unbiased(estimator: str) -> None:
    # Their variance is infinite (1/t at t -> 0), so their per-call errors are unreliable; test the mean of many
    # independent calls against the exact bound with the spread of those calls.
    model, L = tiny_model(3), 6
    x = tokens(2, L, seed=4)
    exact = nelbo_exact(model, x, MASK_ID)
    g = torch.Generator().manual_seed(0)
    calls = torch.stack([nelbo_estimate(model, x, MASK_ID, 16, g, estimator)[0] for _ in range(150)])  # (N, B)
    spread = calls.std(dim=0) / math.sqrt(len(calls))
    assert torch.all((calls.mean(dim=0) - exact).abs() < 5 * spread + 0.01 * exact)


def test_exact_k_has_lower_variance_than_t_estimators_at_equal_draws() -> None:
    model, L = tiny_model(5), 8
    x = tokens(8, L, seed=6)
    g = torch.Generator().manual_seed(1)
    var = {
        est: torch.stack([nelbo_estimate(model, x, MASK_ID, 4, g, est)[0] for _ in range(60)]).var(dim=0).mean()
        for est in ESTIMATORS
    }
    assert var["exact_k"] < var["stratified_t"] and var["exact_k"] < var["antithetic_t"], var


def test_masks_are_stratified_and_paired() -> None:
    g = torch.Generator().manual_seed(0)
    B, L, D = 5, 8, 8
    selected, k = exact_k_masks(B, L, D, g)
    assert torch.equal(selected.sum(dim=1), k)  # exactly k masked per draw
    assert torch.equal(k.view(B, D), torch.arange(1, L + 1).expand(B, D))  # D = L strata: k = 1..L once each
    _, k4 = exact_k_masks(200, L, 4, g)
    assert torch.equal(((k4.view(200, 4) - 1) // 2).unique(dim=0), torch.arange(4)[None])  # k in {2d+1, 2d+2}

    _, t = t_masks(B, L, D, g, antithetic=True)
    pairs = t.view(B, D // 2, 2)
    assert torch.allclose(pairs.sum(dim=2), torch.ones(B, D // 2, dtype=torch.float64))
    selected, t = t_masks(B, L, D, g, antithetic=False)
    strata = torch.arange(D, dtype=torch.float64)
    assert torch.all(t.view(B, D) > strata / D) and torch.all(t.view(B, D) <= (strata + 1) / D)
    with pytest.raises(ValueError, match="even"):
        t_masks(B, L, 3, g, antithetic=True)


def test_mdlm_batch_puts_one_t_in_each_stratum() -> None:
    eps, B = 1e-3, 16
    x = tokens(B, 8, seed=0)
    x_masked, selected, t = sample_mdlm_batch(x, MASK_ID, torch.Generator().manual_seed(3), eps)
    u = (t.double() - eps) / (1 - eps) * B  # (B,): stratum index + the shared offset
    assert sorted(u.floor().long().tolist()) == list(range(B))
    assert torch.allclose(u - u.floor(), (u - u.floor())[:1].expand(B), atol=1e-4)  # one shift for the batch
    assert torch.all((t >= eps) & (t < 1))
    assert torch.equal(x_masked[selected], torch.full_like(x_masked[selected], MASK_ID))
    assert torch.equal(x_masked[~selected], x[~selected])


class NoMaskLogit(nn.Module):
    """A model whose [MASK] logit is -inf, so full-softmax CE equals the [MASK]-free likelihood."""

    def __init__(self, inner: Transformer) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.inner(idx, positions).clone()
        logits[..., MASK_ID] = -math.inf
        return logits


def test_mdlm_training_loss_expectation_is_the_bound_per_character() -> None:
    eps, L = 1e-3, 6
    model = NoMaskLogit(tiny_model(7))
    x = tokens(4, L, seed=8).repeat(4, 1)  # (16, L)
    with torch.no_grad():
        F_k = nll_by_mask_count_exact(model, x[:4], MASK_ID)  # (4, L)
        exact = nelbo_exact(model, x[:4], MASK_ID)  # (4,)
    # E over t ~ U(eps, 1) of (1/t) sum_k C(L, k) t^k (1-t)^(L-k) F_k: a polynomial in t, exact by quadrature.
    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts, ws = eps + (1 - eps) * (nodes + 1) / 2, weights / 2
    per_k = torch.tensor(
        [float(np.sum(ws * math.comb(L, k) * ts ** (k - 1) * (1 - ts) ** (L - k))) for k in range(1, L + 1)],
        dtype=torch.float64,
    )
    target = float((F_k * per_k).sum(dim=1).mean()) / L
    assert target == pytest.approx(float(exact.mean()) / L, rel=0.01)  # eps only shifts it by O(eps)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = torch.tensor([float(mdlm_training_loss(model, x, MASK_ID, g, eps)) for _ in range(400)])
    se = float(losses.std()) / math.sqrt(len(losses))
    assert se < 0.02 * target
    assert abs(float(losses.mean()) - target) < 4 * se


def test_mdlm_training_loss_backpropagates() -> None:
    model = tiny_model(0).train()
    loss = mdlm_training_loss(model, tokens(4, 8, seed=1), MASK_ID, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert loss.dim() == 0 and grads and all(torch.isfinite(gr).all() for gr in grads)


@torch.no_grad()
def test_ar_nll_matches_a_hand_loop_over_prefixes() -> None:
    model = tiny_model(9, causal=True)
    x = tokens(3, 9, seed=2)  # (B, L + 1), L = 8
    got = ar_nll(model, x)
    for b in range(3):
        total = 0.0
        for j in range(8):
            logits = model(x[b : b + 1, : j + 1])[0, -1]  # only the prefix is given: causality is tested too
            logits[MASK_ID] = -math.inf
            total -= float(F.log_softmax(logits, dim=0)[x[b, j + 1]])
        assert float(got[b]) == pytest.approx(total / 8, rel=1e-5)


def test_ar_nll_refuses_a_bidirectional_model() -> None:
    with pytest.raises(ValueError, match="causal"):
        ar_nll(tiny_model(0), tokens(1, 9, seed=0))


def test_mask_logit_is_excluded() -> None:
    logp = real_char_log_probs(torch.randn(5, VOCAB), MASK_ID)
    assert torch.all(logp[:, MASK_ID] == -math.inf)
    assert torch.allclose(logp.exp().sum(dim=1), torch.ones(5))


def test_estimates_are_deterministic_for_a_seed() -> None:
    model, x = tiny_model(0), tokens(3, 8, seed=0)
    for estimator in ESTIMATORS:
        a = nelbo_estimate(model, x, MASK_ID, 4, torch.Generator().manual_seed(5), estimator)
        b = nelbo_estimate(model, x, MASK_ID, 4, torch.Generator().manual_seed(5), estimator)
        c = nelbo_estimate(model, x, MASK_ID, 4, torch.Generator().manual_seed(6), estimator)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # Bounding the rows of one forward pass does not change the numbers.
    whole = nelbo_estimate(model, x, MASK_ID, 4, torch.Generator().manual_seed(5))[0]
    chunked = nelbo_estimate(model, x, MASK_ID, 4, torch.Generator().manual_seed(5), batch_size=5)[0]
    assert torch.allclose(whole, chunked, rtol=1e-6)
    per_char = score_windows(model, x, MASK_ID, 4, torch.Generator().manual_seed(5))
    assert torch.allclose(per_char, whole / 8)


def test_bad_arguments_are_refused() -> None:
    model, x, g = tiny_model(0), tokens(2, 8, seed=0), torch.Generator()
    with pytest.raises(ValueError, match="estimator"):
        nelbo_estimate(model, x, MASK_ID, 4, g, "plain")
    with pytest.raises(ValueError, match="draws"):
        nelbo_estimate(model, x, MASK_ID, 0, g)
    with pytest.raises(ValueError, match="long"):
        nelbo_estimate(model, x.float(), MASK_ID, 2, g)  # type: ignore[arg-type]


def test_window_offsets() -> None:
    assert split_window_offsets(100, 8, causal=False).tolist() == list(range(0, 89, 8))  # 12 windows
    assert split_window_offsets(100, 8, causal=True).tolist() == list(range(0, 89, 8))  # 88 + 9 <= 100
    assert len(split_window_offsets(96, 8, causal=False)) == 12
    assert len(split_window_offsets(96, 8, causal=True)) == 11  # the last window has no next character
    assert len(split_window_offsets(7, 8, causal=False)) == 0


@torch.no_grad()
def test_split_likelihood_over_every_window() -> None:
    L, split = 8, np.random.default_rng(0).integers(0, MASK_ID, 70).astype(np.uint8)
    ar = tiny_model(1, causal=True)
    ar_scorer = Scorer("autoregressive", MASK_ID, L)
    out = split_likelihood(ar_scorer, ar, split, torch.Generator(), 3, "cpu")
    windows = torch.from_numpy(split[:65].astype(np.int64)).unfold(0, L + 1, L)  # (8, 9): offsets 0, 8, ..., 56
    assert out["windows"] == out["windows_total"] == 8 and out["chars"] == 64 and out["estimator"] == "exact"
    assert out["nats_per_char"] == pytest.approx(float(ar_nll(ar, windows).mean()), rel=1e-6)
    assert out["bpc"] == pytest.approx(out["nats_per_char"] / math.log(2))

    diffusion = tiny_model(2)
    args = (Scorer("diffusion", MASK_ID, L, draws=4), diffusion, split)
    out = split_likelihood(*args, torch.Generator().manual_seed(0), 8, "cpu")
    again = split_likelihood(*args, torch.Generator().manual_seed(0), 8, "cpu")
    assert out == again and out["windows"] == 8 and out["estimator"] == "exact_k"
    assert out["bpc_mc_stderr"] > 0 and out["bpc_stderr"] > 0
    exact = nelbo_exact(diffusion, torch.from_numpy(split[:64].astype(np.int64)).view(8, L), MASK_ID)
    assert abs(out["bpc"] - float(exact.mean()) / L / math.log(2)) < 4 * out["bpc_mc_stderr"]
    few = split_likelihood(*args, torch.Generator(), 8, "cpu", max_windows=3)
    assert few["windows"] == 3 and few["windows_total"] == 8


def test_exact_k_training_loss_is_unbiased_for_the_bound_and_varies_less() -> None:
    """exact_k (k ~ U{1..L}, uniform k-subsets, weight L/k) has the NELBO / L as its expectation, with no eps
    shift, and its spread is at most antithetic_t's; zero-masking makes a model with a [MASK] logit score like one
    without it."""
    L = 6
    inner = tiny_model(7)
    x = tokens(4, L, seed=8).repeat(4, 1)  # (16, L)
    with torch.no_grad():
        exact = float(nelbo_exact(inner, x[:4], MASK_ID).mean()) / L  # drops the [MASK] logit
    draws = {}
    for estimator in ("exact_k", "antithetic_t"):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            draws[estimator] = torch.tensor(
                [
                    float(mdlm_training_loss(inner, x, MASK_ID, g, estimator=estimator, zero_masking=True))
                    for _ in range(400)
                ]
            )
    k_losses = draws["exact_k"]
    se = float(k_losses.std()) / math.sqrt(len(k_losses))
    assert abs(float(k_losses.mean()) - exact) < 4 * se
    assert float(k_losses.std()) <= float(draws["antithetic_t"].std())
    g = torch.Generator().manual_seed(3)
    masked, selected, k = sample_exact_k_batch(x, MASK_ID, g)
    assert torch.equal(selected.sum(dim=1), k) and int(k.min()) >= 1 and int(k.max()) <= L
    assert torch.equal(masked[selected], torch.full_like(masked[selected], MASK_ID))


def test_zero_masking_drops_only_the_mask_logit() -> None:
    model = tiny_model(5)
    x = tokens(4, 8, seed=2)
    g1, g2, g3 = (torch.Generator().manual_seed(1) for _ in range(3))
    with torch.no_grad():
        zero = mdlm_training_loss(model, x, MASK_ID, g1, zero_masking=True)
        full = mdlm_training_loss(model, x, MASK_ID, g2)
        no_mask = mdlm_training_loss(NoMaskLogit(model), x, MASK_ID, g3)
    assert float(zero) == pytest.approx(float(no_mask), rel=1e-6)
    assert float(zero) < float(full)  # the [MASK] logit takes probability from every target
