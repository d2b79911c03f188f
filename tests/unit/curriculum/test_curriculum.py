"""The stage state machine and the training batch mix."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from unmask.curriculum.plateau import Curriculum, CurriculumState, split_evenly
from unmask.curriculum.stages import RandomStage, StickyStage

STAGES = (
    StickyStage(target_masked_ratio=0.2, p1_probability=0.3, p2_probability=0.0, val_loss_stale_count=2),
    StickyStage(target_masked_ratio=0.4, p1_probability=0.2, p2_probability=0.8, val_loss_stale_count=3),
    RandomStage(val_loss_stale_count=1, max_masked_ratio=0.5),
)


@given(st.integers(0, 500), st.integers(1, 20))
def test_split_evenly(n: int, k: int) -> None:
    parts = split_evenly(n, k)
    assert sum(parts) == n and len(parts) == k
    assert max(parts) - min(parts) <= 1 and parts == sorted(parts, reverse=True)


def test_advances_after_stale_count_and_resets() -> None:
    c = Curriculum(STAGES)
    assert "New best" in c.update(2.0)
    assert "stale count 1/2" in c.update(2.0)  # equal is not an improvement (strict <)
    line = c.update(2.5)
    assert "ADVANCING TO STAGE 1" in line
    assert c.state == CurriculumState(stage=1, stale_count=0, best_stage_val_loss=math.inf)
    assert "New best" in c.update(3.0)  # first eval of a new stage always improves
    c.update(2.9)
    for _ in range(3):
        c.update(5.0)
    assert c.state.stage == 2


def test_last_stage_keeps_training() -> None:
    c = Curriculum(STAGES, state=CurriculumState(stage=2, stale_count=0, best_stage_val_loss=1.0))
    for n in range(1, 4):
        line = c.update(1.5)
        assert c.state.stage == 2 and c.state.stale_count == n
    assert "final stage" in line


def test_improvement_resets_stale_count() -> None:
    c = Curriculum(STAGES)
    c.update(2.0)
    c.update(2.1)
    c.update(1.9)
    assert c.state.stale_count == 0 and c.state.best_stage_val_loss == 1.9


def test_training_mix_current_and_all_stages() -> None:
    c = Curriculum(STAGES)
    assert c.training_mix(8) == [8, 0, 0]
    c.state.stage = 1
    assert c.training_mix(7) == [4, 3, 0]
    c.state.stage = 2
    assert c.training_mix(8) == [3, 3, 2]
    assert Curriculum(STAGES, use_all_stages=True).training_mix(8) == [3, 3, 2]


def test_state_round_trip() -> None:
    s = CurriculumState(stage=1, stale_count=2, best_stage_val_loss=math.inf)
    assert CurriculumState.from_dict(s.to_dict()) == s


def test_selection_pool_hands_out_fresh_rows_and_flushes() -> None:
    import torch

    from unmask.curriculum.batches import SelectionPool

    gen = torch.Generator().manual_seed(0)
    pool = SelectionPool(STAGES, 16, gen, rows=8)
    a, b = pool.take(0, 5), pool.take(0, 3)
    assert a.shape == (5, 16) and b.shape == (3, 16)
    assert (a.sum(1) == 3).all() and (b.sum(1) == 3).all()  # round(0.2 * 16) masks per sticky row
    c = pool.take(0, 2)  # the block is used up: a new one is drawn
    assert pool.cursors[0] == 2
    assert len({tuple(r.tolist()) for r in torch.cat([a, b, c])}) > 5
    # Same generator state + flushed pool -> the same selections (what resume relies on).
    state = gen.get_state()
    pool.flush()
    first = pool.take(1, 4)
    gen.set_state(state)
    pool.flush()
    assert torch.equal(pool.take(1, 4), first)
