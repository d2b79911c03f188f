"""The sampling maths: schedules, float64 categorical draws, strategies, blocks/windows and the loop."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.generation.cached import generate_autoregressive
from unmask.generation.canvas import infill_canvas, placeholder_spans, prompt_canvas
from unmask.generation.diffusion import SamplingConfig, StepEvent, generate
from unmask.generation.draws import RowGenerators, filter_logits, sample_categorical, sample_seed
from unmask.generation.remasking import (
    REMASKING,
    EntropyRemask,
    Proposal,
    Remasking,
    entropy_budget_commit,
    select_top,
)
from unmask.generation.schedules import SCHEDULES, num_transfer_tokens, plan_blocks, split_steps
from unmask.model import KVCache, ModelConfig, Transformer
from unmask.transfer.critic import CriticRemask

MASK = 5  # fake vocabulary: ids 0..4 are characters, 5 is [MASK]


class FixedLogits(nn.Module):
    """A fake model: logits depend only on the absolute position of each window column (via `offsets`).

    Position p gets character p % 5 with confidence growing with p, so low_confidence commits right to left.
    [MASK] gets a huge logit so any leak of special tokens would show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[int] = []

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        self.widths.append(T)
        logits = torch.zeros(B, T, MASK + 1)
        pos = torch.arange(T)
        logits[:, pos, pos % MASK] = 1.0 + 0.1 * pos.float()
        logits[..., MASK] = 50.0
        return logits


# --- schedules ------------------------------------------------------------------------------------------------


def test_linear_and_cosine_counts_are_exact() -> None:
    assert num_transfer_tokens(torch.tensor([10]), 4, "linear").tolist() == [[2, 3, 2, 3]]
    assert num_transfer_tokens(torch.tensor([8, 3]), 4, "linear").tolist() == [[2, 2, 2, 2], [0, 1, 1, 1]]
    # cumulative round(100 (1 - cos(pi s / 8))) = 8, 29, 62, 100
    assert num_transfer_tokens(torch.tensor([100]), 4, "cosine").tolist() == [[8, 21, 33, 38]]
    with pytest.raises(ValueError, match="schedule"):
        num_transfer_tokens(torch.tensor([3]), 2, "quadratic")


@given(
    counts=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    steps=st.integers(1, 300),
    schedule=st.sampled_from(SCHEDULES),
)
def test_schedules_sum_to_the_masked_count(counts: list[int], steps: int, schedule: str) -> None:
    n = num_transfer_tokens(torch.tensor(counts), steps, schedule)
    assert n.shape == (len(counts), steps)
    assert (n >= 0).all()
    assert n.sum(dim=1).tolist() == counts
    if schedule == "linear":
        assert (n.max(dim=1).values - n.min(dim=1).values <= 1).all()
    else:  # cosine commits less in the first half than in the second
        half = steps // 2
        assert (n[:, :half].sum(1) <= n[:, steps - half :].sum(1)).all()


# --- drawing --------------------------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    kept = lambda p: (filter_logits(logits, 0, p) > -math.inf).tolist()  # noqa: E731
    assert kept(0.8) == [True, True, False]
    assert kept(0.79) == [True, True, False]
    assert kept(0.81) == [True, True, True]
    assert kept(0.5) == [True, False, False]
    assert kept(1e-9) == [True, False, False]
    assert (filter_logits(logits, 2, 1.0) > -math.inf).tolist() == [True, True, False]


def test_draws_follow_the_tempered_distribution_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.6, 0.3, 0.1]).log().expand(40000, 3)
    banned = torch.zeros(3, dtype=torch.bool)
    ids = sample_categorical(logits, banned, 1.0, 0, 1.0, g)
    freq = torch.bincount(ids, minlength=3).double() / len(ids)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.01)
    # temperature 0.5 squares the probabilities (renormalised): 0.36, 0.09, 0.01 over 0.46
    ids = sample_categorical(logits, banned, 0.5, 0, 1.0, g)
    freq = torch.bincount(ids, minlength=3).double() / len(ids)
    expected = torch.tensor([0.36, 0.09, 0.01], dtype=torch.float64) / 0.46
    assert torch.allclose(freq, expected, atol=0.01)
    assert set(sample_categorical(logits, banned, 1.0, 2, 1.0, g).tolist()) == {0, 1}
    assert sample_categorical(logits, banned, 0.0, 0, 1.0, g).eq(0).all()


def test_gumbel_max_runs_in_float64() -> None:
    # The same draw recomputed by hand with float64 uniforms from the same generator state: float32 noise
    # (which truncates the tail, arXiv 2409.02908) would consume and round the stream differently.
    logits = torch.randn(2000, 7, generator=torch.Generator().manual_seed(4))
    ids = sample_categorical(logits, torch.zeros(7, dtype=torch.bool), 1.0, 0, 1.0, torch.Generator().manual_seed(5))
    u = torch.rand(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ids, (logits.double() - torch.log(-torch.log(u))).argmax(dim=-1))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.integers(0, 8),
    top_p=st.floats(0.05, 1.0),
)
def test_special_tokens_are_never_drawn(seed: int, temperature: float, top_k: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 8, generator=g) * 3
    logits[:, 6:] += 40.0  # the special ids are by far the most likely
    banned = torch.arange(8) >= 6
    ids = sample_categorical(logits, banned, temperature, top_k, top_p, g)
    assert (ids < 6).all()


