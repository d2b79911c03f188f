"""Tests for `unmask.likelihood.policy`: exact normalisation by brute force, sampling matches the likelihood, the
policies."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_flags
from unmask.generation.remasking import select_top
from unmask.likelihood.policy import (
    POLICIES,
    Predict,
    commit_candidates,
    model_predict,
    policy_log_likelihood,
    policy_sample,
    policy_scores,
    policy_steps,
)
from unmask.model import ModelConfig, Transformer

V = 3  # real characters; [MASK] = 3
MASK = V


def hand_predict(L: int, seed: int = 0) -> Predict:
    """A hand-made context-dependent predictor in float64: logits = W[i] + sum_j A[i, j, canvas_j]."""
    g = torch.Generator().manual_seed(seed)
    W = 2.0 * torch.randn(L, V, generator=g, dtype=torch.float64)  # (L, V)
    A = 1.5 * torch.randn(L, L, V + 1, V, generator=g, dtype=torch.float64)  # (i, j, id at j incl. [MASK], V)

    def predict(canvas: torch.Tensor) -> torch.Tensor:
        B = canvas.shape[0]
        j = torch.arange(L)
        contrib = A[:, j, canvas]  # (L, B, L, V): A[i, j, canvas[b, j]]
        logits = W[None] + contrib.sum(dim=2).permute(1, 0, 2)  # (B, L, V)
        assert logits.shape[0] == B
        return torch.log_softmax(logits, dim=-1)

    return predict


def tiny_model_predict(L: int, seed: int = 0) -> Predict:
    """A tiny bidirectional Transformer in float64 with weights large enough for peaked, varied predictions."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=V + 1, block_size=8, n_layer=1, n_head=2, n_embd=16)).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.0 if p.dim() > 1 else 0.3))
    return model_predict(model, MASK)


def all_sequences(L: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long)  # (V^L, L)


PREDICTORS = {"hand": hand_predict, "model": tiny_model_predict}


@pytest.mark.parametrize("kind", sorted(PREDICTORS))
@pytest.mark.parametrize("policy", POLICIES)
def test_likelihood_sums_to_one(kind: str, policy: str) -> None:
    for L in (4, 6):
        predict = PREDICTORS[kind](L, seed=L)
        x = all_sequences(L)
        for per_step in (1, 2, L):
            logp = policy_log_likelihood(predict, x, MASK, policy, per_step)  # (V^L,)
            assert logp.dtype == torch.float64 and bool((logp < 0).all())
            assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9), (L, per_step)
        # Blocks (a block-diffusion model's constraint) and a prompt keep it a distribution too.
        logp = policy_log_likelihood(predict, x, MASK, policy, 1, block_length=4)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
        given = torch.zeros_like(x, dtype=torch.bool)
        given[:, 1] = True
        prompted = x[x[:, 1] == 2]  # every completion of one prompt character
        logp = policy_log_likelihood(predict, prompted, MASK, policy, 2, given=given[: len(prompted)])
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("policy", POLICIES)
def test_block_diffusion_model_likelihood_sums_to_one(policy: str) -> None:
    """A block-causal Transformer (diffusion_block = 2) with the policy kept inside its blocks: still exact."""
    L = 6
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V + 1, block_size=8, n_layer=1, n_head=2, n_embd=16, diffusion_block=2)
    model = Transformer(config).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = all_sequences(L)
    for per_step in (1, 2):
        logp = policy_log_likelihood(model_predict(model, MASK), x, MASK, policy, per_step, block_length=2)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_policies_differ_and_are_not_the_uniform_order_model() -> None:
    """The exact likelihoods differ between policies (so each really reorders), and differ from per_step = L."""
    L = 5
    predict = hand_predict(L, seed=3)
    x = all_sequences(L)
    values = {p: policy_log_likelihood(predict, x, MASK, p, 1) for p in POLICIES}
    for a, b in itertools.combinations(POLICIES, 2):
        assert (values[a] - values[b]).abs().max() > 1e-3, (a, b)
    one_shot = policy_log_likelihood(predict, x, MASK, "entropy", L)
    assert (values["entropy"] - one_shot).abs().max() > 1e-3


