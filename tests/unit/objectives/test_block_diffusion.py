"""Tests for unmask.likelihood.block: the training-layout mask, the loss, and the block NELBO estimators."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from unmask.errors import UserError
from unmask.likelihood.block import (
    block_diffusion_attn_mask,
    block_diffusion_loss,
    block_diffusion_loss_from_masks,
    block_nelbo,
    block_nelbo_exact,
    sample_block_exact_k,
    sample_block_masks,
)
from unmask.likelihood.elbo import nelbo_exact, real_char_log_probs
from unmask.model import ModelConfig, Transformer

VOCAB = 6  # 5 characters + [MASK]
MASK_ID = VOCAB - 1


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    """A 1-layer model with sharpened weights, so predictions depend clearly on the context."""
    kwargs: dict[str, object] = dict(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**kwargs)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        model.tok_emb.weight.mul_(40.0)
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.mul_(10.0)
    return model


def clean_rows(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (B, L), generator=torch.Generator().manual_seed(seed))


def test_attn_mask_entry_by_entry() -> None:
    L, K = 5, 2  # blocks {0, 1}, {2, 3}, {4}
    mask = block_diffusion_attn_mask(L, K)
    assert mask.shape == (10, 10) and mask.dtype == torch.bool
    for i in range(2 * L):
        for j in range(2 * L):
            bi, bj = (i % L) // K, (j % L) // K
            if i < L and j < L:
                expected = bi == bj  # noisy -> its own noisy block
            elif i < L:
                expected = bj < bi  # noisy -> clean blocks before
            elif j >= L:
                expected = bj <= bi  # clean -> clean, block-causal
            else:
                expected = False  # clean never sees noisy
            assert bool(mask[i, j]) == expected, (i, j)
    with pytest.raises(ValueError, match="K=0"):
        block_diffusion_attn_mask(4, 0)


def test_sample_block_masks_one_rate_per_block_in_the_window() -> None:
    B, L, K = 6, 12, 4
    g = torch.Generator().manual_seed(0)
    selected, t = sample_block_masks(B, L, K, g, mask_rate_window=(0.3, 0.8))
    assert selected.shape == t.shape == (B, L)
    per_block = t.view(B, L // K, K)
    assert torch.equal(per_block, per_block[..., :1].expand_as(per_block))  # constant within a block
    assert (t > 0.3).all() and (t <= 0.8).all()
    # Stratified: the B * n_blocks rates fall one in each of the equal strata of (0.3, 0.8].
    rates = per_block[..., 0].flatten().sort().values
    n = rates.numel()
    strata = ((rates - 0.3) / 0.5 * n).ceil().long() - 1
    assert torch.equal(strata, torch.arange(n))
    # The masked fraction follows t: a big batch at a fixed rate.
    sel, _ = sample_block_masks(400, L, K, torch.Generator().manual_seed(1), mask_rate_window=(0.25, 0.25))
    assert sel.float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_the_mask_rate_window_flag_is_checked() -> None:
    from unmask.config.flags import parse_flags
    from unmask.config.train_config import TrainConfig

    def config(text: str) -> TrainConfig:
        flags = ["--objective=block_diffusion", "--diffusion_block=4", "--mdlm_estimator=antithetic_t"]
        flags.append(f"--mask_rate_window={text}")
        return TrainConfig(**parse_flags(TrainConfig, flags, max_positional=0)[1])

    assert config("0.3,0.8").mask_rate_window == (0.3, 0.8)
    for bad in ("0.8,0.3", "0,0", "0.2", "a,b", "-0.1,0.5", "0.5,1.5"):
        with pytest.raises(UserError, match="--mask_rate_window"):
            config(bad)


def _loop_over_blocks_loss(
    model: Transformer, clean: torch.Tensor, selected: torch.Tensor, t: torch.Tensor, K: int
) -> torch.Tensor:
    """The loss by one forward pass per block: [clean prefix ; noisy block] under the model's block-causal mask."""
    B, L = clean.shape
    noisy = clean.masked_fill(selected, MASK_ID)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, L, K):
        end = min(start + K, L)
        idx = torch.cat((clean[:, :start], noisy[:, start:end]), dim=1)  # (B, end)
        sel = torch.zeros_like(idx, dtype=torch.bool)
        sel[:, start:] = selected[:, start:end]
        if not sel.any():
            continue
        logp = real_char_log_probs(model(idx, positions=sel), MASK_ID)  # (N, V), row-major like the targets
        targets = clean[:, start:end][selected[:, start:end]]  # (N,)
        nll = -logp.gather(1, targets[:, None]).squeeze(1)  # (N,)
        total = total + (nll / t[:, start:end][selected[:, start:end]]).sum()
    return total / (B * L)


