"""Block-diffusion sampling: blocks on the model's grid, a KV cache of the finished blocks, prompts and windows."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from unmask.generation.cached import generate_block_diffusion, plan_diffusion_blocks
from unmask.generation.canvas import prompt_canvas
from unmask.generation.diffusion import SamplingConfig
from unmask.generation.draws import RowGenerators
from unmask.model import KVCache, ModelConfig, Transformer

MASK, V, K, BLOCK_SIZE = 8, 9, 4, 16  # ids 0..7 are characters, 8 is [MASK]


def bd_model(seed: int = 0, self_conditioning: bool = False) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=V, block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=16, diffusion_block=K,
        self_conditioning=self_conditioning,
    )  # fmt: skip
    model = Transformer(config).eval()
    if self_conditioning:  # a trained-looking projection (a fresh one is zero: the input would change nothing)
        torch.nn.init.normal_(model.self_cond_proj.weight, std=1.0)
    return model


class Recording(torch.nn.Module):
    """Wraps a model and records (input length, cache length before the call, update_cache) of every call."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, int | None, bool]] = []

    def forward(self, idx: Tensor, *, cache: KVCache | None = None, update_cache: bool = False) -> Tensor:
        self.calls.append((idx.shape[1], None if cache is None else cache.length, update_cache))
        return self.model(idx, cache=cache, update_cache=update_cache)


def test_cached_block_logits_equal_the_block_causal_forward() -> None:
    model = bd_model()
    x = torch.randint(0, MASK, (3, 16), generator=torch.Generator().manual_seed(0))
    noisy = x.clone()
    noisy[:, [12, 14, 15]] = MASK  # the current block, partly masked
    cache = KVCache()
    with torch.inference_mode():
        model(x[:, :8], cache=cache, update_cache=True)  # two finished blocks in one pass
        model(x[:, 8:12], cache=cache, update_cache=True)  # and one more
        cached = model(noisy[:, 12:16], cache=cache)  # (B, 4, V)
        full = model(noisy)  # block-causal: the blocks before see neither the noisy block nor each other's future
    assert cache.length == 12
    assert torch.allclose(cached, full[:, 12:16], atol=1e-5)


def test_blocks_lie_on_the_grid_and_windows_keep_whole_blocks() -> None:
    masked = (torch.arange(40) >= 6).unsqueeze(0)  # a 6-character prompt: block 0 is all prompt, block 1 half
    blocks = plan_diffusion_blocks(masked, K, BLOCK_SIZE, steps=27)
    assert [(b.start, b.end) for b in blocks] == [(4 * j, 4 * j + 4) for j in range(1, 10)]
    assert sum(b.steps for b in blocks) == 27 and blocks[0].steps == 2  # 2 positions to fill, the others 4
    for b in blocks:
        assert b.window_start % K == 0 and b.window_end == b.end and b.end - b.window_start <= BLOCK_SIZE
        assert b.window_start == 0 or b.end - b.window_start >= BLOCK_SIZE // 2  # restarts at half the context
    assert [b.window_start for b in blocks] == [0, 0, 0, 12, 12, 12, 24, 24, 24]
    short = plan_diffusion_blocks((torch.arange(10) >= 2).unsqueeze(0), 4, 16, None)
    assert [(b.start, b.end, b.steps) for b in short] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    with pytest.raises(ValueError, match="diffusion_block"):
        plan_diffusion_blocks(masked, 32, 16, None)