def test_select_top_is_exact_and_breaks_ties_leftmost() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.7], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    candidates = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    chosen = select_top(scores, candidates, torch.tensor([2, 3]))
    assert chosen.tolist() == [[False, True, True, False, False], [True, False, True, True, False]]
    everything = select_top(scores, candidates, torch.tensor([9, 9]))
    assert torch.equal(everything, candidates)


# --- blocks and windows ---------------------------------------------------------------------------------------


def test_split_steps_is_exact_with_one_step_per_block_at_least() -> None:
    assert split_steps([64, 64, 64, 64], 64) == [16, 16, 16, 16]
    assert split_steps([128, 128, 32], 9) == [4, 4, 1]
    assert sum(split_steps([5, 1, 300, 7], 50)) == 50 and min(split_steps([5, 1, 300, 7], 50)) >= 1
    with pytest.raises(ValueError):
        split_steps([1, 1, 1], 2)


def test_blocks_start_after_the_prompt_and_windows_hold_left_context() -> None:
    masked = torch.arange(1000) >= 100  # a 100-character prompt, then 900 to generate
    blocks = plan_blocks(masked.unsqueeze(0), block_size=256, block_length=None, steps=64)
    assert [(b.start, b.end) for b in blocks][:2] == [(100, 228), (228, 356)]  # default: block_size / 2 = 128
    assert blocks[-1].end == 1000 and sum(b.steps for b in blocks) == 64
    for b in blocks:
        assert b.window_end - b.window_start == 256
        assert b.window_start <= b.start and b.end <= b.window_end
        assert b.window_end == max(b.end, 256)  # as much text to the left as fits
    one = plan_blocks(masked[:200].unsqueeze(0), block_size=256, block_length=None, steps=7)
    assert [(b.start, b.end, b.steps, b.window_start, b.window_end) for b in one] == [(100, 200, 7, 0, 200)]
    with pytest.raises(ValueError, match="block_size"):
        plan_blocks(masked.unsqueeze(0), block_size=256, block_length=300, steps=64)


def test_planning_a_million_characters_is_linear() -> None:
    # A per-block pass over the canvas (the old planner) made this quadratic: minutes for 10^6 characters.
    masked = (torch.arange(1_000_000) >= 6).unsqueeze(0)  # a 6-character prompt
    blocks = plan_blocks(masked, block_size=256, block_length=None, steps=100_000)
    assert len(blocks) == 7813 and sum(b.steps for b in blocks) == 100_000
    assert (blocks[0].start, blocks[-1].end) == (6, 1_000_000)
    assert all(b.window_end == max(b.end, 256) and b.window_end - b.window_start == 256 for b in blocks)
    assert all(b.end - b.start == 128 for b in blocks[:-1])
    adaptive = plan_blocks(masked, block_size=256, block_length=16, steps=None)  # 62,500 blocks
    assert [b.steps for b in adaptive[:3]] == [16, 16, 16] and adaptive[-1].end == 1_000_000


def test_split_steps_matches_one_at_a_time_apportionment() -> None:
    def reference(weights: list[int], steps: int) -> list[int]:  # the textbook loop, quadratic
        total = sum(weights)
        owed = [steps * w for w in weights]
        alloc = [max(1, o // total) for o in owed]
        while sum(alloc) > steps:
            alloc[max((i for i in range(len(alloc)) if alloc[i] > 1), key=lambda i: alloc[i] * total - owed[i])] -= 1
        while sum(alloc) < steps:
            alloc[max(range(len(alloc)), key=lambda i: owed[i] - alloc[i] * total)] += 1
        return alloc

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (), generator=g))
        weights = torch.randint(1, 40, (n,), generator=g).tolist()
        if int(torch.randint(0, 3, (), generator=g)) == 0:
            weights[0] = 1000  # one block owed almost everything: the one-step minimum overshoots
        steps = n + int(torch.randint(0, 30, (), generator=g))
        assert split_steps(weights, steps) == reference(weights, steps), (weights, steps)


def test_infill_windows_take_known_text_on_both_sides() -> None:
    masked = torch.zeros(1, 600, dtype=torch.bool)
    masked[0, 20:30] = True  # a hole near the start of a long template: the window reaches right
    (block,) = plan_blocks(masked, block_size=100, block_length=None, steps=4)
    assert (block.start, block.end, block.window_start, block.window_end) == (20, 30, 0, 100)
    masked[0, 20:30] = False
    masked[0, 300:310] = True  # in the middle every placement holds 90 known characters: the leftmost wins
    (block,) = plan_blocks(masked, block_size=100, block_length=None, steps=4)
    assert (block.start, block.end, block.window_start, block.window_end) == (300, 310, 210, 310)
    masked[0, 250:260] = True  # two holes: blocks of 10, each window avoids the hole still unknown
    blocks = plan_blocks(masked, block_size=100, block_length=10, steps=4)
    assert [(b.start, b.window_start) for b in blocks] == [(250, 160), (300, 210)]
    assert blocks[0].window_start + 100 < 300