@pytest.mark.parametrize(("L", "K"), [(12, 4), (11, 4), (12, 1), (12, 12)])
def test_vectorised_loss_equals_a_loop_over_blocks(L: int, K: int) -> None:
    model = tiny_model(diffusion_block=K)
    clean = clean_rows(3, L)
    g = torch.Generator().manual_seed(3)
    selected, t = sample_block_masks(3, L, K, g)
    with torch.no_grad():
        vectorised = block_diffusion_loss_from_masks(model, clean, selected, t, MASK_ID, K)
        looped = _loop_over_blocks_loss(model, clean, selected, t, K)
        # block_diffusion_loss draws the same masks from the same generator state.
        again = block_diffusion_loss(model, clean, MASK_ID, K, torch.Generator().manual_seed(3))
    assert vectorised.item() > 0
    assert torch.allclose(vectorised, looped, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, vectorised)


def test_loss_gradient_flows_to_every_parameter() -> None:
    model = tiny_model(diffusion_block=4).train()
    clean = clean_rows(4, 12)
    loss = block_diffusion_loss(model, clean, MASK_ID, 4, torch.Generator().manual_seed(0), (0.2, 0.9))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_loss_expectation_is_the_block_nelbo_per_character() -> None:
    # Over (0, 1], E[loss] = block NELBO / L: average many draws of the training loss against the enumeration.
    model = tiny_model(diffusion_block=3)
    L, K = 6, 3
    clean = clean_rows(2, L)
    exact = block_nelbo_exact(model, clean, MASK_ID, K).mean().item() / L
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = torch.stack([block_diffusion_loss(model, clean, MASK_ID, K, g) for _ in range(3000)]).double()
    se = losses.std().item() / 3000**0.5
    assert abs(losses.mean().item() - exact) < 5 * se, (losses.mean().item(), exact, se)


def test_exact_k_training_loss_is_unbiased_varies_less_and_is_the_ar_loss_at_k1() -> None:
    model = tiny_model(diffusion_block=3)
    L, K = 6, 3
    clean = clean_rows(2, L)
    exact = block_nelbo_exact(model, clean, MASK_ID, K).mean().item() / L
    losses = {}
    for estimator in ("exact_k", "antithetic_t"):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            draws = [block_diffusion_loss(model, clean, MASK_ID, K, g, estimator=estimator) for _ in range(600)]
        losses[estimator] = torch.stack(draws).double()
    k_losses = losses["exact_k"]
    se = k_losses.std().item() / len(k_losses) ** 0.5
    assert abs(k_losses.mean().item() - exact) < 5 * se
    assert k_losses.std() < losses["antithetic_t"].std()
    selected, weight = sample_block_exact_k(4, 12, 3, torch.Generator().manual_seed(2))
    counts = selected.view(4, 4, 3).sum(dim=2)  # (rows, blocks)
    assert (counts >= 1).all() and torch.allclose(weight.view(4, 4, 3)[:, :, 0], 3 / counts.float())
    # K = 1: every position masked with weight 1, i.e. the teacher-forced NLL per character, without noise.
    ar = tiny_model(causal=True)
    clean = clean_rows(3, 8)
    with torch.no_grad():
        expected = block_nelbo_exact(ar, clean, MASK_ID, 1).mean().item() / 8
        once = block_diffusion_loss(ar, clean, MASK_ID, 1, torch.Generator().manual_seed(0), estimator="exact_k")
    assert once.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("estimator", ["exact_k", "stratified_t", "antithetic_t"])
