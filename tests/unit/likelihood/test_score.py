"""The one likelihood path (`unmask.likelihood.score`): exact causal scoring, window bookkeeping, and agreement of
the training log, `unmask eval` and `Model.score` for every objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from unmask.likelihood import score
from unmask.likelihood.score import Scorer, model_kind, scorer_for


class Bigram(nn.Module):
    """A causal 'model' whose prediction at position i depends on x_i only: windows cannot change its NLL."""

    def __init__(self, V: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx: Tensor) -> Tensor:
        return self.table[idx]  # (B, T, V)


def test_causal_text_nats_is_exact_without_the_mask_logit_and_windowing_does_not_change_it() -> None:
    V, L, mask_id = 6, 37, 5
    model = Bigram(V)
    x = torch.randint(0, V - 1, (3, L), generator=torch.Generator().manual_seed(1))
    table = model.table.detach().double().clone()
    table[:, mask_id] = -math.inf  # [MASK] is never a target: its logit is dropped
    per_position = -torch.log_softmax(table, dim=-1)[x[:, :-1], x[:, 1:]]  # (B, L - 1): positions 1..L-1
    for block_size in (L, 8, 5, 2, 1):
        got = Scorer("autoregressive", mask_id, block_size).text_nats(model, x, torch.Generator())
        assert torch.allclose(got, per_position.mean(dim=1)), block_size
    scored = torch.ones(3, L, dtype=torch.bool)
    scored[:, :10] = False  # a prompt: only the generated positions count
    got = Scorer("autoregressive", mask_id, 8).text_nats(model, x, torch.Generator(), scored)
    assert torch.allclose(got, per_position[:, 9:].mean(dim=1))


def test_diffusion_text_nats_sums_window_bounds_over_the_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake(model: nn.Module, x: Tensor, *args: object) -> tuple[Tensor, Tensor]:
        calls.append(x.shape[1])
        return x.double().sum(dim=1), torch.zeros(x.shape[0], dtype=torch.float64)  # "nats" = sum of ids

    monkeypatch.setattr(score, "nelbo_estimate", fake)
    x = torch.tensor([[1] * 8 + [4] * 2, [2] * 10])
    got = Scorer("diffusion", 9, 8).text_nats(nn.Identity(), x, torch.Generator())
    assert calls == [8, 2]
    assert torch.allclose(got, torch.tensor([(8 * 1 + 2 * 4) / 10, 2.0], dtype=torch.float64))


def test_the_kind_comes_from_the_architecture() -> None:
    assert model_kind(True, 0) == "autoregressive"
    assert model_kind(False, 0) == "diffusion"
    assert model_kind(False, 4) == "block_diffusion"
    s = scorer_for(False, 4, 9, 16, draws=3)
    assert (s.kind, s.block_length, s.draws, s.context, s.exact) == ("block_diffusion", 4, 3, 0, False)
    assert scorer_for(True, 0, 9, 16, draws=3).context == 1
    with pytest.raises(ValueError, match="block_length"):
        Scorer("block_diffusion", 9, 16)
    with pytest.raises(ValueError, match="estimator"):
        Scorer("diffusion", 9, 16, estimator="nope")


# --- agreement of every caller, per objective ------------------------------------------------------------------------

OBJECTIVES = {
    "autoregressive": [],
    "mdlm": [],
    "unmasking": [],
    "block_diffusion": ["--diffusion_block=8"],
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_log_eval_and_score_agree(
    objective: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The logged val_bpc equals `unmask eval --windows=validation_set`, and `Model.score` of the split's text equals
    `unmask eval` on it, within Monte-Carlo error (exactly for the autoregressive model's exact NLL)."""
    import json

    import unmask
    from tests.conftest import run_records, tiny_flags
    from unmask.cli import main
    from unmask.data.dataset import load_dataset

    draws = 8
    flags = [*tiny_flags(tiny_data, tmp_path, objective=objective, max_iters=8, elbo_draws=draws)]
    assert main(["train", *flags, *OBJECTIVES[objective]]) == 0
    logged = run_records(tmp_path, "eval")[-1]["val_bpc"]

    def evaluate(*extra: str) -> dict:
        capsys.readouterr()
        assert main(["eval", f"--out_dir={tmp_path}", "--json", "--device=cpu", f"--draws={draws}", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    fixed = evaluate("--windows=validation_set")
    split = evaluate("--batch_size=256")
    model = unmask.load(tmp_path)
    block = model.model_config.block_size
    context = int(model.model_config.causal)
    val = load_dataset(tiny_data / "tiny").val
    text = model.vocab.decode(val[: split["windows"] * block + context].tolist())
    scored = model.score(text, draws=draws, seed=3)[0]
    if objective == "autoregressive":
        assert fixed["bpc"] == pytest.approx(logged, rel=1e-6)
        assert scored == pytest.approx(split["bpc"], rel=1e-6)
        return
    # Two independent estimates of one bound: their difference has about sqrt(2) x each one's MC error.
    assert abs(fixed["bpc"] - logged) < 5 * math.sqrt(2) * fixed["bpc_mc_stderr"] + 1e-9
    assert abs(scored - split["bpc"]) < 5 * math.sqrt(2) * split["bpc_mc_stderr"] + 1e-9