def test_left_to_right_is_the_chain_rule_over_positions() -> None:
    L = 4
    predict = hand_predict(L, seed=1)
    x = all_sequences(L)[::7]  # (B, L)
    expected = torch.zeros(len(x), dtype=torch.float64)
    for i in range(L):
        canvas = x.clone()
        canvas[:, i:] = MASK  # positions >= i unknown
        expected += predict(canvas)[torch.arange(len(x)), i, x[:, i]]
    got = policy_log_likelihood(predict, x, MASK, "left_to_right", 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # All at once: the product of the all-[MASK] marginals.
    marginals = predict(torch.full_like(x, MASK))  # (B, L, V)
    one_shot = marginals.gather(2, x[:, :, None]).squeeze(2).sum(1)
    torch.testing.assert_close(policy_log_likelihood(predict, x, MASK, "margin", L), one_shot, rtol=0, atol=1e-12)


def test_forward_passes_per_window() -> None:
    calls = []
    base = hand_predict(6)

    def counting(canvas: torch.Tensor) -> torch.Tensor:
        calls.append(canvas.shape[0])
        return base(canvas)

    x = all_sequences(6)[:10]
    for per_step, block_length, passes in ((1, None, 6), (4, None, 2), (6, None, 1), (2, 4, 3), (3, 4, 3)):
        calls.clear()
        policy_log_likelihood(counting, x, MASK, "low_confidence", per_step, block_length)
        assert len(calls) == passes == policy_steps(6, per_step, block_length)
        assert calls[0] == 1 and max(calls) <= 10  # distinct canvases only: the all-[MASK] one once


def test_scores_and_choice_follow_the_definitions() -> None:
    probs = torch.tensor(
        [[[0.5, 0.3, 0.2], [0.6, 0.39, 0.01], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]]], dtype=torch.float64
    )  # (1, 4, 3)
    logp = probs.log()
    masked = torch.tensor([[True, True, True, False]])
    one = torch.tensor([1])
    pick = {p: select_top(policy_scores(p, logp), masked, one).nonzero()[:, 1].tolist() for p in POLICIES}
    # Position 3 (most confident of all) is already committed, so it is never chosen.
    assert pick == {"left_to_right": [0], "low_confidence": [1], "margin": [1], "entropy": [1]}
    probs2 = torch.tensor([[[0.45, 0.45, 0.1], [0.5, 0.25, 0.25]]], dtype=torch.float64)
    both = torch.ones(1, 2, dtype=torch.bool)
    assert select_top(policy_scores("low_confidence", probs2.log()), both, one).tolist() == [[False, True]]
    assert select_top(policy_scores("margin", probs2.log()), both, one).tolist() == [[False, True]]
    # entropy(0.45, 0.45, 0.1) = 0.949 nats < entropy(0.5, 0.25, 0.25) = 1.040: position 0 first.
    assert select_top(policy_scores("entropy", probs2.log()), both, one).tolist() == [[True, False]]
    # Ties go to the lowest positions; zero-probability characters do not make the entropy NaN.
    flat = torch.zeros(2, 5)
    cand = torch.tensor([[True, False, True, True, True], [False, True, True, True, True]])
    assert select_top(flat, cand, torch.tensor([2, 3])).tolist() == [
        [True, False, True, False, False],
        [False, True, True, True, False],
    ]
    sparse = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64).log()
    assert float(policy_scores("entropy", sparse)) == 0.0


def test_equal_predictions_make_every_policy_left_to_right() -> None:
    L = 5
    table = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).log()

    def constant(canvas: torch.Tensor) -> torch.Tensor:
        return table.expand(canvas.shape[0], canvas.shape[1], V)

    x = all_sequences(L)[::11]
    seen = []

    def recording(canvas: torch.Tensor) -> torch.Tensor:
        seen.append((canvas == MASK).sum(1).tolist())
        return constant(canvas)

    for policy in POLICIES:
        seen.clear()
        policy_log_likelihood(recording, x[:1], MASK, policy, 2)
        assert seen == [[5], [3], [1]]
    out = policy_sample(constant, 1, L, MASK, "entropy", 2, [torch.Generator().manual_seed(0)])
    assert out.step.tolist() == [[0, 0, 1, 1, 2]]