@pytest.mark.parametrize(("L", "K"), [(6, 3), (7, 3)])
def test_block_nelbo_estimators_are_unbiased(estimator: str, L: int, K: int) -> None:
    model = tiny_model(diffusion_block=K)
    clean = clean_rows(2, L)
    exact = block_nelbo_exact(model, clean, MASK_ID, K)  # (2,)
    nats, se = block_nelbo(model, clean, MASK_ID, K, 600, torch.Generator().manual_seed(1), estimator)
    assert nats.shape == se.shape == (2,)
    assert (se > 0).all()
    assert ((nats - exact).abs() < 5 * se).all(), (nats, exact, se)


def test_block_nelbo_exact_k_is_exact_when_each_block_has_one_subset_per_size() -> None:
    # Blocks of 2: k = 1 has two subsets, k = 2 one. With draws = 2 the strata fix k = 1, 2, so only the k = 1
    # subset is random; averaging over the 2 x 2 possible k = 1 choices per block must give the exact value.
    model = tiny_model(diffusion_block=2)
    clean = clean_rows(1, 4)
    exact = block_nelbo_exact(model, clean, MASK_ID, 2)
    estimates = torch.stack(
        [block_nelbo(model, clean, MASK_ID, 2, 2, torch.Generator().manual_seed(s))[0] for s in range(400)]
    )
    values = estimates.unique()
    assert values.numel() == 4  # the four equally likely k = 1 subset combinations, all seen in 400 draws
    assert values.mean().item() == pytest.approx(exact.item(), abs=1e-6)


