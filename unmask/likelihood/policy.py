"""Exact likelihood of a masked-diffusion model under a deterministic unmasking policy (and sampling from it).

The negative ELBO (`unmask.likelihood.elbo`) bounds -log p(x) for the model that unmasks positions in a uniformly random
order, but no sampler commits positions that way in practice: `unmask sample --remasking=low_confidence` picks
the most confident positions first. Turok, De Sa and Kuleshov 2026 ("DUEL") observe that once the order is a
*deterministic* function of what the model sees, the generative process is an ordinary autoregressive model over
a data-dependent order, so its likelihood is exact and costs one forward pass per step:

    start from the all-[MASK] canvas z_0; at step s the model predicts p(. | z_s) at every position, the policy
    chooses the set S_s of positions to commit from z_s and those predictions (never from the true characters),
    and z_{s+1} is z_s with x_i written at i in S_s. Then

        log p_policy(x) = sum_s sum_{i in S_s} log p(x_i | z_s)        (nats; exact, no bound)

Because S_s depends only on z_s, which holds only already-committed true characters, the sets S_0, S_1, ... are
the same whichever characters are drawn at them, and sum_x p_policy(x) = 1: a sum over the characters of the
last step is 1, then of the step before, and so on (tests check this by brute force). `policy_sample` runs the
same process drawing the committed characters instead of reading them, so the likelihood above is exactly the
likelihood of what it draws.

Policies (`POLICIES`), each scoring every still-masked position from the prediction there; the `per_step`
highest scores are committed, ties broken by the lowest position:
- `left_to_right`: every score equal, so positions go in order (an autoregressive model made of a diffusion one);
- `low_confidence`: the largest max-probability first (LLaDA's low-confidence remasking, Nie et al. 2025, but on
  the prediction rather than on a drawn candidate, which would make the order random);
- `margin`: the largest gap between the two most likely characters first (Kim et al. 2025);
- `entropy`: the lowest entropy of the prediction first.

`block_length` = K restricts the choice to the leftmost block of K positions that still has a [MASK]
(semi-autoregressive / block diffusion, Arriola et al. 2025), so a block-diffusion model plugs in through
`predict`. Each block takes ceil(K_b / per_step) steps (its last step commits the rest); without blocks a window
of L takes ceil(L / per_step).

`predict` maps a canvas (B, L) of ids (`mask_id` at unknown positions) to log-probabilities (B, L, V) over the V
real characters (ids 0..V-1; [MASK] is the id V and is not among them), the model's factorised prediction at
every position. `model_predict` makes one from a `Transformer`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.errors import UserError
from unmask.generation.diffusion import Generation
from unmask.generation.remasking import select_top

Policy = Literal["left_to_right", "low_confidence", "margin", "entropy"]
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
POLICY_DESCRIPTIONS: dict[str, str] = {
    "left_to_right": "positions in order, left to right",
    "low_confidence": "highest max-probability first",
    "margin": "largest top-1 minus top-2 probability first",
    "entropy": "lowest prediction entropy first",
}

Predict = Callable[[Tensor], Tensor]  # canvas (B, L) long -> log-probs (B, L, V) over the real characters


def model_predict(model: torch.nn.Module, mask_id: int) -> Predict:
    """`predict` of a bidirectional `Transformer` whose vocabulary is the real characters then [MASK] (= mask_id).

    The [MASK] logit is dropped before the softmax (as for the ELBO), so each prediction is a distribution over
    the real characters only; float32 at least (a float64 model stays float64, which the exactness tests use).
    """

    def predict(canvas: Tensor) -> Tensor:
        logits = model(canvas)  # (B, L, V + 1)
        if logits.shape[-1] != mask_id + 1:
            raise ValueError(f"the model has {logits.shape[-1]} outputs; expected mask_id + 1 = {mask_id + 1}")
        real = logits[..., :mask_id]  # (B, L, V): [MASK] is the last id
        return F.log_softmax(real.to(torch.promote_types(real.dtype, torch.float32)), dim=-1)  # (B, L, V)

    return predict


def policy_scores(policy: str, log_probs: Tensor) -> Tensor:
    """Priority (B, L) float64 of every position from its prediction `log_probs` (B, L, V): higher goes first."""
    logp = log_probs.double()  # (B, L, V)
    if policy == "left_to_right":
        return torch.zeros(logp.shape[:2], dtype=torch.float64, device=logp.device)  # ties: lowest position first
    probs = logp.exp()  # (B, L, V)
    if policy == "low_confidence":
        return probs.amax(dim=-1)  # (B, L)
    if policy == "margin":
        if probs.shape[-1] < 2:
            return probs[..., 0]
        top = probs.topk(2, dim=-1).values  # (B, L, 2)
        return top[..., 0] - top[..., 1]  # (B, L)
    if policy == "entropy":
        plogp = torch.where(probs > 0, probs * logp, torch.zeros_like(probs))  # 0 log 0 = 0
        return plogp.sum(dim=-1)  # (B, L): minus the entropy
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")


def commit_candidates(masked: Tensor, block_length: int | None) -> Tensor:
    """(B, L) bool: the masked positions the policy may choose from, i.e. those in each row's leftmost block of
    `block_length` that still has a [MASK] (all masked positions without blocks)."""
    if block_length is None:
        return masked
    L = masked.shape[1]
    position = torch.arange(L, device=masked.device)  # (L,)
    first = torch.where(masked, position, L).amin(dim=1)  # (B,): L for a full row
    return masked & (position // block_length == (first // block_length)[:, None])


def tie_resolution(dtype: torch.dtype) -> float:
    """Scores closer than this count as ties (see `policy_step`): well above the rounding noise of the dtype."""
    return 2.0**-36 if dtype == torch.float64 else 2.0**-14


def policy_step(
    log_probs: Tensor, masked: Tensor, policy: str, per_step: int, block_length: int | None = None
) -> Tensor:
    """The positions (B, L) bool committed at one step, from the predictions (B, L, V) and the [MASK]s (B, L).

    Scores are rounded to multiples of `tie_resolution` before ranking. Mathematically equal scores are common
    (on the all-[MASK] canvas every position sees the same values, so every prediction is the same) but come out
    of a network a few ulps apart, differently for different batch shapes; rounding makes them ties, which go
    to the lowest position as the policy says, instead of to whichever position the rounding noise favours.
    """
    candidates = commit_candidates(masked, block_length)  # (B, L)
    n = candidates.sum(dim=1).clamp(max=per_step)  # (B,): the last step of a block takes the rest
    resolution = tie_resolution(log_probs.dtype)
    scores = torch.round(policy_scores(policy, log_probs) / resolution)  # (B, L): integer-valued float64
    return select_top(scores, candidates, n)


def predict_canvases(predict: Predict, canvas: Tensor) -> Tensor:
    """`predict` (B, L, V) with one call on the distinct rows of `canvas` (B, L) only.

    Rows with the same canvas then get bitwise the same prediction, so the policy takes the same decision for
    them: the exact normalisation argument needs the decision to be a function of the canvas, and a batched
    network's output can differ by an ulp between rows holding the same input.
    """
    unique, inverse = torch.unique(canvas, dim=0, return_inverse=True)  # (U, L), (B,)
    if unique.shape[0] == canvas.shape[0]:
        return predict(canvas)
    return predict(unique)[inverse]  # (B, L, V)


def _check_args(policy: str, per_step: int, block_length: int | None) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    if block_length is not None and block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")


def policy_steps(L: int, per_step: int, block_length: int | None = None) -> int:
    """Forward passes that a window of L fully masked positions takes: sum over blocks of ceil(K_b / per_step)."""
    K = L if block_length is None else block_length
    full, rest = divmod(L, K)
    return full * math.ceil(K / per_step) + math.ceil(rest / per_step)


@torch.no_grad()
def policy_log_likelihood(
    predict: Predict,
    x: Tensor,
    mask_id: int,
    policy: str,
    per_step: int,
    block_length: int | None = None,
    given: Tensor | None = None,
) -> Tensor:
    """log p_policy(x) (B,) float64 nats of each row of x (B, L): see the module docstring.

    `given` (B, L) bool marks positions known from the start (a prompt): they are on the canvas, not scored.
    One `predict` call per step, batched over the rows: ceil(L / per_step) for a window without `given`.
    """
    _check_args(policy, per_step, block_length)
    if x.dim() != 2 or x.dtype != torch.long:
        raise ValueError(f"x must be a (B, L) long tensor, got {x.dtype} {tuple(x.shape)}")
    if bool((x < 0).any()) or bool((x >= mask_id).any()):
        raise ValueError(f"x must hold real character ids 0..{mask_id - 1} (mask_id={mask_id} is not a character)")
    B, L = x.shape
    known = torch.zeros_like(x, dtype=torch.bool) if given is None else given.to(x.device).bool()  # (B, L)
    canvas = torch.where(known, x, torch.full_like(x, mask_id))  # (B, L)
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    while True:
        masked = canvas == mask_id  # (B, L)
        if not bool(masked.any()):
            return total
        log_probs = predict_canvases(predict, canvas)  # (B, L, V)
        chosen = policy_step(log_probs, masked, policy, per_step, block_length)  # (B, L)
        logp_x = log_probs.gather(2, x[:, :, None]).squeeze(2).double()  # (B, L): log p(x_i | canvas)
        total += torch.where(chosen, logp_x, torch.zeros_like(logp_x)).sum(dim=1)
        canvas = torch.where(chosen, x, canvas)


@dataclass
class PolicySample:
    tokens: Tensor  # (B, L) the finished canvas
    logprobs: Tensor  # (B, L) float64: log p of each drawn character when it was committed (0 where fixed)
    step: Tensor  # (B, L) long: the step that committed each position (-1 where fixed)
    forward_passes: int

    @property
    def log_likelihood(self) -> Tensor:
        """log p_policy of each sample (B,) float64: equals `policy_log_likelihood` of `tokens`."""
        return self.logprobs.sum(dim=1)


def draw_categorical(log_probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One id per position (B, L) from `log_probs` (B, L, V) in float64, row b drawing from `generators[b]`.

    Inverse CDF with one uniform per position and row whatever is committed, so a row's draws depend only on its
    own generator and canvas (not on which rows share the batch).
    """
    B, L, V = log_probs.shape
    u = torch.stack([torch.rand(L, dtype=torch.float64, generator=g, device=g.device) for g in generators])  # (B, L)
    cdf = log_probs.double().exp().cumsum(dim=-1)  # (B, L, V)
    target = u.to(cdf.device)[:, :, None] * cdf[:, :, -1:]  # (B, L, 1): renormalised, so rounding cannot overrun
    return (cdf <= target).sum(dim=-1).clamp(max=V - 1)  # (B, L)