def test_blocks_commit_the_leftmost_block_first() -> None:
    masked = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    assert commit_candidates(masked, 3).tolist() == [
        [False, False, True, False, False, False, False],
        [True, True, True, False, False, False, False],
    ]
    out = policy_sample(
        hand_predict(6), 2, 6, MASK, "entropy", 2, [torch.Generator().manual_seed(s) for s in (0, 1)], 3
    )
    assert bool((out.step[:, :3].amax(dim=1) < out.step[:, 3:].amin(dim=1)).all())
    assert out.forward_passes == policy_steps(6, 2, 3) == 4


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expected below 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize(
    ("kind", "policy", "per_step"),
    [
        ("hand", "low_confidence", 1),
        ("hand", "margin", 2),
        ("hand", "entropy", 1),
        ("hand", "left_to_right", 4),
        ("model", "low_confidence", 2),
        ("model", "entropy", 1),
    ],
)
def test_samples_follow_the_exact_likelihood(kind: str, policy: str, per_step: int) -> None:
    L, N = 4, 20_000
    predict = PREDICTORS[kind](L, seed=7)
    x = all_sequences(L)  # (81, L)
    probs = policy_log_likelihood(predict, x, MASK, policy, per_step).exp()  # (81,)
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(N)]
    out = policy_sample(predict, N, L, MASK, policy, per_step, generators)
    assert out.forward_passes == policy_steps(L, per_step)
    code = (out.tokens * V ** torch.arange(L - 1, -1, -1)).sum(1)  # (N,): row index in all_sequences
    observed = torch.bincount(code, minlength=V**L).double()
    assert chi_square_p(observed, N * probs) > 0.001
    # What the sampler recorded is the exact likelihood of what it drew.
    torch.testing.assert_close(out.log_likelihood, probs.log()[code], rtol=0, atol=1e-10)


def test_the_chi_square_test_can_fail() -> None:
    """The same check rejects samples of a different policy (so the test above has power)."""
    L, N = 4, 20_000
    predict = hand_predict(L, seed=7)
    x = all_sequences(L)
    probs = policy_log_likelihood(predict, x, MASK, "low_confidence", 1).exp()
    out = policy_sample(predict, N, L, MASK, "left_to_right", 4, [torch.Generator().manual_seed(i) for i in range(N)])
    code = (out.tokens * V ** torch.arange(L - 1, -1, -1)).sum(1)
    assert chi_square_p(torch.bincount(code, minlength=V**L).double(), N * probs) < 1e-6


def test_sampling_is_per_sample_and_keeps_fixed_positions() -> None:
    L = 6
    predict = hand_predict(L, seed=2)
    fixed = torch.full((L,), MASK, dtype=torch.long)
    fixed[0], fixed[4] = 2, 1
    a = policy_sample(
        predict, 3, L, MASK, "margin", 2, [torch.Generator().manual_seed(s) for s in (5, 6, 7)], None, fixed
    )
    b = policy_sample(predict, 1, L, MASK, "margin", 2, [torch.Generator().manual_seed(6)], fixed=fixed)
    assert torch.equal(a.tokens[1:2], b.tokens)  # sample 1 does not depend on its batch neighbours
    assert bool((a.tokens[:, 0] == 2).all()) and bool((a.tokens[:, 4] == 1).all()) and bool((a.tokens < V).all())
    assert bool((a.step[:, [0, 4]] == -1).all()) and bool((a.logprobs[:, [0, 4]] == 0).all())
    given = fixed != MASK
    exact = policy_log_likelihood(predict, a.tokens, MASK, "margin", 2, given=given.expand(3, L))
    torch.testing.assert_close(a.log_likelihood, exact, rtol=0, atol=1e-12)


def test_argument_errors() -> None:
    predict = hand_predict(3)
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_log_likelihood(predict, x, MASK, "random", 1)
    with pytest.raises(ValueError, match="per_step must be >= 1"):
        policy_log_likelihood(predict, x, MASK, "margin", 0)
    with pytest.raises(ValueError, match="real character ids"):
        policy_log_likelihood(predict, torch.full((1, 3), MASK), MASK, "margin", 1)
    with pytest.raises(ValueError, match="one generator per sample"):
        policy_sample(predict, 2, 3, MASK, "margin", 1, [torch.Generator()])
    assert math.isclose(policy_steps(64, 4), 16) and policy_steps(64, 5) == 13 and policy_steps(10, 3, 4) == 5