def test_block_length_one_is_the_teacher_forced_nll() -> None:
    # K = 1: position i is predicted from [MASK] at i and the clean prefix. Reference: L separate forward passes of
    # a causal model on clean[:i] + [MASK] (its own fused causal attention, no explicit mask or positions).
    model = tiny_model(causal=True)
    L = 8
    clean = clean_rows(3, L)
    expected = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(L):
            idx = torch.cat((clean[:, :i], torch.full((3, 1), MASK_ID)), dim=1)  # (3, i + 1)
            logp = real_char_log_probs(model(idx)[:, -1], MASK_ID)  # (3, V)
            expected -= logp.gather(1, clean[:, i : i + 1]).squeeze(1).double()
    assert torch.allclose(block_nelbo_exact(model, clean, MASK_ID, 1), expected, atol=1e-5)
    nats, se = block_nelbo(model, clean, MASK_ID, 1, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(nats, expected, atol=1e-5)  # k = 1 always: the estimator has no noise
    assert torch.allclose(se, torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_block_length_l_is_the_mdlm_bound() -> None:
    model = tiny_model()  # bidirectional: elbo.nelbo_exact masks the sequence in place
    L = 6
    clean = clean_rows(2, L)
    mdlm = nelbo_exact(model, clean, MASK_ID)
    assert torch.allclose(block_nelbo_exact(model, clean, MASK_ID, L), mdlm, atol=1e-5)
    # An intermediate block length is a different (here: larger or smaller, but not equal) bound.
    assert not torch.allclose(block_nelbo_exact(model, clean, MASK_ID, 3), mdlm, atol=1e-3)


def test_argument_errors() -> None:
    model = tiny_model(diffusion_block=4)
    with pytest.raises(ValueError, match="clean must be"):
        block_diffusion_loss(model, clean_rows(2, 8).float(), MASK_ID, 4, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown estimator"):
        block_nelbo(model, clean_rows(2, 8), MASK_ID, 4, 2, torch.Generator(), "bogus")


def test_tiny_model_learns_with_the_block_diffusion_loss() -> None:
    # Rows count up mod 5 from a random start: every masked character follows from the clean block before it,
    # or from its noisy neighbours, at known offsets. The loss must fall well below its starting value.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=32, diffusion_block=4))
    model.train()
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=1e-2)
    losses = []
    for _ in range(80):
        clean = (torch.randint(0, MASK_ID, (16, 1), generator=g) + torch.arange(16)) % MASK_ID  # (16, 16)
        loss = block_diffusion_loss(model, clean, MASK_ID, 4, g, (0.1, 1.0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.4 * sum(losses[:10]) / 10  # measured: 1.64 -> 0.41 nats per character


# --- the objective through the trainer and the CLI ------------------------------------------------------------


def test_block_diffusion_trains_resumes_and_samples_from_the_cli(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import run_records, tiny_flags
    from unmask.cli import main

    flags = [*tiny_flags(tiny_data, tmp_path / "bd", objective="block_diffusion", max_iters=8), "--diffusion_block=4"]
    window = ["--mask_rate_window=0.2,0.9", "--mdlm_estimator=antithetic_t"]  # the clipped t schedule
    assert main(["train", *flags, *window]) == 0
    evals = run_records(tmp_path / "bd", "eval")
    assert all(math.isfinite(r["val_bpc"]) and r["val_loss"] == r["val_nats_per_char"] for r in evals)
    ckpt = torch.load(tmp_path / "bd" / "ckpt_unmasking_8.pt", weights_only=True)
    assert ckpt["model_config"]["diffusion_block"] == 4 and ckpt["config"]["objective"] == "block_diffusion"
    assert ckpt["config"]["mask_rate_window"] == [0.2, 0.9]
    # Resume is bit for bit: 8 straight steps equal 4 + resume + 4.
    split = tmp_path / "split"
    split_flags = [*tiny_flags(tiny_data, split, objective="block_diffusion", max_iters=4), "--diffusion_block=4"]
    assert main(["train", *split_flags, *window]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={split}", "--max_iters=8"]) == 0
    resumed = torch.load(split / "ckpt_unmasking_8.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], resumed["model"][k]) for k in ckpt["model"])
    capsys.readouterr()
    assert main(["sample", f"--out_dir={tmp_path / 'bd'}", "--num_samples=2", "--length=40", "--metrics=False"]) == 0
    assert "block" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objective=block_diffusion"], "--diffusion_block=0: --objective=block_diffusion needs a block length"),
        (["--objective=block_diffusion", "--diffusion_block=5"], "that divides --block_size=32"),
        (["--diffusion_block=4"], "--diffusion_block=4: needs --objective=block_diffusion"),
        (["--objective=block_diffusion", "--diffusion_block=4", "--mask_rate_window=0.9,0.2"], "--mask_rate_window"),
        (["--objective=block_diffusion", "--diffusion_block=4", "--mask_rate_window=0.2,0.9"], "exact_k draws"),
    ],
)
def test_block_diffusion_flag_errors(
    flags: list[str], message: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import tiny_flags
    from unmask.cli import main

    assert main(["train", *tiny_flags(tiny_data, tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unmask_eval_scores_a_block_diffusion_checkpoint_by_its_block_elbo(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import unmask.likelihood.score as score
    from tests.conftest import tiny_flags
    from unmask.cli import main

    flags = [*tiny_flags(tiny_data, tmp_path, objective="block_diffusion", max_iters=4), "--diffusion_block=8"]
    assert main(["train", *flags]) == 0
    calls: list[int] = []
    real = score.block_nelbo

    def counted(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(int(args[3]))  # type: ignore[call-overload]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(score, "block_nelbo", counted)
    capsys.readouterr()
    assert main(["eval", f"--out_dir={tmp_path}", "--json", "--device=cpu", "--max_windows=8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "block_diffusion" and result["bound"] is True
    assert math.isfinite(result["bpc"]) and result["masked_ce"] is None
    assert calls and set(calls) == {8}