def test_canvases() -> None:
    canvas, fixed = prompt_canvas([1, 2], 5, MASK)
    assert canvas.tolist() == [1, 2, MASK, MASK, MASK] and fixed.tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        prompt_canvas([1, 2, 3], 3, MASK)
    assert placeholder_spans("To be, or ______ to be_", "_") == [(10, 16), (22, 23)]
    canvas, fixed = infill_canvas([1, None, None, 3], MASK)
    assert canvas.tolist() == [1, MASK, MASK, 3] and fixed.tolist() == [True, False, False, True]


# --- the loop with a fake model -------------------------------------------------------------------------------


def run(
    config: SamplingConfig, length: int = 12, batch: int = 3, fixed: Tensor | None = None, seed: int = 0
) -> tuple[Tensor, list[StepEvent], FixedLogits]:
    model = FixedLogits()
    canvas = torch.full((batch, length), MASK)
    if fixed is None:
        fixed = torch.zeros(batch, length, dtype=torch.bool)
    canvas = torch.where(fixed, torch.arange(length).expand(batch, length) % 3, canvas)
    events: list[StepEvent] = []
    hook = lambda e: events.append(StepEvent(e.step, e.steps, e.block, e.canvas.clone(), e.changed.clone(), 0))  # noqa: E731
    out = generate(model, canvas, fixed, MASK, 1 << 20, config, torch.Generator().manual_seed(seed), hook)
    return out.tokens, events, model


def test_low_confidence_with_steps_equal_length_commits_one_position_per_step_most_confident_first() -> None:
    tokens, events, _ = run(SamplingConfig(steps=12, remasking="low_confidence", temperature=0.0))
    assert len(events) == 12
    for i, event in enumerate(events):
        assert event.changed.sum(dim=1).tolist() == [1, 1, 1]
        # confidence grows with the position, so position 11 goes first, then 10, ...
        assert event.changed[:, 11 - i].all()
    assert tokens.tolist() == [[p % MASK for p in range(12)]] * 3  # greedy: the argmax character


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("remasking", [r for r in REMASKING if r != "remask"])
def test_commit_counts_follow_the_schedule(schedule: str, remasking: str) -> None:
    steps, length = 5, 23
    _, events, _ = run(SamplingConfig(steps=steps, schedule=schedule, remasking=remasking), length=length)
    expected = num_transfer_tokens(torch.tensor([length]), steps, schedule)[0]
    assert [int(e.changed[0].sum()) for e in events] == expected.tolist()
    masked_left = [int((e.canvas[0] == MASK).sum()) for e in events]
    assert masked_left == (length - expected.cumsum(0)).tolist()


def test_remask_refills_and_remasks_down_the_schedule() -> None:
    steps, length = 6, 30
    tokens, events, _ = run(SamplingConfig(steps=steps, remasking="remask", randomness_strength=1.0), length=length)
    expected = length - num_transfer_tokens(torch.tensor([length]), steps, "linear")[0].cumsum(0)
    assert [int((e.canvas[0] == MASK).sum()) for e in events] == expected.tolist()
    assert (tokens != MASK).all()
    # Random re-masking revisits committed positions: some position is masked again after being visible.
    visible_then_masked = any(
        ((a.canvas != MASK) & (b.canvas == MASK)).any() for a, b in zip(events, events[1:], strict=False)
    )
    assert visible_then_masked
    with pytest.raises(ValueError):
        EntropyRemask(1.5)


def test_remask_by_entropy_only_remasks_the_most_uncertain() -> None:
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]]], dtype=torch.float64)
    proposal = Proposal(
        tokens=torch.zeros(1, 3, dtype=torch.long),
        probs=probs,
        masked=torch.ones(1, 3, dtype=torch.bool),
        editable=torch.ones(1, 3, dtype=torch.bool),
        context=torch.zeros(1, 3, dtype=torch.long),
        offset=0,
    )
    confidence = EntropyRemask(0.0).confidence(proposal, torch.Generator().manual_seed(0))
    assert confidence.argsort(descending=True).tolist() == [[1, 2, 0]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fixed_bits=st.lists(st.booleans(), min_size=16, max_size=16),
    remasking=st.sampled_from(REMASKING),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    block_length=st.sampled_from([None, 3, 7]),
    seed=st.integers(0, 1000),
)
def test_fixed_positions_never_change_and_no_special_token_is_emitted(
    fixed_bits: list[bool], remasking: str, temperature: float, block_length: int | None, seed: int
) -> None:
    fixed = torch.tensor(fixed_bits).expand(2, 16)
    config = SamplingConfig(steps=16, remasking=remasking, temperature=temperature, block_length=block_length)
    tokens, events, _ = run(config, length=16, batch=2, fixed=fixed, seed=seed)
    template = torch.arange(16).expand(2, 16) % 3
    assert torch.equal(tokens[fixed], template[fixed])
    assert (tokens < MASK).all()
    for event in events:
        assert torch.equal(event.canvas[fixed], template[fixed])