# --- `unmask sample --policy` on a tiny trained checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def mdlm_ckpt(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unmask.cli import main

    out = tmp_path_factory.mktemp("policy_sample") / "mdlm"
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8, objective="mdlm")]) == 0
    return out / "ckpt_unmasking_8.pt"


def sample_json(capsys: pytest.CaptureFixture[str], ckpt: Path, *flags: str) -> dict:
    from unmask.cli import main

    capsys.readouterr()
    assert main(["sample", f"--ckpt={ckpt}", "--device=cpu", "--json", "--metrics=False", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_sample_policy_draws_what_eval_scores(mdlm_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unmask.storage.loading import load_trained

    doc = sample_json(capsys, mdlm_ckpt, "--policy=margin", "--per_step=4", "--num_samples=3", "--prompt=The ")
    assert doc["speed"]["forward_passes"] == math.ceil((32 - 4) / 4) and doc["settings"]["policy"] == "margin"
    texts = [s["text"] for s in doc["samples"]]
    assert all(t.startswith("The ") and len(t) == 32 for t in texts)
    trained = load_trained(mdlm_ckpt)
    vocab, mask_id = trained.vocab, trained.vocab.mask_id
    x = torch.tensor([vocab.encode(t, source="test") for t in texts])
    given = torch.zeros_like(x, dtype=torch.bool)
    given[:, :4] = True
    exact = policy_log_likelihood(model_predict(trained.model, mask_id), x, mask_id, "margin", 4, given=given)
    recorded = torch.tensor([s["mean_self_logprob"] * 28 for s in doc["samples"]], dtype=torch.float64)
    torch.testing.assert_close(recorded, exact, rtol=1e-5, atol=1e-4)
    # Sample i draws from its own generator (seed + i): the batch does not matter.
    alone = sample_json(capsys, mdlm_ckpt, "--policy=margin", "--per_step=4", "--num_samples=3", "--prompt=The ",
                        "--batch_size=1")  # fmt: skip
    assert [s["text"] for s in alone["samples"]] == texts


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--policy=entropy", "--temperature=0.5"], "--policy=entropy: not with --temperature"),
        (["--policy=entropy", "--remasking=low_confidence"], "--policy=entropy: not with --remasking"),
        (["--per_step=2"], "--per_step=2: goes with --policy"),
        (["--policy=entropy", "--per_step=0"], "--per_step=0: must be in [1, 1,000,000]"),
        (["--policy=random"], "--policy=random: expected one of"),
        (["--policy=margin", "--length=40"], "--length=40: --policy fills one window of at most"),
    ],
)
def test_sample_policy_errors(
    mdlm_ckpt: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from unmask.cli import main

    capsys.readouterr()
    assert main(["sample", f"--ckpt={mdlm_ckpt}", "--device=cpu", "--metrics=False", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_sample_policy_cli_subprocess(mdlm_ckpt: Path) -> None:
    cmd = [sys.executable, "-m", "unmask", "sample", f"--ckpt={mdlm_ckpt}", "--device=cpu", "--metrics=False"]
    done = subprocess.run([*cmd, "--policy=left_to_right", "--per_step=8", "--num_samples=2"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "=== sample 2 ===" in done.stdout and "4 forward passes" in done.stdout
    assert "policy left_to_right, 8 per step" in done.stdout and "steps" not in done.stdout.splitlines()[0]
    bad = subprocess.run([*cmd, "--policy=left_to_right", "--top_k=5"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not with --top_k" in bad.stderr


def test_sample_policy_refuses_an_autoregressive_checkpoint(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unmask.cli import main

    assert main(["train", *tiny_flags(tiny_data, tmp_path / "ar", max_iters=2, objective="autoregressive")]) == 0
    capsys.readouterr()
    assert main(["sample", f"--out_dir={tmp_path / 'ar'}", "--device=cpu", "--metrics=False", "--policy=margin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--policy: an autoregressive (causal) checkpoint" in err, err
