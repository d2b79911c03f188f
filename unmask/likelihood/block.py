"""Block diffusion: masked diffusion inside blocks of K characters, autoregressive across blocks.

Arriola et al. 2025, "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models" (BD3-LM,
ICLR 2025). A sequence x of length L is cut into blocks x^1, ..., x^B of K characters (the last one may be
shorter), and

    log p(x) = sum_b log p(x^b | x^{<b}),

each factor a masked-diffusion model of one block conditioned on the clean blocks before it. K = 1 is an
autoregressive model (a block is one masked character predicted from the clean prefix), K = L is MDLM.

Negative ELBO. With the linear schedule (alpha_t = 1 - t, p_mask = t) each factor gets the MDLM bound of
`unmask.likelihood.elbo`, so

    -log p(x) <= sum_b int_0^1 (1 / t) E[ sum_{i in block b masked} -log p(x_i | z_t^b, x^{<b}) ] dt,

and, integrating t out block by block (see `unmask.likelihood.elbo`), sum_b E_{k ~ U{1..K_b}} [(K_b / k) F_{b,k}] with
F_{b,k} the mean over the k-subsets of block b of the summed masked NLL: the exact-k form used by `block_nelbo`.

Vectorised layout. Instead of one forward pass per block, the network sees [x_t ; x_0] (length 2L, both copies at
RoPE positions 0..L-1) under the mask of `block_diffusion_attn_mask`: a noisy position of block b attends to the
noisy positions of its own block and to the clean positions of blocks < b; a clean position attends block-causally
to the clean copy. Noisy blocks never see each other, so all B block terms come out of one pass whose cost is about
that of an autoregressive step on 2L tokens (the BD3-LM training algorithm); the last clean block is attended
by no noisy position, so the pass leaves it out (`training_attn_mask`): 2L - K tokens. At sampling time the clean
copy is the KV cache: a `Transformer` with `diffusion_block = K` run on a clean sequence is the clean half.

Likelihoods drop the [MASK] logit before the softmax (MDLM's zero-masking, the SUBS parameterisation): [MASK] is
never a target. Randomness comes only from explicit generators, created on the device of the data.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.curriculum.masking import random_k_subsets
from unmask.errors import UserError
from unmask.likelihood.elbo import ESTIMATORS, _row_stats, exact_k_masks, real_char_log_probs, t_masks
from unmask.likelihood.estimators import all_subsets, bernoulli_masks, count_from_uniform, systematic_uniforms
from unmask.likelihood.self_condition import first_pass_input

MAX_EXACT_BLOCK = 12  # 2^12 - 1 mask sets per block for the enumeration


def _device(device: torch.device | str) -> torch.device:
    return torch.device(device)


@functools.lru_cache(maxsize=32)
def _attn_mask(L: int, K: int, device: torch.device) -> Tensor:
    block = torch.arange(L, device=device) // K  # (L,) block index of each position
    q, k = block[:, None], block[None, :]  # (L, 1), (1, L)
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool, device=device)
    mask[:L, :L] = q == k  # noisy -> noisy: its own block only (block-diagonal)
    mask[:L, L:] = k < q  # noisy -> clean: the blocks before
    mask[L:, L:] = k <= q  # clean -> clean: block-causal
    return mask  # clean -> noisy stays False


def block_diffusion_attn_mask(L: int, K: int, device: torch.device | str = "cpu") -> Tensor:
    """(2L, 2L) bool, True = may attend, for the training layout [noisy x_t ; clean x_0] of length-L windows.

    Rows/columns 0..L-1 are the noisy copy, L..2L-1 the clean one; position i is in block i // K. The result is
    cached per (L, K, device) and shared, so treat it as read-only (the FlexAttention path keys on its identity).
    """
    if L <= 0 or K <= 0:
        raise ValueError(f"L={L} and K={K} must be positive")
    return _attn_mask(L, K, _device(device))


def clean_context_length(L: int, K: int) -> int:
    """Clean positions the training layout needs: all but the last block, which no noisy position attends to."""
    return K * ((L - 1) // K)


@functools.lru_cache(maxsize=32)
def training_attn_mask(L: int, K: int, device: torch.device) -> Tensor:
    """`block_diffusion_attn_mask` without the rows/columns of the last clean block: (L + C, L + C), C =
    `clean_context_length(L, K)`. That block is attended only by itself, so dropping it changes no noisy logit
    and saves K of the 2L positions (12% of the tokens at L = 64, K = 16). Cached; read-only."""
    n = L + clean_context_length(L, K)
    return block_diffusion_attn_mask(L, K, device)[:n, :n].contiguous()


def _block_ids(L: int, K: int, device: torch.device) -> Tensor:
    return torch.arange(L, device=device) // K  # (L,)


def _check(clean: Tensor, block_length: int, generator: torch.Generator | None) -> None:
    if clean.dim() != 2 or clean.dtype != torch.long:
        raise ValueError(f"clean must be a (B, L) long tensor, got {clean.dtype} {tuple(clean.shape)}")
    if block_length <= 0:
        raise ValueError(f"block_length={block_length} must be positive")
    if generator is not None and generator.device.type != clean.device.type:
        raise ValueError(f"the generator is on {generator.device} but clean is on {clean.device}; use one device")


def check_mask_rate_window(window: tuple[float, float], flag: str = "mask_rate_window") -> None:
    """Raise a UserError unless 0 <= lo <= hi <= 1 and hi > 0 (t = 0 would mask nothing)."""
    lo, hi = window
    if not (0.0 <= lo <= hi <= 1.0) or hi <= 0.0 or not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"{flag}: need 0 <= LO <= HI <= 1 and HI > 0, got LO={lo}, HI={hi}")


def sample_block_masks(
    B: int,
    L: int,
    block_length: int,
    generator: torch.Generator,
    mask_rate_window: tuple[float, float] = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """(selected (B, L) bool, t (B, L) float32): one mask rate t per block, each position masked with p_mask = t.

    t per (row, block): the B * n_blocks rates are stratified over (0, 1] (one uniform u shifted into each of
    B * n_blocks equal strata, the low-discrepancy "antithetic" sampling of MDLM, applied over blocks and rows as
    BD3-LM does), then mapped to (lo, hi] of `mask_rate_window`. One t per block rather than per sequence: the
    blocks are independent diffusion problems, per-block rates make every window carry several noise levels
    (lower gradient variance at the same cost), and it is what the reference does. `t` is returned broadcast to
    positions; a block with nothing masked simply contributes nothing (f of the empty set is 0), which keeps the
    estimator unbiased.
    """
    check_mask_rate_window(mask_rate_window)
    lo, hi = mask_rate_window
    dev = generator.device
    n_blocks = -(-L // block_length)
    n = B * n_blocks
    strata = systematic_uniforms(n, generator)  # (n,) in [0, 1), one per stratum
    t_block = lo + (hi - lo) * (1.0 - strata)  # (n,) in (lo, hi]
    t = t_block.view(B, n_blocks)[:, _block_ids(L, block_length, dev)]  # (B, L)
    p_mask = t  # linear schedule: alpha_t = 1 - t
    return bernoulli_masks(p_mask, (B, L), generator, torch.float32), t


def sample_block_exact_k(B: int, L: int, block_length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(selected (B, L) bool, weight (B, L) float32) for the exact-k block training loss (L a multiple of K).

    In every (row, block) k ~ U{1..K}, stratified over the B * n_blocks blocks of the batch (one uniform u shifted
    into each of B * n_blocks equal strata, as `sample_block_masks` does for t), a uniform k-subset of the block
    masked, weight K / k at its positions. This is the block NELBO with t integrated out (`unmask.likelihood.elbo`
    derives the exact-k form): unbiased like the t-estimator and never of a larger variance, which matters most for
    small K: with K = 1 the 1/t weights of Bernoulli(t) masks have an infinite variance, while exact-k is exactly the
    autoregressive cross-entropy (k = 1, weight 1).
    """
    if L % block_length:
        raise ValueError(f"exact_k needs whole blocks: L={L} is not a multiple of block_length={block_length}")
    K = block_length
    n = B * (L // K)
    k = count_from_uniform(systematic_uniforms(n, generator), K)  # (n,) in 1..K, one per stratum
    selected = random_k_subsets(k, (n, K), generator).view(B, L)  # (B, L)
    weight = (K / k.to(torch.float32))[:, None].expand(n, K).reshape(B, L)  # (B, L)
    return selected, weight


def block_masked_log_probs(
    model: torch.nn.Module,
    clean: Tensor,
    selected: Tensor,
    mask_id: int,
    block_length: int,
    zero_masking: bool = True,
    self_condition: bool = False,
) -> Tensor:
    """log p(x_i | noisy block of i, clean blocks before) at the selected positions, (N,) float32, row-major.

    One forward pass over [x_t ; x_0] (B, L + C) with the block-diffusion mask, C = `clean_context_length`
    (the last clean block is left out: nothing noisy attends to it), logits only at the masked noisy positions,
    [MASK] dropped from the softmax (`zero_masking=False`: the full softmax, a training option only).
    `self_condition`: a first no-grad pass of the same layout gives the self-condition input
    (`unmask.likelihood.self_condition`): its prediction at the masked noisy positions, zeros on the clean half, whose
    keys and values thus stay those of clean text, as in sampling's KV cache.
    """
    B, L = clean.shape
    C = clean_context_length(L, block_length)
    noisy = clean.masked_fill(selected, mask_id)  # (B, L): x_t
    idx = torch.cat((noisy, clean[:, :C]), dim=1)  # (B, L + C)
    positions = torch.cat((selected, selected.new_zeros(B, C)), dim=1)  # (B, L + C): masked noisy positions
    pos = torch.cat((torch.arange(L, device=clean.device), torch.arange(C, device=clean.device)))  # (L + C,)
    mask = training_attn_mask(L, block_length, clean.device)  # (L + C, L + C)
    extra = {}
    if self_condition:
        extra["self_cond"] = first_pass_input(model, idx, positions, mask_id, attn_mask=mask, pos=pos)  # (B, L+C, V)
    logits = model(idx, positions=positions, attn_mask=mask, pos=pos, **extra)  # (N, V)
    logp = real_char_log_probs(logits, mask_id) if zero_masking else F.log_softmax(logits.float(), dim=-1)  # (N, V)
    return logp.gather(1, clean[selected][:, None]).squeeze(1)  # (N,)


def block_diffusion_weighted_loss(
    model: torch.nn.Module,
    clean: Tensor,
    selected: Tensor,
    weight: Tensor,
    mask_id: int,
    block_length: int,
    zero_masking: bool = True,
    self_condition: bool = False,
) -> Tensor:
    """sum over masked positions of weight * -log p, divided by B * L (nats per character); scalar. selected and
    weight (B, L) as `sample_block_training_masks` draws them; `zero_masking` and `self_condition` as in
    `block_masked_log_probs`."""
    B, L = clean.shape
    nll = -block_masked_log_probs(model, clean, selected, mask_id, block_length, zero_masking, self_condition)  # (N,)
    return (nll * weight[selected]).sum() / (B * L)


def block_unit_losses(
    model: torch.nn.Module,
    clean: Tensor,
    selected: Tensor,
    weight: Tensor,
    mask_id: int,
    block_length: int,
    zero_masking: bool = True,
) -> Tensor:
    """Each (row, block)'s term of `block_diffusion_weighted_loss`, (B * n_blocks,) float32: its summed weight *
    -log p over K (L a multiple of K; their mean is the loss). What BD3-LM's clipped-schedule search takes the
    variance of (`unmask.objectives.window_search`)."""
    B, L = clean.shape
    nll = -block_masked_log_probs(model, clean, selected, mask_id, block_length, zero_masking)  # (N,)
    n_blocks = -(-L // block_length)
    cell = torch.arange(B, device=clean.device)[:, None] * n_blocks + _block_ids(L, block_length, clean.device)
    out = torch.zeros(B * n_blocks, dtype=torch.float32, device=clean.device)
    return out.index_add_(0, cell[selected], (nll * weight[selected]).float()) / block_length


def block_diffusion_loss_from_masks(
    model: torch.nn.Module, clean: Tensor, selected: Tensor, t: Tensor, mask_id: int, block_length: int
) -> Tensor:
    """sum over masked positions of -log p / t, divided by B * L (nats per character); scalar."""
    # 1 / t = -alpha'_t / (1 - alpha_t) for the linear schedule
    return block_diffusion_weighted_loss(model, clean, selected, 1.0 / t, mask_id, block_length)


TRAINING_ESTIMATORS = ("antithetic_t", "exact_k")


def sample_block_training_masks(
    clean: Tensor,
    block_length: int,
    generator: torch.Generator,
    mask_rate_window: tuple[float, float] = (0.0, 1.0),
    estimator: str = "antithetic_t",
) -> tuple[Tensor, Tensor]:
    """(selected (B, L) bool, weight (B, L) float32): every random draw of the block-diffusion training loss on
    clean (B, L). `antithetic_t`: a mask rate t ~ U(lo, hi] per block (`sample_block_masks`), weight 1 / t;
    `exact_k`: k-subsets with K / k weights (`sample_block_exact_k`; the mask-rate window does not apply)."""
    _check(clean, block_length, generator)
    B, L = clean.shape
    if estimator == "exact_k":
        return sample_block_exact_k(B, L, block_length, generator)
    if estimator != "antithetic_t":
        raise ValueError(f"unknown training estimator {estimator!r}; expected one of {', '.join(TRAINING_ESTIMATORS)}")
    selected, t = sample_block_masks(B, L, block_length, generator, mask_rate_window)  # (B, L), (B, L)
    return selected, 1.0 / t  # -alpha'_t / (1 - alpha_t) = 1 / t for the linear schedule


def block_diffusion_loss(
    model: torch.nn.Module,
    clean: Tensor,
    mask_id: int,
    block_length: int,
    generator: torch.Generator,
    mask_rate_window: tuple[float, float] = (0.0, 1.0),
    estimator: str = "antithetic_t",
) -> Tensor:
    """Block-diffusion training loss (scalar): the block negative ELBO per character of clean (B, L).

    For each block a mask rate t ~ U(lo, hi] (`sample_block_masks`), each of its positions masked with
    probability t, cross-entropy of the masked positions weighted 1 / t, summed and divided by B * L. With the
    full window (0, 1] its expectation is the block NELBO per character; a narrower window is BD3-LM's clipped
    schedule, which trades a biased objective for a lower gradient variance (evaluation always integrates over
    the full (0, 1], see `block_nelbo`). `estimator="exact_k"`: k-subsets with K/k weights instead
    (`sample_block_exact_k`; the mask-rate window does not apply). One forward pass of length 2L - K. The masks
    are `sample_block_training_masks`, the loss `block_diffusion_weighted_loss`.
    """
    selected, weight = sample_block_training_masks(clean, block_length, generator, mask_rate_window, estimator)
    return block_diffusion_weighted_loss(model, clean, selected, weight, mask_id, block_length)


def block_masked_nll(
    model: torch.nn.Module, clean: Tensor, selected: Tensor, mask_id: int, block_length: int
) -> Tensor:
    """Per row and block, the summed -log p of the masked positions: (R, n_blocks) float64."""
    R, L = clean.shape
    n_blocks = -(-L // block_length)
    nll = -block_masked_log_probs(model, clean, selected, mask_id, block_length).double()  # (N,)
    cell = torch.arange(R, device=clean.device)[:, None] * n_blocks + _block_ids(L, block_length, clean.device)
    out = torch.zeros(R * n_blocks, dtype=torch.float64, device=clean.device)
    out.index_add_(0, cell.expand(R, L)[selected], nll)  # (R * n_blocks,)
    return out.view(R, n_blocks)


def _block_draws(
    B: int, L: int, K: int, draws: int, generator: torch.Generator, estimator: str
) -> tuple[Tensor, Tensor]:
    """(selected (B * draws, L) bool, weight (B * draws, n_blocks) float64) for the block estimators.

    Each block is one `unmask.likelihood.elbo` estimator problem of length K_b (the last block may be shorter): draw d
    of a row takes, in every block independently, the d-th stratum of k (exact_k) or t (stratified_t), or the d-th
    element of the antithetic pairs.
    """
    n_full, tail = divmod(L, K)
    pieces: list[tuple[Tensor, Tensor]] = []  # per group of equal-length blocks: (B * D, nb * Kb), (B * D, nb)
    for nb, Kb in ((n_full, K), (1 if tail else 0, tail)):
        if nb == 0:
            continue
        if estimator == "exact_k":
            sel, k = exact_k_masks(B * nb, Kb, draws, generator)  # (B * nb * D, Kb), (B * nb * D,)
            w = Kb / k.double()
        else:
            sel, t = t_masks(B * nb, Kb, draws, generator, antithetic=estimator == "antithetic_t")
            w = torch.where(sel.any(dim=1), 1.0 / t, 0.0)  # t = 0 only with nothing masked
        # rows come as (row, block, draw); reorder to (row, draw) x (block, position)
        sel = sel.view(B, nb, draws, Kb).permute(0, 2, 1, 3).reshape(B * draws, nb * Kb)
        w = w.view(B, nb, draws).permute(0, 2, 1).reshape(B * draws, nb)
        pieces.append((sel, w))
    selected = torch.cat([p[0] for p in pieces], dim=1)  # (B * D, L)
    weight = torch.cat([p[1] for p in pieces], dim=1)  # (B * D, n_blocks)
    return selected, weight


@torch.no_grad()
def block_nelbo(
    model: torch.nn.Module,
    clean: Tensor,
    mask_id: int,
    block_length: int,
    draws: int,
    generator: torch.Generator,
    estimator: str = "exact_k",
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo block NELBO of each row of clean (B, L): (nats (B,), standard error (B,)) float64 per sequence.

    An upper bound on the NLL. `exact_k` (default): in each block k ~ U{1..K_b} (stratified over the draws), a
    uniform k-subset masked, weight K_b / k; `stratified_t` / `antithetic_t` as in
    `unmask.likelihood.elbo.nelbo_estimate`, per block. Always over the full t in (0, 1], whatever the training window.
    One forward pass of length 2L per draw covers every block. Standard errors: the collapsed-strata estimator of
    `unmask.likelihood.elbo` on the per-draw totals (conservative: the strata of independent blocks add up).
    """
    _check(clean, block_length, generator)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    B, L = clean.shape
    selected, weight = _block_draws(B, L, block_length, draws, generator, estimator)  # (B * D, L), (B * D, nb)
    f = block_masked_nll(model, clean.repeat_interleave(draws, 0), selected, mask_id, block_length)  # (B * D, nb)
    per_draw = (weight * f).sum(dim=1)  # (B * D,)
    return _row_stats(per_draw.view(B, draws), estimator)


@torch.no_grad()
def block_nelbo_exact(model: torch.nn.Module, clean: Tensor, mask_id: int, block_length: int) -> Tensor:
    """Block NELBO (B,) in nats per sequence by enumeration: sum_b sum_{k=1}^{K_b} F_{b,k} / k (K_b <= 12).

    Every nonempty subset of every block is masked once (the other blocks left clean, which they cannot see
    anyway); for tests and tiny sequences.
    """
    _check(clean, block_length, None)
    B, L = clean.shape
    K = block_length
    total = torch.zeros(B, dtype=torch.float64, device=clean.device)
    for start in range(0, L, K):
        Kb = min(K, L - start)
        if Kb > MAX_EXACT_BLOCK:
            raise ValueError(f"exact enumeration needs blocks of <= {MAX_EXACT_BLOCK} positions, got {Kb}")
        subsets, sizes = all_subsets(Kb, clean.device)  # (S, Kb), (S,): S = 2^Kb - 1
        S = subsets.shape[0]
        selected = torch.zeros(S, L, dtype=torch.bool, device=clean.device)  # (S, L): only this block masked
        selected[:, start : start + Kb] = subsets
        size = sizes.double()
        f = block_masked_nll(model, clean.repeat_interleave(S, 0), selected.repeat(B, 1), mask_id, K)  # (B*S, nb)
        f_block = f[:, start // K].view(B, S)  # (B, S): only this block is masked
        counts = torch.tensor([math.comb(Kb, int(k)) for k in sizes], dtype=torch.float64, device=clean.device)
        total += (f_block / (size * counts)).sum(dim=1)  # sum_k (1/k) mean_{|M| = k} f(M)
    return total
