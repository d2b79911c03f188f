"""Generation with an exact KV cache: autoregressive checkpoints and block-diffusion checkpoints.

Both feed what is finished once into a `unmask.model.KVCache` and then run only the new positions against it:
one character per forward pass for an autoregressive model; for a block-diffusion model (Arriola et al. 2025,
BD3-LM) the denoising steps of one block of K characters, every remasking strategy, schedule, `confidence_threshold`
and `entropy_budget` of `unmask.generation.diffusion` inside it, the finished blocks entering the cache inside the
next block's first denoising pass. Past the context, the cache is recomputed from about half of it, so that one
recomputation serves block_size / 2 characters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from unmask.generation.diffusion import Generation, SamplingConfig, StepEvent, _Denoiser, place
from unmask.generation.draws import Generators, model_probs, sample_categorical
from unmask.generation.remasking import Remasking, make_remasking
from unmask.generation.schedules import Block, split_steps
from unmask.model import KVCache

# --- autoregressive checkpoints -------------------------------------------------------------------------------


class CachedModel(Protocol):
    """A `unmask.model.Transformer`-like model: ids (B, T) -> logits (B, T, V), optionally through a KV cache."""

    def __call__(
        self, idx: Tensor, *, cache: KVCache | None = None, update_cache: bool = False, self_cond: Tensor | None = None
    ) -> Tensor: ...


def prefix_length(fixed: Tensor) -> int:
    """Length P of the fixed prefix of `fixed` (B, L), which must be the same in every row and the only fixed
    text (positions >= P all free); raises ValueError otherwise."""
    free = ~fixed[0]
    P = int(free.int().argmax()) if bool(free.any()) else fixed.shape[1]
    if not (fixed == fixed[:1]).all() or bool(fixed[0, P:].any()):
        raise ValueError("left-to-right generation needs one fixed prefix, the same in every row, and nothing after it")
    return P


@torch.inference_mode()
def generate_autoregressive(
    model: CachedModel,
    canvas: Tensor,
    fixed: Tensor,
    mask_id: int,
    block_size: int,
    config: SamplingConfig,
    generator: Generators,
    on_step: Callable[[StepEvent], None] | None = None,
) -> Generation:
    """Continue the fixed prefix of `canvas` (B, L) one character at a time with a causal model and a KV cache.

    Each character is drawn from the tempered, top-k/top-p filtered next-character distribution (float64
    Gumbel-max, `sample_categorical`); its log-probability is the untempered one. The prefix (at least one
    character: the model has no beginning-of-text token) is fed once; each new character is then one forward
    pass of length 1 against the cache, so NFE = characters generated. When the cache holds `block_size`
    positions it is recomputed from the last `block_size // 2` characters (RoPE keys are stored rotated by their
    absolute positions, so the window cannot slide without recomputing), and generation goes on cached: beyond
    the context every character sees between block_size / 2 and block_size characters before it, and one
    recomputation of block_size / 2 positions serves block_size / 2 characters. (Recomputing from the last
    block_size - 1 characters instead, nanoGPT's window, would recompute at every character: no faster than no
    cache at all.)
    `config.steps`, `schedule`, `remasking`, `block_length`, `confidence_threshold` and `entropy_budget` do not apply.
    """
    B, L = canvas.shape
    P = prefix_length(fixed)
    if P == 0:
        raise ValueError("an autoregressive model needs at least one fixed character to continue")
    x = canvas.clone()  # (B, L)
    sampling_device = generator.device
    logprobs = torch.zeros(B, L, dtype=torch.float64, device=sampling_device)  # (B, L)
    banned: Tensor | None = None
    cache = KVCache()
    start = max(0, P - block_size)  # a prompt longer than the context: its last block_size characters
    logits = model(x[:, start:P], cache=cache, update_cache=True)[:, -1]  # (B, V)
    forward_passes = 1
    for p in range(P, L):
        if banned is None:
            banned = torch.arange(logits.shape[-1], device=sampling_device) >= mask_id  # (V,)
        token = sample_categorical(logits, banned, config.temperature, config.top_k, config.top_p, generator)  # (B,)
        probs = model_probs(logits, banned, sampling_device)  # (B, V)
        logprobs[:, p] = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
        x[:, p] = token.to(x.device)
        if on_step is not None:
            changed = torch.zeros_like(fixed)  # (B, L)
            changed[:, p] = True
            nfe = torch.full((B,), forward_passes, dtype=torch.long)
            on_step(StepEvent(p - P, L - P, 0, x, changed, forward_passes, nfe))
        if p == L - 1:
            break
        if cache.length == block_size:  # full: recompute from the last block_size // 2 characters, the new one included
            cache = KVCache()
            keep = max(1, block_size // 2)
            logits = model(x[:, p + 1 - keep : p + 1], cache=cache, update_cache=True)[:, -1]  # (B, V)
        else:
            logits = model(x[:, p : p + 1], cache=cache, update_cache=True)[:, -1]  # (B, V)
        forward_passes += 1
    nfe = torch.full((B,), forward_passes, dtype=torch.long)
    return Generation(x, logprobs, forward_passes, nfe)


# --- block-diffusion checkpoints ------------------------------------------------------------------------------


def plan_diffusion_blocks(masked: Tensor, diffusion_block: int, block_size: int, steps: int | None) -> list[Block]:
    """The blocks a block-diffusion model (block length K = `diffusion_block`) fills, left to right.

    Blocks lie on the model's grid [jK, (j + 1)K) from canvas position 0 (the last one may be shorter), as in
    training, where blocks start at the window's start; a grid block with nothing to fill is skipped (whole
    prompt blocks: they only enter the cache). Steps are split across the blocks as in `plan_blocks`
    (`steps=None`: as many as each block has positions, for confidence-threshold runs). The window
    [window_start, end) is the block with its left context: it grows block by block and, when it would exceed
    `block_size`, restarts at about half the context; its start is a multiple of K, so the cached blocks keep the
    grid the model was trained on, and the cache is recomputed once per block_size / 2 characters rather than at
    every block. O(L + n log n).
    """
    K = diffusion_block
    if not 0 < K <= block_size:
        raise ValueError(f"diffusion_block {K} must be in [1, block_size={block_size}]")
    L = masked.shape[1]
    per_position = masked.sum(dim=0).cpu()  # (L,) rows in which each position is to be filled
    starts = torch.arange(0, L, K)  # (n,)
    ends = (starts + K).clamp(max=L)  # (n,)
    cumulative = torch.cat((torch.zeros(1, dtype=torch.long), per_position.cumsum(0)))  # (L + 1,)
    weights = cumulative[ends] - cumulative[starts]  # (n,)
    keep = weights > 0
    span_starts, span_ends, span_weights = starts[keep].tolist(), ends[keep].tolist(), weights[keep].tolist()
    if not span_starts:
        return []
    if steps is None:
        step_counts = [e - s for s, e in zip(span_starts, span_ends, strict=True)]
    else:
        step_counts = split_steps(span_weights, steps)
    blocks = []
    window_start = 0
    for s, e, n_steps in zip(span_starts, span_ends, step_counts, strict=True):
        if e - window_start > block_size:
            # The window is full: restart it at about half the context (a multiple of K, never past the block), so
            # that one recomputation of the cache serves the next block_size / 2 characters.
            window_start = min(-(-max(0, e - block_size // 2) // K) * K, s - s % K)
        blocks.append(Block(s, e, n_steps, window_start, e))
    return blocks


def _cache_rows(cache: KVCache, rows: Tensor) -> KVCache:
    """A cache holding only the batch rows `rows` (R,) of `cache` (copies; `cache` is unchanged)."""
    sub = KVCache()
    for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
        sub.store(layer, keys[rows], values[rows])  # (R, H, S, D)
    return sub


@torch.inference_mode()
def generate_block_diffusion(
    model: CachedModel,
    canvas: Tensor,
    fixed: Tensor,
    mask_id: int,
    block_size: int,
    diffusion_block: int,
    config: SamplingConfig,
    generator: Generators,
    on_step: Callable[[StepEvent], None] | None = None,
    remasking: Remasking | None = None,
    use_cache: bool = True,
    merge_commit: bool = True,
    self_conditioning: bool = False,
) -> Generation:
    """Fill `canvas` (B, L) with a block-diffusion model (Arriola et al. 2025, BD3-LM): block by block, left to
    right, each block by iterative unmasking conditioned on the finished blocks before it.

    Inside a block every remasking strategy, schedule, `confidence_threshold` and `entropy_budget` works as in
    `generate`. Finished blocks enter a `KVCache` once, clean (`update_cache=True`, the training layout where clean
    block b attends to clean blocks <= b); each denoising step then runs only the block's positions against the
    cache. The finished blocks are committed inside the next block's first denoising pass: one forward over
    [finished blocks, clean ; the new block, noisy], block-causal in absolute positions, so the clean blocks attend
    to the cache and to themselves exactly as in a pass of their own and the noisy block to all of them; the noisy
    block's keys and values are then cropped off the cache. Whole blocks of a prompt are prefilled the same way,
    while a prompt's partial last block stays in the canvas as fixed characters of the first generated block. Past
    `block_size` the window restarts at about half the context (whole blocks; `plan_diffusion_blocks`) and the
    cache is rebuilt from the blocks it keeps, in that block's first pass too. Fixed characters after the current
    block are not seen while it is generated (the model is block-causal), which is why `unmask sample` refuses
    templates with text beyond the first hole's block.

    `merge_commit=False` commits the finished blocks in a forward pass of their own before the block's first step
    (one pass more per block; the merged path is tested to give identical samples). `use_cache=False` runs every
    step as one block-causal forward over the window instead (the reference the cached paths are tested against).
    `Generation.nfe` counts denoising passes; `forward_passes` counts every model call for the batch: the
    denoising passes, plus the separate commits with `merge_commit=False`.

    `self_conditioning`: each denoising step feeds the block's previous prediction (`_Denoiser`) at the block's
    positions and zeros at every clean one, so the committed blocks' keys and values stay those of clean text and
    the merged commit stays exact.
    """
    B, L = canvas.shape
    strategy = remasking if remasking is not None else make_remasking(config.remasking, config.randomness_strength)
    x = torch.where(fixed, canvas, torch.full_like(canvas, mask_id))  # (B, L)
    steps = None if config.adaptive else config.steps
    blocks = plan_diffusion_blocks(~fixed, diffusion_block, block_size, steps)
    total_steps = sum(b.steps for b in blocks)
    denoiser = _Denoiser(x, fixed, mask_id, config, strategy, generator, on_step, total_steps, self_conditioning)
    cache, cache_start = KVCache(), 0  # the cache holds canvas positions cache_start .. cache_start + length - 1
    for b, block in enumerate(blocks):
        s, e, start = block.start, block.end, block.window_start
        if use_cache:
            if start != cache_start:  # the window moved: the cached keys sit at the wrong RoPE positions
                cache, cache_start = KVCache(), start
            fed = cache_start + cache.length  # finished positions fed .. s - 1 are not in the cache yet
            if fed < s and not merge_commit:
                model(x[:, fed:s], cache=cache, update_cache=True)  # finished blocks, clean, in one pass
                denoiser.forward_passes += 1
                fed = s
            pending = [fed]  # where the block's first model call starts: s once the cache holds everything before

            def cached(
                rows: Tensor,
                self_cond: Tensor | None,
                s: int = s,
                e: int = e,
                cache: KVCache = cache,
                cache_start: int = cache_start,
                pending: list[int] = pending,
            ) -> Tensor:
                extra: dict[str, Any] = {}  # the self-condition input, when there is one
                if pending[0] < s:
                    # The commit rides on this pass: every row (the cache is the whole batch's), the finished blocks
                    # clean and the block noisy; the block's own keys/values are cropped off again.
                    first = pending[0]
                    if self_cond is not None:  # every row's input: zeros for the rows not in this step
                        every = self_cond.new_zeros(B, *self_cond.shape[1:])  # (B, n, V)
                        every[rows] = self_cond
                        extra["self_cond"] = place(every, e - first, s - first)  # (B, e - first, V)
                    logits = model(x[:, first:e], cache=cache, update_cache=True, **extra)[:, s - first :]  # (B, n, V)
                    cache.crop(s - cache_start)
                    pending[0] = s
                    return logits if rows.numel() == B else logits[rows]  # (R, n, V)
                rows_cache = cache if rows.numel() == B else _cache_rows(cache, rows)
                if self_cond is not None:
                    extra["self_cond"] = self_cond  # (R, n, V)
                return model(x[rows, s:e], cache=rows_cache, **extra)  # (R, n, V): the block against the cache

            denoiser.fill_block(b, block, cached)
        else:

            def uncached(rows: Tensor, self_cond: Tensor | None, s: int = s, e: int = e, start: int = start) -> Tensor:
                extra: dict[str, Any] = {}
                if self_cond is not None:
                    extra["self_cond"] = place(self_cond, e - start, s - start)  # (R, e - start, V)
                return model(x[rows, start:e], **extra)[:, s - start :]  # (R, n, V): block-causal over the window

            denoiser.fill_block(b, block, uncached)
    return denoiser.result()
