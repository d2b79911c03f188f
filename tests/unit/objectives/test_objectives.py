"""The training objectives end to end and val_bpc (`unmask compare`: tests/unit/commands/test_compare.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.objectives.autoregressive import autoregressive_loss
from unmask.training.validation import autoregressive_val


def _evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


@pytest.mark.parametrize("objective", ["unmasking", "mdlm", "autoregressive"])
def test_each_objective_trains_with_finite_decreasing_loss(tiny_data: Path, tmp_path: Path, objective: str) -> None:
    out = tmp_path / objective
    assert (
        main(["train", *tiny_flags(tiny_data, out, max_iters=12, learning_rate=1e-2), f"--objective={objective}"]) == 0
    )
    evals = _evals(out)
    for r in evals:
        assert math.isfinite(r["val_bpc"]) and math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    ckpt = torch.load(out / "ckpt_unmasking_12.pt", weights_only=True)
    assert ckpt["model_config"]["causal"] is (objective == "autoregressive")
    assert ckpt["config"]["objective"] == objective
    if objective == "autoregressive":
        # The same NLL without [MASK] in the softmax: a little lower than the training CE, never higher.
        assert 0.98 * evals[-1]["val_loss"] < evals[-1]["val_nats_per_char"] <= evals[-1]["val_loss"]
        assert "stage" not in evals[-1]
    else:
        # Diffusion objectives also report the masked CE per stage and per mask rate.
        assert {"val_stage_0_loss", "val_ce_mask_10", "val_ce_mask_90"} <= set(evals[-1])
        assert evals[-1]["val_ce_mask_10"] < evals[-1]["val_ce_mask_90"]
    # A model that has learned something beats the uniform code length log2(27 characters) by a margin.
    assert evals[-1]["val_bpc"] < math.log2(27)
    assert evals[-1]["epochs"] == pytest.approx(12 * 4 * 32 / 31340, rel=1e-6)


def test_autoregressive_loss_is_next_character_cross_entropy() -> None:
    torch.manual_seed(0)
    vocab, T = 7, 5
    windows = torch.randint(0, vocab, (3, T + 1))
    table = torch.randn(vocab, vocab)

    def bigram(idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return table[idx]  # (B, T, V): logits depend on the current character only

    direct = torch.stack(
        [-torch.log_softmax(table[windows[b, i]], -1)[windows[b, i + 1]] for b in range(3) for i in range(T)]
    ).mean()
    assert autoregressive_loss(bigram, windows) == pytest.approx(float(direct), rel=1e-6)  # type: ignore[arg-type]


def test_autoregressive_val_bpc_excludes_mask_like_unmask_eval() -> None:
    """The logged val_bpc is `elbo.ar_nll` (no [MASK] in the softmax); val_loss is the plain training CE."""
    from unmask.likelihood.elbo import ar_nll
    from unmask.model import ModelConfig, Transformer
    from unmask.runtime import init_runtime

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=8, block_size=6, n_layer=1, n_head=2, n_embd=8, causal=True)).eval()
    windows = torch.randint(0, 7, (5, 7))  # real ids 0..6, [MASK] = 7
    m = autoregressive_val(model, windows, 7, 2, init_runtime("cpu", "float32", "gloo"))
    with torch.no_grad():
        expected_nats = float(ar_nll(model, windows, 7).mean())
        plain_ce = float(autoregressive_loss(model, windows))
    assert m["val_nats_per_char"] == pytest.approx(expected_nats, rel=1e-6)
    assert m["val_bpc"] == pytest.approx(expected_nats / math.log(2), rel=1e-6)
    assert m["val_loss"] == pytest.approx(plain_ce, rel=1e-6)
    assert m["val_nats_per_char"] < m["val_loss"]  # renormalising over real characters can only lower the NLL


@pytest.mark.parametrize("objective", ["mdlm", "autoregressive"])
def test_resume_is_exact_for_every_objective(tiny_data: Path, tmp_path: Path, objective: str) -> None:
    flags = [f"--objective={objective}"]
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "a", max_iters=16), *flags]) == 0
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "b", max_iters=8), *flags]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=16"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt_unmasking_16.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt_unmasking_16.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


OBJECTIVE_FLAGS: dict[str, dict[str, object]] = {
    "unmasking": {"label_smoothing": 0.1},
    "mdlm": {"objective": "mdlm"},
    "mdlm_exact_k": {"objective": "mdlm", "mdlm_estimator": "exact_k"},
    "autoregressive": {"objective": "autoregressive"},
    "block_diffusion": {"objective": "block_diffusion", "diffusion_block": 4},
    "mdlm_self_conditioning": {"objective": "mdlm", "self_conditioning": True},
    "block_diffusion_self_conditioning": {
        "objective": "block_diffusion",
        "diffusion_block": 4,
        "self_conditioning": True,
    },
    "unmasking_self_conditioning": {"self_conditioning": True},
    "binary_replaced_token": {"switch_to_binary": True},
    "binary_sequence": {"switch_to_binary": True, "binary_task": "sequence"},
}


@pytest.mark.parametrize("case", sorted(OBJECTIVE_FLAGS))
def test_batch_draws_everything_and_loss_is_a_function_of_model_and_batch(
    case: str, tiny_data: Path, tmp_path: Path
) -> None:
    """`batch` takes every random draw of a micro-step; `loss` draws nothing, from no generator, so the same batch
    gives the same loss (and `batch` the same draws from the same generator states)."""
    from tests.conftest import shuffled_task
    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    flags = dict(OBJECTIVE_FLAGS[case])
    if flags.get("binary_task") == "sequence":
        flags["classification_data"] = shuffled_task(tmp_path / "texts.jsonl", 40)
    cfg = build_train_run(tiny_flags(tiny_data, tmp_path / "run", dropout=0.0, **flags)).cfg
    trainer = Trainer(cfg, init_runtime("cpu", "float32", "gloo"))
    objective, model = trainer.objective, trainer.raw_model
    for training in (True, False):
        data_gen, mask_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
        batch = objective.batch(data_gen, mask_gen, training)
        gens = (data_gen, mask_gen, trainer.data_gen, trainer.mask_gen)  # the run's own streams too
        states = (*(g.get_state() for g in gens), torch.get_rng_state())
        first = objective.loss(model, batch)
        second = objective.loss(model, batch)
        after = (*(g.get_state() for g in gens), torch.get_rng_state())
        assert all(torch.equal(a, b) for a, b in zip(states, after, strict=True))  # loss drew nothing
        assert first.dim() == 0 and torch.isfinite(first) and torch.equal(first, second)
        again = objective.batch(torch.Generator().manual_seed(3), torch.Generator().manual_seed(4), training)
        if not case.startswith("unmasking") or not training:  # (unmasking's training batches take pre-drawn selections)
            assert torch.equal(objective.loss(model, again), first)
    trainer.lock.release()


def test_an_objective_without_a_pretrained_start_refuses_pretrained_weights(tiny_data: Path, tmp_path: Path) -> None:
    """A new objective that does not override `prepare_model` is told, not silently trained from scratch."""
    from unmask.config.train_config import TrainConfig
    from unmask.errors import UserError
    from unmask.objectives.base import Objective, RunInputs
    from unmask.runtime import init_runtime

    cfg = TrainConfig(data_dir=str(tiny_data), dataset="tiny", out_dir=str(tmp_path), device="cpu")
    inputs = RunInputs(cfg, init_runtime("cpu", "float32", "gloo"), torch.Generator(), pretrained=object())  # type: ignore[arg-type]
    with pytest.raises(UserError, match="--pretrained_checkpoint_path: the unmasking objective cannot start from"):
        Objective(inputs).prepare_model(None)  # type: ignore[arg-type]
    assert Objective(RunInputs(cfg, inputs.runtime, torch.Generator())).prepare_model(None) == []  # type: ignore[arg-type]