def bd_samples(
    config: SamplingConfig,
    use_cache: bool,
    batch_size: int = 4,
    n: int = 4,
    length: int = 40,
    model: object = None,
    merge_commit: bool = True,
    self_conditioning: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    canvas, fixed = prompt_canvas([1, 2, 3, 4, 5, 6], length, MASK)
    tokens, logprobs, nfe = [], [], []
    for first in range(0, n, batch_size):
        rows = min(batch_size, n - first)
        out = generate_block_diffusion(
            model or bd_model(self_conditioning=self_conditioning), canvas.expand(rows, -1).clone(),
            fixed.expand(rows, -1), MASK, BLOCK_SIZE, K, config, RowGenerators.for_samples(3, first, rows),
            use_cache=use_cache, merge_commit=merge_commit, self_conditioning=self_conditioning,
        )  # fmt: skip
        tokens.append(out.tokens)
        logprobs.append(out.logprobs)
        nfe.append(out.nfe)
    return torch.cat(tokens), torch.cat(logprobs), torch.cat(nfe)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(steps=34, remasking="random"),
        SamplingConfig(steps=17, remasking="low_confidence", schedule="cosine", temperature=0.8),
        SamplingConfig(steps=20, remasking="margin", top_k=4),
        SamplingConfig(steps=34, remasking="entropy", top_p=0.8),
        SamplingConfig(steps=34, remasking="remask", randomness_strength=0.5),
        SamplingConfig(remasking="low_confidence", confidence_threshold=0.14),
        SamplingConfig(remasking="entropy", entropy_budget=2.5),
    ],
    ids=lambda c: f"{c.remasking}-{c.schedule}-{c.confidence_threshold}-{c.entropy_budget}",
)
@pytest.mark.parametrize("sc", [False, True], ids=["plain", "self_conditioning"])
def test_sampling_with_and_without_the_cache_gives_identical_samples(config: SamplingConfig, sc: bool) -> None:
    """Also with self-conditioning: the previous step's prediction enters the block's positions only, zeros at the
    clean ones, so the merged commit's keys and values are those of clean text."""
    cached, cached_lp, cached_nfe = bd_samples(config, use_cache=True, self_conditioning=sc)
    plain, plain_lp, plain_nfe = bd_samples(config, use_cache=False, self_conditioning=sc)
    assert torch.equal(cached, plain) and torch.equal(cached_nfe, plain_nfe)
    assert torch.allclose(cached_lp, plain_lp, atol=1e-5)
    separate, separate_lp, separate_nfe = bd_samples(config, use_cache=True, merge_commit=False, self_conditioning=sc)
    assert torch.equal(separate, cached) and torch.equal(separate_nfe, cached_nfe)
    assert torch.allclose(separate_lp, cached_lp, atol=1e-5)
    assert (cached[:, :6] == torch.tensor([1, 2, 3, 4, 5, 6])).all() and (cached < MASK).all()
    assert len({tuple(row) for row in cached.tolist()}) > 1
    one, _, _ = bd_samples(config, use_cache=True, batch_size=1, self_conditioning=sc)  # rows finishing apart
    assert torch.equal(one, cached)


def test_prompt_blocks_are_prefilled_and_finished_blocks_fed_once_in_passes_of_their_own() -> None:
    model = Recording(bd_model())
    out = bd_samples(SamplingConfig(steps=34), use_cache=True, n=2, length=40, model=model, merge_commit=False)
    # Block 0 (all prompt) goes into the cache, block 1 starts with the prompt's 2 last characters fixed.
    assert model.calls[:4] == [(4, 0, True), (4, 4, False), (4, 4, False), (4, 4, True)]
    feeds = [c for c in model.calls if c[2]]
    assert len(feeds) == 9  # one feed before each of the 9 generated blocks
    # The cache grows by one block per feed until the window is full; then the window restarts at half the context
    # (one block of 4 here, from an empty cache) and grows again: never a rebuild of the whole context per block.
    assert [c[1] for c in feeds] == [0, 4, 8, 0, 4, 8, 0, 4, 8]
    assert [c[0] for c in feeds] == [4] * 9
    assert out[2].tolist() == [34, 34]  # NFE counts denoising passes only
    assert len(model.calls) == 34 + 9


def test_finished_blocks_are_committed_inside_the_next_blocks_first_pass() -> None:
    model = Recording(bd_model())
    out = bd_samples(SamplingConfig(steps=34), use_cache=True, n=2, length=40, model=model)  # one per position
    # Block 0 (all prompt) enters the cache in block 1's first pass (4 clean + 4 noisy positions, from an empty
    # cache); the cache then holds block 0 only, and block 1's second step runs its 4 positions against it. Block
    # 1 enters in block 2's first pass, and so on.
    assert model.calls[:6] == [(8, 0, True), (4, 4, False), (8, 4, True), (4, 8, False), (4, 8, False), (4, 8, False)]
    commits = [c for c in model.calls if c[2]]
    # The same 9 commits as separate feeds (block 0 with the prompt, the blocks before each later block, the
    # window restarts), each now one block longer, and never a pass of its own.
    assert [c[1] for c in commits] == [0, 4, 8, 0, 4, 8, 0, 4, 8]
    assert [c[0] for c in commits] == [4 + K] * 9
    assert all(c[0] == K for c in model.calls if not c[2])
    assert out[2].tolist() == [34, 34] and len(model.calls) == 34  # one forward pass per denoising step


