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
certainty. `entropy_budget` (the EB-sampler, Ben-Hamu et al. 2025) adapts the same way by another rule: each step
commits the masked positions of the block in the strategy's order while their summed predictive entropy (nats)
stays within the budget, and at least one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from unmask.config.flags import bounded, check_ranges
from unmask.errors import UserError
from unmask.generation.draws import Generators, RowGenerators, model_probs, sample_categorical
from unmask.generation.remasking import (
    REMASKING,
    Proposal,
    Remasking,
    chosen_probability,
    entropy_budget_commit,
    entropy_nats,
    make_remasking,
    select_top,
    threshold_commit,
)
from unmask.generation.schedules import SCHEDULES, Block, num_transfer_tokens, plan_blocks

# --- the loop -------------------------------------------------------------------------------------------------


MAX_STEPS = 1_000_000  # more steps than characters to fill are skipped; a canvas holds at most 10^6 characters


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample, validated on construction with errors that name `unmask sample`'s flags (the command and
    `unmask.load(...).generate` take the same options)."""

    steps: int = bounded(64, 1, MAX_STEPS)
    schedule: str = "linear"
    remasking: str = "random"  # one of REMASKING, or "critic"
    randomness_strength: float = bounded(0.4, 0.0, 1.0)  # for remasking="remask" / "critic"
    temperature: float = bounded(1.0, 0.0, 1000.0)
    top_k: int = bounded(0, 0, 2**20)  # 0: off
    top_p: float = bounded(1.0, 0.0, 1.0, lo_open=True)  # 1: off
    # None: one block, or default_block_length for canvases over block_size
    block_length: int | None = bounded(None, 1, MAX_STEPS)
    # None: the schedule's counts; a float: commit every masked position of the block whose drawn character has
    # probability >= this, at least one per step (Fast-dLLM); `steps` and `schedule` are then unused.
    confidence_threshold: float | None = bounded(None, 0.0, 1000.0)
    # None: off; a float G >= 0: commit masked positions of the block in the strategy's order while the summed
    # entropy (nats) of the model's distributions at them stays <= G, at least one per step (EB-sampler); `steps`
    # and `schedule` are then unused. Not together with `confidence_threshold`.
    entropy_budget: float | None = bounded(None, 0.0, 1e9)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule={self.schedule}: expected one of {', '.join(SCHEDULES)}")
        if self.remasking not in (*REMASKING, "critic"):
            raise UserError(f"--remasking={self.remasking}: expected one of {', '.join((*REMASKING, 'critic'))}")
        tau, budget = self.confidence_threshold, self.entropy_budget
        if tau is not None and budget is not None:
            raise UserError(f"--entropy_budget={budget}: not with --confidence_threshold={tau} (one adaptive rule)")
        for flag, value in (("confidence_threshold", tau), ("entropy_budget", budget)):
            if value is not None and self.remasking in ("remask", "critic"):
                raise UserError(
                    f"--{flag}={value}: not with --remasking={self.remasking} (it re-masks down the schedule's "
                    "counts; adaptive decoding needs a strategy that commits)"
                )

    @property
    def adaptive(self) -> bool:
        """True when the number of steps adapts to the model (a confidence threshold or an entropy budget)."""
        return self.confidence_threshold is not None or self.entropy_budget is not None


@dataclass(frozen=True)
class StepEvent:
    """Passed to `on_step` after every step that ran the model."""

    step: int  # 0-based, counted over all blocks
    steps: int  # planned steps (adaptive runs: the most possible, one per masked position)
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


# (rows (R,), self-condition input (R, n, V) or None) -> logits (R, n, V) of the current block for those rows
LogitsFor = Callable[[Tensor, Tensor | None], Tensor]


class _Denoiser:
    """The state of one generation: canvas, log-probabilities, counters; fills one block at a time.

    The model is reached through a `LogitsFor` per block, so windowed models and cached ones (block diffusion)
    share the step logic. Only the rows that have something to do in a step are run and draw random numbers.

    `self_conditioning` (a model with `ModelConfig.self_conditioning`): every step passes the model's distribution of
    the row's previous step in this block as the self-condition input, at the positions still masked (zeros
    elsewhere); nothing (the same as zeros) at a block's first step. It costs no extra forward pass.
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
        self_conditioning: bool = False,
    ) -> None:
        for name in ("confidence_threshold", "entropy_budget"):
            value = getattr(config, name)
            if value is None:
                continue
            if strategy.refill:
                raise ValueError(f"{name} does not apply to the refill strategy {strategy.name!r}")
            if not value >= 0:  # `not >=` also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        if config.confidence_threshold is not None and config.entropy_budget is not None:
            raise ValueError("confidence_threshold and entropy_budget are two rules for the same choice; give one")
        if isinstance(generator, RowGenerators) and len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} row generators for a batch of {x.shape[0]}")
        B, L = x.shape
        self.x, self.fixed, self.mask_id, self.config, self.strategy = x, fixed, mask_id, config, strategy
        self.generator, self.on_step, self.total_steps = generator, on_step, total_steps
        self.self_conditioning = self_conditioning
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
        threshold, budget = config.confidence_threshold, config.entropy_budget
        editable = ~self.fixed[:, s:e]  # (B, n): all masked at the start of the block
        counts = remaining = None
        if not config.adaptive:
            counts = num_transfer_tokens(editable.sum(dim=1), block.steps, config.schedule)  # (B, S_b)
            remaining = editable.sum(dim=1, keepdim=True) - counts.cumsum(dim=1)  # (B, S_b): masked after each step
        previous: Tensor | None = None  # (B, n, V) float32: each row's last prediction in the block (self-conditioning)
        for i in range(block.steps):
            current = x[:, s:e]  # (B, n)
            masked = editable & (current == mask_id)  # (B, n)
            if config.adaptive:
                active = masked.any(dim=1)  # (B,)
                if not bool(active.any()):
                    break  # the block is done: an adaptive run takes only the steps it needs
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
            self_cond = None if previous is None else previous[rows] * masked[rows].unsqueeze(-1)  # (R, n, V)
            logits = logits_for(rows, self_cond)  # (R, n, V)
            self.forward_passes += 1
            self.nfe[rows.cpu()] += 1
            if self.banned is None:
                # Special tokens are the ids from mask_id up; they are never drawn and carry probability 0.
                self.banned = torch.arange(logits.shape[-1], device=self.sampling_device) >= mask_id  # (V,)
            current, masked, row_editable = current[rows], masked[rows], editable[rows]  # (R, n)
            drawn = sample_categorical(logits, self.banned, config.temperature, config.top_k, config.top_p, generator)
            probs = model_probs(logits, self.banned, self.sampling_device)  # (R, n, V)
            if self.self_conditioning:
                if previous is None:
                    previous = torch.zeros(x.shape[0], e - s, probs.shape[-1], device=x.device)  # (B, n, V)
                previous[rows] = probs.to(x.device, torch.float32)
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
                    p_drawn = chosen_probability(proposal).to(x.device)  # (R, n)
                    written = threshold_commit(p_drawn, confidence, masked, threshold)
                elif budget is not None:
                    # The entropy of the model's own (untempered) distribution, like the threshold's probability:
                    # how uncertain the model is there, whatever temperature and filters the draw used.
                    uncertainty = entropy_nats(probs).to(x.device)  # (R, n)
                    written = entropy_budget_commit(uncertainty, confidence, masked, budget)
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
    model: Callable[..., Tensor],
    canvas: Tensor,
    fixed: Tensor,
    mask_id: int,
    block_size: int,
    config: SamplingConfig,
    generator: Generators,
    on_step: Callable[[StepEvent], None] | None = None,
    remasking: Remasking | None = None,
    self_conditioning: bool = False,
) -> Generation:
    """Fill every non-fixed position of `canvas` (B, L); `model` maps ids (B, T) to logits (B, T, V).

    `generator`: `RowGenerators` (one per row: each sample independent of the batch) or one `torch.Generator`
    for the whole batch. `remasking` overrides `config.remasking` (e.g. a critic). Steps in which no row commits
    anything are skipped without calling the model (they happen when a block has fewer masked positions than
    steps), and a row with nothing to commit in a step is left out of that step's model call and draws.
    `self_conditioning`: feed each step the previous step's prediction (`_Denoiser`; `model` then also takes
    `self_cond=` (B, T, V)).
    """
    strategy = remasking if remasking is not None else make_remasking(config.remasking, config.randomness_strength)
    x = torch.where(fixed, canvas, torch.full_like(canvas, mask_id))  # (B, L)
    steps = None if config.adaptive else config.steps
    blocks = plan_blocks(~fixed, block_size, config.block_length, steps)
    total_steps = sum(block.steps for block in blocks)
    denoiser = _Denoiser(x, fixed, mask_id, config, strategy, generator, on_step, total_steps, self_conditioning)
    for b, block in enumerate(blocks):
        offset, n = block.start - block.window_start, block.end - block.start

        def logits_for(
            rows: Tensor, self_cond: Tensor | None, block: Block = block, offset: int = offset, n: int = n
        ) -> Tensor:
            window = x[rows, block.window_start : block.window_end]  # (R, W)
            if self_cond is None:
                return model(window)[:, offset : offset + n]  # (R, n, V)
            return model(window, self_cond=place(self_cond, window.shape[1], offset))[:, offset : offset + n]

        denoiser.fill_block(b, block, logits_for)
    return denoiser.result()


def place(self_cond: Tensor, width: int, offset: int) -> Tensor:
    """The self-condition input (R, n, V) of a block placed at `offset` in a window of `width` positions: (R, W, V),
    zeros at the window's other (known) positions."""
    R, n, V = self_cond.shape
    out = self_cond.new_zeros(R, width, V)
    out[:, offset : offset + n] = self_cond
    return out