def test_blocks_are_filled_left_to_right() -> None:
    _, events, _ = run(SamplingConfig(steps=6, block_length=4), length=12)
    blocks = [e.block for e in events]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2}
    for e in events:
        columns = e.changed.any(dim=0).nonzero().flatten()
        assert ((columns >= 4 * e.block) & (columns < 4 * e.block + 4)).all()


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    config = SamplingConfig(steps=4, remasking="random")
    a, _, _ = run(config, length=40, seed=7)
    b, _, _ = run(config, length=40, seed=7)
    c, _, _ = run(config, length=40, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_steps_without_commits_skip_the_model() -> None:
    _, events, model = run(SamplingConfig(steps=10), length=4)
    assert len(model.widths) == len(events) == 4


# --- models of a periodic text: an exact oracle and a tiny overfit Transformer ------------------------------------

PERIOD = "abcdefg "
PERIODIC_VOCAB = Vocab(tuple(sorted(set(PERIOD))))


class PeriodicOracle(nn.Module):
    """The exact conditional distribution of a window of 'abcdefg abcdefg ...' given its visible characters.

    Every phase consistent with the visible characters is equally likely; a window fed at the wrong offset
    or a committed character inconsistent with its context leaves no consistent phase (NaN), so any slip of
    the loop's windows or blocks breaks the output.
    """

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        assert T <= 16, "the loop must never feed more than block_size positions"
        V, P = PERIODIC_VOCAB.size, len(PERIOD)
        pattern = torch.tensor(PERIODIC_VOCAB.encode(PERIOD))  # (P,)
        expected = pattern[(torch.arange(P)[:, None] + torch.arange(T)[None, :]) % P]  # (P, T)
        visible = idx != PERIODIC_VOCAB.mask_id  # (B, T)
        consistent = ((expected[None] == idx[:, None]) | ~visible[:, None]).all(dim=-1)  # (B, P)
        onehot = nn.functional.one_hot(expected, V).double()  # (P, T, V)
        probs = torch.einsum("bp,ptv->btv", consistent.double(), onehot)  # (B, T, V)
        return (probs / probs.sum(dim=-1, keepdim=True)).log()


def is_periodic(text: str) -> bool:
    return all(PERIOD[(PERIOD.index(a) + 1) % len(PERIOD)] == b for a, b in zip(text, text[1:], strict=False))


def periodic_share(text: str) -> float:
    pairs = list(zip(text, text[1:], strict=False))
    return sum(PERIOD[(PERIOD.index(a) + 1) % len(PERIOD)] == b for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("remasking", [r for r in REMASKING if r != "remask"])
@pytest.mark.parametrize(("length", "block_length"), [(16, None), (50, None), (50, 5), (16, 3)])
def test_exact_model_gives_its_pattern_in_and_beyond_its_context(
    remasking: str, length: int, block_length: int | None
) -> None:
    # One commit per step: every committed character is drawn given all those before it, so the text is exact.
    vocab = PERIODIC_VOCAB
    canvas = torch.full((4, length), vocab.mask_id)
    fixed = torch.zeros(4, length, dtype=torch.bool)
    config = SamplingConfig(steps=length, remasking=remasking, block_length=block_length, top_p=0.9)
    out = generate(PeriodicOracle(), canvas, fixed, vocab.mask_id, 16, config, torch.Generator().manual_seed(1))
    texts = [vocab.decode(row) for row in out.tokens]
    assert all(is_periodic(t) for t in texts), texts
    assert len({t[:8] for t in texts}) > 1, "the phase is random: four samples should not all agree"
    assert out.forward_passes == length


def test_exact_model_continues_a_prompt_and_fills_a_template_across_windows() -> None:
    vocab = PERIODIC_VOCAB
    canvas, fixed = prompt_canvas(vocab.encode("cdef"), 40, vocab.mask_id)
    out = generate(
        PeriodicOracle(), canvas.expand(2, -1), fixed.expand(2, -1), vocab.mask_id, 16, SamplingConfig(steps=36),
        torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert [vocab.decode(row) for row in out.tokens] == ["cdefg abcdefg abcdefg abcdefg abcdefg ab"] * 2
    template = "abcdefg abc" + "_" * 3 + "g abcdefg abcdefg abcdefg abc" + "_" * 4 + " abcdefg"
    known = iter(vocab.encode(template.replace("_", "")))
    canvas, fixed = infill_canvas([None if ch == "_" else next(known) for ch in template], vocab.mask_id)
    out = generate(
        PeriodicOracle(), canvas.unsqueeze(0), fixed.unsqueeze(0), vocab.mask_id, 16, SamplingConfig(steps=7),
        torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert is_periodic(vocab.decode(out.tokens[0]))


@pytest.fixture(scope="module")
def overfit_model() -> Transformer:
    """A tiny Transformer trained for ~1 s to fill masks in 'abcdefg abcdefg ...' at any masking ratio."""
    vocab = PERIODIC_VOCAB
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab.size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(vocab.encode(PERIOD * 8))
    for _ in range(400):
        starts = torch.randint(0, len(PERIOD), (32, 1), generator=g)
        x = ids[starts + torch.arange(16)]  # (32, 16)
        ratio = torch.rand(32, 1, generator=g)
        selected = torch.rand(32, 16, generator=g) < ratio
        selected[:, 0] |= ~selected.any(dim=1)
        logits = model(x.masked_fill(selected, vocab.mask_id), positions=selected)
        loss = nn.functional.cross_entropy(logits, x[selected])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("length", [16, 64])
def test_overfit_model_mostly_reproduces_its_corpus(overfit_model: Transformer, length: int) -> None:
    vocab = PERIODIC_VOCAB
    canvas = torch.full((4, length), vocab.mask_id)
    fixed = torch.zeros(4, length, dtype=torch.bool)
    config = SamplingConfig(steps=length, remasking="low_confidence", temperature=0.5)
    out = generate(overfit_model, canvas, fixed, vocab.mask_id, 16, config, torch.Generator().manual_seed(1))
    texts = [vocab.decode(row) for row in out.tokens]
    # An untrained model gets about 1 transition in 8 right; the trained one nearly all.
    assert sum(periodic_share(t) for t in texts) / len(texts) > 0.9, texts
    assert (out.logprobs <= 0).all() and out.logprobs.mean() > -0.5


# --- per-sample generators: a sample does not depend on its batch ----------------------------------------------


def tiny_transformer(vocab_size: int = 9, block_size: int = 16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return Transformer(config).eval()


def sample_in_batches(
    model: Callable[[Tensor], Tensor],
    batch_size: int,
    config: SamplingConfig,
    n: int = 8,
    length: int = 40,
    seed: int = 11,
    remasking: Remasking | None = None,
) -> tuple[Tensor, Tensor]:
    """n samples from a 3-character prompt (block_size 16: several blocks and sliding windows), batch by batch."""
    mask_id = 8
    canvas, fixed = prompt_canvas([1, 2, 3], length, mask_id)
    tokens, nfe = [], []
    for first in range(0, n, batch_size):
        rows = min(batch_size, n - first)
        generator = RowGenerators.for_samples(seed, first, rows)
        out = generate(
            model, canvas.expand(rows, -1).clone(), fixed.expand(rows, -1), mask_id, 16, config, generator,
            remasking=remasking,
        )  # fmt: skip
        tokens.append(out.tokens)
        nfe.append(out.nfe)
    return torch.cat(tokens), torch.cat(nfe)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(steps=12, remasking="random"),
        SamplingConfig(steps=12, remasking="low_confidence", temperature=0.8, top_k=4),
        SamplingConfig(steps=9, remasking="margin", schedule="cosine", top_p=0.8),
        SamplingConfig(steps=12, remasking="entropy", block_length=5),
        SamplingConfig(steps=12, remasking="remask", randomness_strength=0.5),
        SamplingConfig(remasking="low_confidence", confidence_threshold=0.2),
        SamplingConfig(remasking="random", confidence_threshold=0.15, block_length=6),
    ],
    ids=lambda c: f"{c.remasking}-{c.confidence_threshold}",
)
def test_samples_do_not_depend_on_the_batch_size(config: SamplingConfig) -> None:
    model = tiny_transformer()
    one, nfe_one = sample_in_batches(model, 1, config)
    for batch_size in (3, 8):
        tokens, nfe = sample_in_batches(model, batch_size, config)
        assert torch.equal(tokens, one), batch_size
        assert torch.equal(nfe, nfe_one)
    assert len({tuple(row) for row in one.tolist()}) > 1, "eight samples should not all be the same"


def test_critic_samples_do_not_depend_on_the_batch_size() -> None:
    torch.manual_seed(1)
    critic = CriticRemask(Transformer(ModelConfig(9, 16, 1, 2, 16, head="token_binary")).eval(), 0.3)
    config = SamplingConfig(steps=10)
    one, _ = sample_in_batches(tiny_transformer(), 1, config, remasking=critic)
    five, _ = sample_in_batches(tiny_transformer(), 5, config, remasking=critic)
    assert torch.equal(one, five)


def test_sample_seeds_are_distinct_and_generators_independent() -> None:
    seeds = {sample_seed(s, i) for s in range(50) for i in range(200)}
    assert len(seeds) == 50 * 200 and all(0 <= x < 2**64 for x in seeds)
    a = RowGenerators.for_samples(3, 0, 4)
    b = RowGenerators.for_samples(3, 2, 2)  # samples 2 and 3 of the same run
    assert torch.equal(a.rand((5,))[2:], b.rand((5,)))
    c = RowGenerators.for_samples(3, 0, 4)
    c.rows(torch.tensor([1])).rand((7,))  # a row that draws moves only its own stream
    after = c.rand((5,))
    fresh = RowGenerators.for_samples(3, 0, 4).rand((5,))
    assert torch.equal(after[[0, 2, 3]], fresh[[0, 2, 3]]) and not torch.equal(after[1], fresh[1])
    with pytest.raises(ValueError, match="row generators"):
        generate(FixedLogits(), torch.full((3, 4), MASK), torch.zeros(3, 4, dtype=torch.bool), MASK, 8,
                 SamplingConfig(steps=2), RowGenerators.for_samples(0, 0, 2))  # fmt: skip


# --- confidence-threshold (parallel) decoding -------------------------------------------------------------------


class HalfSure(nn.Module):
    """Even positions: character p % 5 with probability ~1; odd positions: uniform over the 5 characters (0.2)."""

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, MASK + 1)
        pos = torch.arange(0, T, 2)
        logits[:, pos, pos % MASK] = 20.0
        logits[..., MASK] = 50.0  # banned: must not count as confidence
        return logits


def threshold_run(
    model: nn.Module, config: SamplingConfig, length: int = 12, batch: int = 2, seed: int = 0
) -> tuple[Tensor, list[StepEvent], Tensor, int]:
    canvas, fixed = torch.full((batch, length), MASK), torch.zeros(batch, length, dtype=torch.bool)
    events: list[StepEvent] = []
    hook = lambda e: events.append(dataclasses.replace(e, canvas=e.canvas.clone(), changed=e.changed.clone()))  # noqa: E731
    generator = RowGenerators.for_samples(seed, 0, batch)
    out = generate(model, canvas, fixed, MASK, 1 << 20, config, generator, hook)
    return out.tokens, events, out.nfe, out.forward_passes


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin"])
def test_threshold_above_one_commits_one_position_per_step_as_the_schedule_would(remasking: str) -> None:
    length = 12
    tokens, events, nfe, passes = threshold_run(
        FixedLogits(), SamplingConfig(remasking=remasking, confidence_threshold=1.0 + 1e-9, temperature=0.7)
    )
    assert all(e.changed.sum(dim=1).tolist() == [1, 1] for e in events)
    assert nfe.tolist() == [length, length] and passes == length == len(events)
    # The same draws as the schedule with one commit per step: identical samples.
    same, _, _, _ = threshold_run(FixedLogits(), SamplingConfig(steps=length, remasking=remasking, temperature=0.7))
    assert torch.equal(tokens, same)


def test_threshold_zero_commits_a_whole_block_per_step() -> None:
    tokens, events, nfe, passes = threshold_run(FixedLogits(), SamplingConfig(confidence_threshold=0.0))
    assert len(events) == 1 and events[0].changed.all() and nfe.tolist() == [1, 1] and passes == 1
    assert (tokens < MASK).all()
    _, events, nfe, passes = threshold_run(FixedLogits(), SamplingConfig(confidence_threshold=0.0, block_length=5))
    assert [e.block for e in events] == [0, 1, 2] and nfe.tolist() == [3, 3] and passes == 3
    assert [int(e.changed[0].sum()) for e in events] == [5, 5, 2]


@pytest.mark.parametrize(("block_length", "expected"), [(None, 1 + 6), (4, 3 * (1 + 2)), (3, 2 + 3 + 2 + 3)])
def test_threshold_nfe_is_counted_exactly(block_length: int | None, expected: int) -> None:
    # Step 1 of a block commits all its sure (even) positions; each later step one unsure (odd) one, the most
    # probable drawn character first, leftmost on ties.
    config = SamplingConfig(remasking="low_confidence", confidence_threshold=0.5, block_length=block_length)
    tokens, events, nfe, passes = threshold_run(HalfSure(), config)
    assert nfe.tolist() == [expected, expected] and passes == expected == len(events)
    assert events[-1].nfe is not None and events[-1].nfe.tolist() == [expected, expected]
    first = events[0].changed[0].nonzero().flatten().tolist()
    assert first == list(range(0, block_length or 12, 2))
    assert tokens[:, 0::2].tolist() == [[p % MASK for p in range(0, 12, 2)]] * 2 and (tokens < MASK).all()


def test_threshold_nfe_adapts_per_sample_and_is_refused_for_refill_strategies() -> None:
    model = tiny_transformer()
    tokens, nfe = sample_in_batches(model, 4, SamplingConfig(remasking="low_confidence", confidence_threshold=0.13))
    assert (nfe >= 3).all() and (nfe <= 37).all()  # 3 blocks of 16, 16, 5 masked positions (prompt of 3)
    assert len(set(nfe.tolist())) > 1, "the per-sample count should adapt"
    with pytest.raises(UserError, match="--confidence_threshold=0.5: not with --remasking=remask"):
        SamplingConfig(remasking="remask", confidence_threshold=0.5)  # refused before any work


# --- entropy-bounded (EB-sampler) decoding -----------------------------------------------------------------------


def test_entropy_budget_commits_a_prefix_of_the_strategys_order_within_the_budget() -> None:
    entropy = torch.tensor([[0.5, 0.2, 0.3, 0.4], [0.1, 0.7, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9]], dtype=torch.float64)
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    masked = torch.tensor([[True, True, True, True], [True, True, True, True], [False, False, False, False]])

    def commit(budget: float, masked: Tensor = masked) -> list[list[int]]:
        return entropy_budget_commit(entropy, score, masked, budget).int().tolist()

    # Budget 0: exactly one per row, the strategy's first; a row with nothing masked commits nothing.
    assert commit(0.0) == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    # Row 0 in order 1, 2, 3, 0 spends 0.2, 0.5, 0.9, 1.4 nats; row 1 in order 3, 2, 1, 0 spends 0.1, 0.2, 0.9, 1.0.
    assert commit(0.5) == [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    # Cumulative in order: row 1's position 0 (0.1 nats) would fit in 0.85 on its own but comes after position 1.
    assert commit(0.85) == [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert commit(0.9) == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    # A huge budget: every masked position at once; positions not masked are never committed.
    assert commit(1e9) == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    partial = torch.tensor([[True, False, True, True], [False, False, False, True], [False, True, False, False]])
    assert commit(1e9, partial) == partial.int().tolist()
    assert commit(0.0, partial) == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]]  # ties go to the leftmost
    # An entropy above the budget on the strategy's first position: still that one, so a block always finishes.
    assert commit(0.01, partial)[0] == [0, 0, 1, 0]


def test_entropy_budget_zero_is_one_commit_per_step_and_a_huge_one_a_block_per_step() -> None:
    length = 12
    for remasking in ("low_confidence", "random", "margin", "entropy"):
        config = SamplingConfig(remasking=remasking, entropy_budget=0.0, temperature=0.7)
        tokens, events, nfe, passes = threshold_run(FixedLogits(), config, length)
        assert all(e.changed.sum(dim=1).tolist() == [1, 1] for e in events)
        assert nfe.tolist() == [length, length] and passes == length == len(events)
        # The same draws as the schedule with one commit per step: identical samples.
        same, _, _, _ = threshold_run(FixedLogits(), SamplingConfig(steps=length, remasking=remasking, temperature=0.7))
        assert torch.equal(tokens, same), remasking
    tokens, events, nfe, passes = threshold_run(FixedLogits(), SamplingConfig(entropy_budget=1e9, block_length=5))
    assert [e.block for e in events] == [0, 1, 2] and nfe.tolist() == [3, 3] and passes == 3
    assert [int(e.changed[0].sum()) for e in events] == [5, 5, 2]
    whole, _, _, _ = threshold_run(FixedLogits(), SamplingConfig(confidence_threshold=0.0, block_length=5))
    assert torch.equal(tokens, whole)


def test_entropy_budget_counts_the_model_entropy_per_position() -> None:
    # HalfSure: even positions carry ~0 nats, odd ones ln 5 = 1.609; low_confidence takes the sure ones first.
    # Budget 2: step 1 commits the 6 sure positions and one unsure (6 x ~0 + 1.609 <= 2), each later step one.
    config = SamplingConfig(remasking="low_confidence", entropy_budget=2.0)
    tokens, events, nfe, passes = threshold_run(HalfSure(), config)
    assert [int(e.changed[0].sum()) for e in events] == [7, 1, 1, 1, 1, 1] and nfe.tolist() == [6, 6]
    # Budget 3.3 fits two unsure positions per step: 1 + 5 // 2 more steps.
    _, events, nfe, _ = threshold_run(HalfSure(), SamplingConfig(remasking="low_confidence", entropy_budget=3.3))
    assert [int(e.changed[0].sum()) for e in events] == [8, 2, 2] and nfe.tolist() == [3, 3]
    assert tokens[:, 0::2].tolist() == [[p % MASK for p in range(0, 12, 2)]] * 2 and (tokens < MASK).all()


def test_entropy_budget_nfe_falls_with_the_budget_on_a_random_model() -> None:
    model = tiny_transformer()
    masked, blocks = 40 - 3, 5  # after a prompt of 3, in blocks of 8 (block_size / 2 for a canvas over block_size)
    means = []
    for budget in (0.0, 4.5, 9.0, 1e9):  # a random model: about ln 8 = 2.08 nats per position
        one, nfe = sample_in_batches(model, 1, SamplingConfig(remasking="entropy", entropy_budget=budget))
        four, nfe_four = sample_in_batches(model, 4, SamplingConfig(remasking="entropy", entropy_budget=budget))
        assert torch.equal(one, four) and torch.equal(nfe, nfe_four)  # independent of the batch
        assert (nfe >= blocks).all() and (nfe <= masked).all()  # one pass per block at least, per position at most
        means.append(nfe.double().mean().item())
    assert means[0] == masked and means[-1] == blocks
    assert means[0] > means[1] > means[2] > means[3], means


def test_entropy_budget_is_refused_with_refill_strategies_a_threshold_and_bad_values() -> None:
    """Refused when the config is made, before any work, in one line naming the flag."""
    with pytest.raises(UserError, match="--entropy_budget=0.5: not with --remasking=remask"):
        SamplingConfig(remasking="remask", entropy_budget=0.5)
    with pytest.raises(UserError, match="one adaptive rule"):
        SamplingConfig(confidence_threshold=0.5, entropy_budget=0.5)
    for bad in (-0.1, math.nan):
        with pytest.raises(UserError, match="--entropy_budget="):
            SamplingConfig(entropy_budget=bad)


# --- autoregressive checkpoints: KV cache, sliding window ---------------------------------------------------------


def causal_transformer(block_size: int = 16) -> Transformer:
    torch.manual_seed(2)
    return Transformer(ModelConfig(vocab_size=9, block_size=block_size, n_layer=2, n_head=2, n_embd=16, causal=True))


def test_cached_logits_equal_uncached_ones() -> None:
    model = causal_transformer().eval()
    x = torch.randint(0, 8, (3, 16), generator=torch.Generator().manual_seed(0))
    cache = KVCache()
    with torch.inference_mode():
        steps = [model(x[:, :5], cache=cache, update_cache=True)[:, -1]]
        steps += [model(x[:, t : t + 1], cache=cache, update_cache=True)[:, -1] for t in range(5, 16)]
        full = model(x)  # (B, 16, V): causal, so position t sees exactly x[:, :t + 1]
    assert cache.length == 16
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5)


def context_starts(P: int, L: int, block_size: int) -> dict[int, int]:
    """Where the context of each generated position p starts: the cache grows by one character per step and, once
    it holds block_size characters, is recomputed from the last block_size // 2 (the new one included)."""
    start, starts = max(0, P - block_size), {}
    for p in range(P, L):
        starts[p] = start
        if p - start == block_size:
            start = p + 1 - block_size // 2
    return starts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_autoregressive_generation_matches_uncached_scoring_beyond_the_window(temperature: float) -> None:
    model, bs, L, P = causal_transformer().eval(), 16, 45, 3
    canvas, fixed = prompt_canvas([1, 2, 3], L, 8)
    B = 4
    out = generate_autoregressive(
        model, canvas.expand(B, -1).clone(), fixed.expand(B, -1), 8, bs, SamplingConfig(temperature=temperature),
        RowGenerators.for_samples(5, 0, B),
    )  # fmt: skip
    assert out.forward_passes == L - P and out.nfe.tolist() == [L - P] * B  # NFE = characters generated
    assert (out.tokens[:, :P] == torch.tensor([1, 2, 3])).all() and (out.tokens < 8).all()
    starts = context_starts(P, L, bs)
    assert min(p - a for p, a in starts.items() if p > bs) == bs // 2  # the window did shrink and regrow
    with torch.inference_mode():
        for p in range(P, L):
            a = starts[p]
            logits = model(out.tokens[:, a:p])[:, -1]  # (B, V) uncached
            logp = logits.double().masked_fill(torch.arange(9) >= 8, -math.inf).log_softmax(-1)
            expected = logp.gather(-1, out.tokens[:, p : p + 1]).squeeze(-1)
            assert torch.allclose(out.logprobs[:, p], expected, atol=1e-5), p
            if temperature == 0.0:
                assert torch.equal(out.tokens[:, p], logp.argmax(-1)), p


def test_autoregressive_samples_do_not_depend_on_the_batch_size_and_need_a_prefix() -> None:
    model = causal_transformer().eval()
    canvas, fixed = prompt_canvas([4], 30, 8)
    config = SamplingConfig(temperature=0.9, top_k=5, top_p=0.9)

    def batch(first: int, rows: int) -> Tensor:
        generator = RowGenerators.for_samples(1, first, rows)
        return generate_autoregressive(model, canvas.expand(rows, -1).clone(), fixed.expand(rows, -1), 8, 16, config,
                                       generator).tokens  # fmt: skip

    assert torch.equal(torch.cat([batch(i, 1) for i in range(6)]), torch.cat([batch(0, 4), batch(4, 2)]))
    with pytest.raises(ValueError, match="at least one fixed"):
        generate_autoregressive(model, torch.full((1, 5), 8), torch.zeros(1, 5, dtype=torch.bool), 8, 16, config,
                                torch.Generator())  # fmt: skip
    infill = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="prefix"):
        generate_autoregressive(model, torch.zeros(1, 3, dtype=torch.long), infill, 8, 16, config, torch.Generator())
