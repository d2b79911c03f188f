"""--self_conditioning: the flag, the model input, training (each objective, exact resume), sampling, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unmask
from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.generation.canvas import prompt_canvas
from unmask.generation.diffusion import SamplingConfig, generate
from unmask.generation.draws import RowGenerators
from unmask.likelihood.self_condition import SELF_CONDITION_RATE, draw_self_condition, first_pass_input
from unmask.model import ModelConfig, Transformer

OBJECTIVES = {
    "mdlm": ["--objective=mdlm"],
    "block_diffusion": ["--objective=block_diffusion", "--diffusion_block=4"],
    # a curriculum that does not scale with --max_iters (the default one does: 8 + 8 would not be 16)
    "unmasking": ["--objective=unmasking", "--unmasking_stages=[{'type': 'random', 'max_masked_ratio': 0.5}]"],
}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--objective=autoregressive"], "--objective=autoregressive"),
        (["--switch_to_binary=True"], "--switch_to_binary=True"),
    ],
)
def test_the_flag_is_refused_where_it_does_not_apply_in_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "run"), *flags, "--self_conditioning=True"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--self_conditioning=True" in err and named in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("ckpt_*"))


def test_a_fresh_self_conditioned_model_is_the_plain_model_whatever_its_input() -> None:
    """Same seed, same weights: the projection starts at zero, so no input changes a logit, and a plain model keeps
    exactly its parameters."""
    base = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**base)).eval()  # type: ignore[arg-type]
    torch.manual_seed(0)
    sc = Transformer(ModelConfig(**base, self_conditioning=True)).eval()  # type: ignore[arg-type]
    assert set(sc.state_dict()) - set(plain.state_dict()) == {"self_cond_proj.weight"}
    assert not any("self_cond" in k for k in plain.state_dict())
    x = torch.randint(0, 11, (3, 16))
    probs = torch.rand(3, 16, 11).softmax(-1)
    with torch.no_grad():
        assert torch.equal(plain(x), sc(x))
        assert torch.equal(plain(x), sc(x, self_cond=torch.zeros(3, 16, 11)))
        assert torch.equal(plain(x), sc(x, self_cond=probs))
        torch.nn.init.normal_(sc.self_cond_proj.weight)
        assert torch.equal(plain(x), sc(x, self_cond=torch.zeros(3, 16, 11)))  # zero input: exactly nothing added
        assert not torch.allclose(plain(x), sc(x, self_cond=probs))  # a trained projection uses the input
    with pytest.raises(ValueError, match="self_conditioning=True"):
        plain(x, self_cond=probs)
    with pytest.raises(ValueError, match="self_cond must be a float tensor of shape"):
        sc(x, self_cond=probs[:, :5])


def test_the_coin_comes_from_the_masking_stream_only_for_self_conditioned_training_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert not draw_self_condition(False, gen, True) and not draw_self_condition(True, gen, False)
    assert torch.equal(gen.get_state(), state)  # a plain run's (and an evaluation batch's) stream is untouched
    coins = [draw_self_condition(True, gen, True) for _ in range(2000)]
    assert abs(sum(coins) / len(coins) - SELF_CONDITION_RATE) < 0.05


def test_the_first_pass_input_is_the_detached_prediction_at_the_masked_positions() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=8, self_conditioning=True))
    x = torch.randint(0, 8, (2, 8))
    where = torch.rand(2, 8) < 0.5
    sc = first_pass_input(model, x.masked_fill(where, 8), where, 8)
    assert sc.shape == (2, 8, 9) and not sc.requires_grad
    assert torch.equal(sc[~where], torch.zeros_like(sc[~where]))
    assert torch.allclose(sc[where].sum(-1), torch.ones(int(where.sum()))) and (sc[..., 8] == 0).all()


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_trains_with_self_conditioning_and_resumes_exactly(
    tiny_data: Path, tmp_path: Path, objective: str
) -> None:
    flags = [*OBJECTIVES[objective], "--self_conditioning=True"]
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "a", max_iters=16), *flags]) == 0
    assert main(["train", *tiny_flags(tiny_data, tmp_path / "b", max_iters=8), *flags]) == 0
    # The flag is kept from the checkpoint: not given again on resume.
    assert main(["train", "--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=16"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt_unmasking_16.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt_unmasking_16.pt", weights_only=True)
    assert a["model_config"]["self_conditioning"] is True and a["config"]["self_conditioning"] is True
    assert set(a["model"]) == set(b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["model"]["self_cond_proj.weight"].abs().sum() > 0  # the self-conditioned passes trained it


def test_resuming_with_the_other_flag_value_is_refused_like_an_architecture_flag(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *tiny_flags(tiny_data, tmp_path, max_iters=4), "--objective=mdlm"]) == 0
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={tmp_path}", "--self_conditioning=True"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err and "architecture differs" in err and "self_conditioning: flag True vs checkpoint False" in err
    )


def sc_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=9, block_size=16, n_layer=2, n_head=2, n_embd=16, self_conditioning=True)
    model = Transformer(config).eval()
    torch.nn.init.normal_(model.self_cond_proj.weight, std=1.0)  # a trained-looking projection
    return model


class Counting(torch.nn.Module):
    """Counts model calls and records whether each one carried a self-condition input."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor | None] = []

    def forward(self, idx: torch.Tensor, **kwargs: object) -> torch.Tensor:
        sc = kwargs.get("self_cond")
        self.inputs.append(None if sc is None else sc.clone())  # type: ignore[union-attr]
        return self.model(idx, **kwargs)