@torch.no_grad()
def policy_sample(
    predict: Predict,
    B: int,
    L: int,
    mask_id: int,
    policy: str,
    per_step: int,
    generators: Sequence[torch.Generator],
    block_length: int | None = None,
    fixed: Tensor | None = None,
    device: torch.device | str | None = None,
) -> PolicySample:
    """Draw B sequences of L characters from p_policy, one `torch.Generator` per sample.

    `fixed` (L,) or (B, L) long: a canvas whose non-[MASK] ids are kept (a prompt or infilling template); the
    [MASK]s are generated. The canvas lives on `device` (default: `fixed`'s, else the first generator's).
    """
    _check_args(policy, per_step, block_length)
    if len(generators) != B:
        raise ValueError(f"need one generator per sample: {len(generators)} for B={B}")
    if device is None:
        device = fixed.device if fixed is not None else generators[0].device
    if fixed is None:
        canvas = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    else:
        canvas = fixed.to(device, torch.long).expand(B, L).clone()  # (B, L)
    start = canvas != mask_id  # (B, L)
    logprobs = torch.zeros(B, L, dtype=torch.float64, device=device)
    step = torch.full((B, L), -1, dtype=torch.long, device=device)
    s = 0
    while True:
        masked = canvas == mask_id  # (B, L)
        if not bool(masked.any()):
            return PolicySample(canvas, logprobs, step, s)
        log_probs = predict_canvases(predict, canvas)  # (B, L, V)
        chosen = policy_step(log_probs, masked, policy, per_step, block_length)  # (B, L)
        drawn = draw_categorical(log_probs, generators).to(device)  # (B, L)
        logp = log_probs.gather(2, drawn[:, :, None]).squeeze(2).double().to(device)  # (B, L)
        canvas = torch.where(chosen, drawn, canvas)
        logprobs = torch.where(chosen, logp, logprobs)
        step = torch.where(chosen & ~start, torch.full_like(step, s), step)
        s += 1


