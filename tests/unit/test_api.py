"""`unmask export` and the Python API (`unmask.load`): files, reload in a fresh process, generate, score."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unmask
from tests.conftest import REPO, tiny_flags
from unmask.cli import main
from unmask.errors import UserError
from unmask.likelihood import elbo
from unmask.storage.loading import load_trained


@pytest.fixture(scope="session")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api_run")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8)]) == 0
    return out


@pytest.fixture(scope="session")
def ar_run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api_ar_run")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8, objective="autoregressive")]) == 0
    return out


@pytest.fixture(scope="session")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny_model"
    assert main(["export", f"--ckpt={run_dir}", f"--out={out}"]) == 0
    return out


def newest(run_dir: Path) -> Path:
    return max(run_dir.glob("ckpt_unmasking_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def fixed_input(vocab_size: int) -> torch.Tensor:
    return torch.arange(2 * 32).remainder(vocab_size).view(2, 32)  # (2, 32)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"unmask {argv[0]}: error: "), err
    return err


# --- export ---------------------------------------------------------------------------------------------------


def test_export_writes_weights_config_and_card(exported: Path, run_dir: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    trained = load_trained(newest(run_dir))
    assert config["model_config"]["n_embd"] == 16 and config["model_config"]["block_size"] == 32
    assert config["vocab"] == list(trained.vocab.itos)
    assert config["special_tokens"] == {"[MASK]": trained.vocab.mask_id}
    assert config["objective"] == "unmasking"
    stages = config["objective_params"]["unmasking_stages"]
    assert [s["type"] for s in stages] == ["sticky", "sticky", "sticky", "random"]  # the default curriculum
    training = config["training"]
    assert training["iterations"] == 8 and training["source_checkpoint"] == "ckpt_unmasking_8.pt"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert training["val_bpc"] == pytest.approx(evals[-1]["val_bpc"])
    assert training["best_val_bpc"] == pytest.approx(min(r["val_bpc"] for r in evals))
    assert training["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert config["versions"] == {"unmask": unmask.__version__, "torch": torch.__version__}
    # The tied head is stored once, under the embedding's name.
    assert config["tied_weights"] == {"head.weight": "tok_emb.weight"}
    tensors = load_file(str(exported / "model.safetensors"))
    assert "head.weight" not in tensors and "tok_emb.weight" in tensors
    assert set(tensors) | {"head.weight"} == set(trained.model.state_dict())
    assert not any("optimizer" in k or "rng" in k for k in tensors)
    card = (exported / "README.md").read_text()
    assert "unmasking" in card and "| iterations | 8 |" in card and f"{trained.model.num_params():,}" in card


def test_export_reloads_in_a_fresh_process_with_identical_logits(exported: Path, run_dir: Path, tmp_path: Path) -> None:
    trained = load_trained(newest(run_dir))
    x = fixed_input(trained.vocab.size)
    with torch.no_grad():
        expected = trained.model(x)  # (2, 32, V)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, unmask\n"
        "m = unmask.load(sys.argv[1])\n"
        "assert m.model.head.weight is m.model.tok_emb.weight, 'tie lost'\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m.model(x), sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "logits.pt"
    done = subprocess.run(
        [sys.executable, "-c", code, str(exported), str(tmp_path / "x.pt"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = torch.load(out, weights_only=True)
    assert torch.equal(got, expected)


def test_export_refuses_a_non_empty_directory_unless_overwrite(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    assert main(["export", f"--ckpt={run_dir}", f"--out={out}"]) == 0  # an empty directory is fine
    capsys.readouterr()
    err = one_line_error(capsys, ["export", f"--ckpt={run_dir}", f"--out={out}"])
    assert f"--out={out}" in err and "--overwrite=True" in err
    (out / "stale.txt").write_text("from before")
    assert main(["export", f"--ckpt={run_dir / 'ckpt_unmasking_4.pt'}", f"--out={out}", "--overwrite=True"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["training"]["iterations"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directories left behind


def test_export_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--ckpt=PATH" in one_line_error(capsys, ["export", f"--out={tmp_path / 'a'}"])
    assert "--out=DIR" in one_line_error(capsys, ["export", f"--ckpt={run_dir}"])
    missing = tmp_path / "nothing"
    assert f"--ckpt={missing}" in one_line_error(capsys, ["export", f"--ckpt={missing}", f"--out={tmp_path / 'b'}"])
    (tmp_path / "file").write_text("x")
    assert "not a directory" in one_line_error(capsys, ["export", f"--ckpt={run_dir}", f"--out={tmp_path / 'file'}"])


# --- load -----------------------------------------------------------------------------------------------------


def test_load_accepts_export_checkpoint_and_run_directory_as_str_or_path(exported: Path, run_dir: Path) -> None:
    x = fixed_input(40)
    paths = [exported, str(exported), newest(run_dir), str(newest(run_dir)), run_dir, str(run_dir)]
    models = [unmask.load(p) for p in paths]
    with torch.no_grad():
        reference = models[0].model(x.remainder(models[0].vocab.size))
        for m in models:
            assert m.vocab == models[0].vocab and m.model_config == models[0].model_config
            assert not m.model.training
            assert torch.equal(m.model(x.remainder(m.vocab.size)), reference)
            assert m.config["training"]["iterations"] == 8 and m.objective == "unmasking"
    texts = {m.generate(prompt="The ", steps=8, seed=3) for m in models}
    assert len(texts) == 1


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such export directory"):
        unmask.load(tmp_path / "absent")
    with pytest.raises(UserError, match="no ckpt_unmasking_<iter>.pt"):
        unmask.load(tmp_path)


def test_import_unmask_stays_light() -> None:
    code = "import sys, unmask; print('torch' in sys.modules, callable(unmask.load))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr


# --- generate -------------------------------------------------------------------------------------------------


def test_generate_returns_str_or_list_and_keeps_the_prompt(exported: Path) -> None:
    m = unmask.load(exported)
    one = m.generate(prompt="The ", length=24, steps=8, seed=1)
    assert isinstance(one, str) and len(one) == 24 and one.startswith("The ")
    assert set(one) <= set(m.vocab.itos)  # no [MASK] left
    many = m.generate(prompt="The ", length=24, num_samples=3, steps=8, seed=1)
    assert isinstance(many, list) and len(many) == 3 and all(t.startswith("The ") for t in many)
    assert many == m.generate(prompt="The ", length=24, num_samples=3, steps=8, seed=1)  # seeded
    per_prompt = m.generate(prompt=["The ", "A fool "], num_samples=2, steps=8)
    assert len(per_prompt) == 4 and per_prompt[2].startswith("A fool ") and len(per_prompt[0]) == 32
    longer = m.generate(length=80, steps=16, temperature=0.0)  # past block_size: block by block
    assert isinstance(longer, str) and len(longer) == 80
    filled = m.generate(infill="The king ____ the queen", steps=4)
    assert isinstance(filled, str) and filled[:9] == "The king " and filled[13:] == " the queen"


def test_generate_matches_unmask_sample(exported: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--prompt=The ", "--steps=8", "--remasking=low_confidence", "--temperature=0.7", "--top_k=5"]
    assert main(["sample", f"--out_dir={run_dir}", *flags, "--num_samples=2", "--seed=5", "--json"]) == 0
    cli_texts = [s["text"] for s in json.loads(capsys.readouterr().out)["samples"]]
    m = unmask.load(exported)
    texts = m.generate(
        prompt="The ", num_samples=2, steps=8, remasking="low_confidence", temperature=0.7, top_k=5, seed=5
    )
    assert texts == cli_texts
    assert main(["sample", f"--out_dir={run_dir}", "--prompt=The ", "--entropy_budget=3", "--seed=5", "--json"]) == 0
    cli_texts = [s["text"] for s in json.loads(capsys.readouterr().out)["samples"]]
    assert m.generate(prompt="The ", num_samples=4, entropy_budget=3.0, seed=5) == cli_texts


def test_generate_option_errors_name_the_flag(exported: Path) -> None:
    m = unmask.load(exported)
    with pytest.raises(UserError, match=r"^--steps=0: must be in \[1, 1,000,000\]"):
        m.generate(steps=0)
    with pytest.raises(UserError, match=r"^stepz: unknown sampler option"):
        m.generate(stepz=3)
    with pytest.raises(UserError, match=r"^--remasking=nope"):
        m.generate(remasking="nope")
    with pytest.raises(UserError, match=r"^--prompt: 1 character\(s\) not in"):
        m.generate(prompt="The ~")
    with pytest.raises(UserError, match=r"^--prompt: 4 characters leave nothing"):
        m.generate(prompt="The ", length=4)
    with pytest.raises(UserError, match=r"^--entropy_budget=nan: must be in \[0, 1e\+09\]"):
        m.generate(entropy_budget=math.nan)
    with pytest.raises(UserError, match=r"^--entropy_budget=1.0: not with --confidence_threshold"):
        m.generate(entropy_budget=1.0, confidence_threshold=0.5)


def test_generate_autoregressive(ar_run_dir: Path, tmp_path: Path) -> None:
    assert main(["export", f"--ckpt={ar_run_dir}", f"--out={tmp_path / 'ar'}"]) == 0
    config = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert config["objective"] == "autoregressive" and config["model_config"]["causal"] is True
    assert config["objective_params"] == {"zero_masking": None}  # unset: the objective's default (full softmax)
    m = unmask.load(tmp_path / "ar")
    assert m.objective == "autoregressive" and m.model_config.causal
    text = m.generate(prompt="The ", length=50, temperature=0.8, seed=2)  # longer than block_size: a sliding window
    assert isinstance(text, str) and len(text) == 50 and text.startswith("The ")
    assert text == m.generate(prompt="The ", length=50, temperature=0.8, seed=2)
    free = m.generate(length=20, num_samples=2)
    assert len(free) == 2 and all(len(t) == 20 for t in free)
    with pytest.raises(UserError, match="remasking: not for an autoregressive model"):
        m.generate(remasking="random")
    with pytest.raises(UserError, match="entropy_budget: not for an autoregressive model"):
        m.generate(entropy_budget=1.0)
    with pytest.raises(UserError, match="^--infill: an autoregressive model"):
        m.generate(infill="The ___ king")


# --- score ----------------------------------------------------------------------------------------------------


def test_score_autoregressive_is_the_exact_nll(ar_run_dir: Path) -> None:
    m = unmask.load(ar_run_dir)
    text = "The king and the queen."
    ids = torch.tensor([m.vocab.encode(text)])  # (1, n)
    with torch.no_grad():
        logp = elbo.real_char_log_probs(m.model(ids[:, :-1]), m.vocab.mask_id)  # (1, n - 1, V)
    nats = -logp.gather(2, ids[:, 1:, None]).mean()
    assert m.score([text])[0] == pytest.approx(float(nats) / math.log(2), rel=1e-6)
    long = "The king and the queen of rome speak to their people in the hall."  # > block_size + 1
    assert len(long) > 33 and math.isfinite(m.score(long)[0])


def test_score_diffusion_is_the_elbo(exported: Path) -> None:
    m = unmask.load(exported)
    one = torch.tensor([m.vocab.encode("a")])
    # One character: every exact-k draw masks it, so the estimate is the exact NELBO.
    exact_1 = float(elbo.nelbo_exact(m.model, one, m.vocab.mask_id)[0]) / math.log(2)
    assert m.score(["a"], draws=3)[0] == pytest.approx(exact_1, rel=1e-6)  # float32 forward passes
    text = "The king"
    exact = float(elbo.nelbo_exact(m.model, torch.tensor([m.vocab.encode(text)]), m.vocab.mask_id)[0])
    exact_bpc = exact / len(text) / math.log(2)
    estimate = m.score([text], draws=512)[0]
    assert abs(estimate - exact_bpc) < 0.05 * exact_bpc  # unbiased; 512 stratified draws
    texts = ["The fool sings.", "The king and the queen of rome speak to their people in the hall."]
    scores = m.score(texts)
    assert m.score(texts[1:]) == scores[1:]  # a text's score does not depend on the others
    assert all(2.0 < s < 8.0 for s in scores)
    with pytest.raises(UserError, match=r"^texts\[0\]: 1 character"):
        m.score(["~"])


# --- docs -----------------------------------------------------------------------------------------------------


def test_sampling_docs_library_snippet_runs(run_dir: Path, tmp_path: Path) -> None:
    docs = (REPO / "docs" / "sampling.md").read_text()
    section = docs[docs.index("## Library") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    # The tiny corpus has no "ROMEO:" characters; the quickstart run directory is the test's run directory.
    code = snippet.group(1).replace("ROMEO:", "The ").replace('"out/quickstart"', repr(str(run_dir)))
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/sampling.md", "exec"), namespace)  # noqa: S102 - the repository's own docs
    texts = namespace["texts"]
    assert isinstance(texts, list) and len(texts) == 4 and all(t.startswith("The ") for t in texts)