@pytest.mark.parametrize("config", [SamplingConfig(steps=12), SamplingConfig(confidence_threshold=0.3)])
def test_sampling_feeds_the_previous_step_without_an_extra_forward_pass(config: SamplingConfig) -> None:
    canvas, fixed = prompt_canvas([1, 2, 3], 24, 8)
    runs = {}
    for sc in (False, True):
        model = Counting(sc_model())
        out = generate(
            model, canvas.expand(3, -1).clone(), fixed.expand(3, -1), 8, 16, config,
            RowGenerators.for_samples(1, 0, 3), self_conditioning=sc,
        )  # fmt: skip
        runs[sc] = (out, model.inputs)
    (plain, plain_inputs), (selfc, sc_inputs) = runs[False], runs[True]
    assert all(i is None for i in plain_inputs)
    if not config.adaptive:  # the same steps: the same model calls (an adaptive run's count follows the model)
        assert selfc.forward_passes == plain.forward_passes == len(sc_inputs) and torch.equal(selfc.nfe, plain.nfe)
    assert len(sc_inputs) == selfc.forward_passes
    assert sc_inputs[0] is None  # nothing before the first step
    later = [i for i in sc_inputs[1:] if i is not None]
    assert later and all(((i.sum(-1) - 1).abs() < 1e-5).logical_or(i.sum(-1) == 0).all() for i in later)
    assert not torch.equal(selfc.tokens, plain.tokens)  # the input changes what a trained projection samples


@pytest.fixture(scope="module")
def sc_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sc_run")
    assert (
        main(["train", *tiny_flags(tiny_data, out, max_iters=8), "--objective=mdlm", "--self_conditioning=True"]) == 0
    )
    return out


def test_eval_sample_export_and_load_of_a_self_conditioned_checkpoint(
    sc_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = sc_run / "ckpt_unmasking_8.pt"
    assert main(["eval", f"--ckpt={ckpt}", "--max_windows=4", "--draws=2"]) == 0
    assert main(["sample", f"--ckpt={ckpt}", "--num_samples=2", "--length=20", "--steps=8"]) == 0
    assert main(["export", f"--ckpt={ckpt}", f"--out={tmp_path / 'model'}"]) == 0
    from_ckpt, exported = unmask.load(ckpt), unmask.load(tmp_path / "model")
    assert exported.model_config.self_conditioning and from_ckpt.model_config.self_conditioning
    state, round_trip = from_ckpt.model.state_dict(), exported.model.state_dict()
    assert set(state) == set(round_trip) and all(torch.equal(state[k], round_trip[k]) for k in state)
    # The same samples and the same score from both (scoring: one pass with a zero input, a valid bound).
    assert exported.generate(length=20, steps=8, num_samples=2) == from_ckpt.generate(length=20, steps=8, num_samples=2)
    text = "the king and queen of rome"
    assert exported.score(text) == from_ckpt.score(text)