def test_a_prompt_longer_than_the_context_is_cached_from_its_last_whole_blocks() -> None:
    model = Recording(bd_model())
    prompt = [i % MASK for i in range(21)]  # 5 whole blocks and one character
    canvas, fixed = prompt_canvas(prompt, 32, MASK)
    out = generate_block_diffusion(
        model, canvas.unsqueeze(0), fixed.unsqueeze(0), MASK, BLOCK_SIZE, K, SamplingConfig(steps=11),
        RowGenerators.for_samples(0, 0, 1),
    )  # fmt: skip
    # Block 4 (positions 16..19; the window restarts at half the context) enters the cache with block 5's first pass.
    assert model.calls[0] == (8, 0, True)
    assert out.tokens[0, :21].tolist() == prompt and (out.tokens < MASK).all()


def _canvas(prompt_length: int, length: int, rows: int, fully_fixed_block: int | None = None) -> tuple[Tensor, Tensor]:
    canvas, fixed = prompt_canvas([i % MASK for i in range(prompt_length)], length, MASK)
    canvas, fixed = canvas.expand(rows, -1).clone(), fixed.expand(rows, -1).clone()
    if fully_fixed_block is not None:  # the last row has this block given: it sits out that block's steps
        span = slice(fully_fixed_block * K, (fully_fixed_block + 1) * K)
        canvas[-1, span], fixed[-1, span] = torch.arange(K) % MASK, True
    return canvas, fixed


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(steps=64, remasking="random"),  # more steps than positions in short canvases: steps skipped
        SamplingConfig(steps=24, remasking="low_confidence", schedule="cosine", temperature=0.8),  # empty 1st steps
        SamplingConfig(steps=20, remasking="margin", top_k=4),
        SamplingConfig(steps=30, remasking="entropy", top_p=0.8),
        SamplingConfig(steps=30, remasking="remask", randomness_strength=0.5),
        SamplingConfig(remasking="low_confidence", confidence_threshold=0.14),
        SamplingConfig(remasking="random", entropy_budget=1.0),
    ],
    ids=lambda c: f"{c.remasking}-{c.schedule}-{c.confidence_threshold}-{c.entropy_budget}",
)
@pytest.mark.parametrize(
    ("prompt_length", "length", "fully_fixed_block"),
    [
        (0, 3, None),  # one partial block, nothing to commit
        (0, 13, None),  # no prompt, a partial last block
        (6, 40, None),  # a prompt ending inside a block, beyond the context (window restarts)
        (8, 16, None),  # a prompt of whole blocks, exactly the context
        (21, 50, None),  # a prompt longer than the context
        (6, 40, 2),  # one row sits out block 2: block 1's commit rides on a pass the other rows need
    ],
)
def test_committing_in_the_next_blocks_first_pass_gives_identical_samples_and_saves_one_pass_per_commit(
    config: SamplingConfig, prompt_length: int, length: int, fully_fixed_block: int | None
) -> None:
    canvas, fixed = _canvas(prompt_length, length, 3, fully_fixed_block)
    runs = {}
    for merge in (False, True):
        model = Recording(bd_model())
        out = generate_block_diffusion(
            model, canvas, fixed, MASK, BLOCK_SIZE, K, config, RowGenerators.for_samples(5, 0, 3), merge_commit=merge
        )
        runs[merge] = (out, model.calls)
    (old, old_calls), (new, new_calls) = runs[False], runs[True]
    assert torch.equal(new.tokens, old.tokens) and torch.equal(new.nfe, old.nfe)
    assert torch.allclose(new.logprobs, old.logprobs, atol=1e-5)
    assert (new.tokens < MASK).all() and torch.equal(new.tokens[fixed], canvas[fixed])
    # Every block with finished text before it in its window is committed once, in a pass of its own before ...
    blocks = plan_diffusion_blocks(~fixed, K, BLOCK_SIZE, None)
    commits = sum(b.start > b.window_start for b in blocks)
    old_commits = [c for c in old_calls if c[2]]
    assert len(old_commits) == commits and len(old_calls) == old.forward_passes
    # ... and now inside the block's first pass: exactly one forward pass fewer per commit.
    assert old.forward_passes - new.forward_passes == commits == sum(c[2] for c in new_calls)
    assert len(new_calls) == new.forward_passes == old.forward_passes - commits
    widths = [b.end - b.start for b in blocks if b.start > b.window_start]  # the noisy block rides along
    assert [c[0] for c in new_calls if c[2]] == [c[0] + w for c, w in zip(old_commits, widths, strict=True)]
    assert commits == (0 if length <= K else len(blocks) - (prompt_length < K))