def generate_with_policy(
    model: torch.nn.Module,
    canvas: Tensor,
    fixed: Tensor,
    mask_id: int,
    policy: str,
    per_step: int,
    generators: Sequence[torch.Generator],
    block_length: int | None = None,
) -> Generation:
    """`unmask sample --policy`: fill the non-`fixed` positions of `canvas` (B, L) by `policy_sample`, sample b
    drawing from `generators[b]` (float64 on the generators' device). Returns the sampler's `Generation`: tokens,
    per-character log-probs, forward passes and, per sample, the model calls it used."""
    B, L = canvas.shape
    config = getattr(model, "config", None)
    if bool(getattr(config, "causal", False)):
        raise UserError("--policy: an autoregressive (causal) checkpoint has one order already; give a diffusion one")
    window = int(getattr(config, "block_size", L))
    if canvas.shape[1] > window:
        raise UserError(f"--length={L}: --policy fills one window of at most the model's block_size={window}")
    start = torch.where(fixed.to(canvas.device), canvas, torch.full_like(canvas, mask_id))  # (B, L)
    with torch.inference_mode():
        out = policy_sample(
            model_predict(model, mask_id), B, L, mask_id, policy, per_step, generators, block_length, start
        )
    nfe = (out.step.amax(dim=1) + 1).cpu()  # (B,): a row's calls end with its last commit
    return Generation(out.tokens, out.logprobs, out.forward_passes, nfe)
