"""`unmask sample` end to end on a tiny trained checkpoint: output, conditioning, metrics, sweep, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, tiny_flags
from unmask.cli import main
from unmask.commands.sample import SampleArgs
from unmask.data.dataset import MASK_GLYPH, load_dataset
from unmask.generation.engine import DEFAULT_SAMPLERS, DEFAULT_STEPS, GUIDE_STEPS, default_steps
from unmask.model import ModelConfig, Transformer
from unmask.storage.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """out_dir of a tiny unmasking run (block_size 32) on the `tiny` dataset."""
    out = tmp_path_factory.mktemp("sample_run")
    assert main(["train", *tiny_flags(tiny_data, out)]) == 0
    return out


@pytest.fixture(scope="session")
def causal_ckpt(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (random) autoregressive checkpoint over the same vocabulary, written in the checkpoint format."""
    vocab = load_dataset(tiny_data / "tiny").vocab
    config = ModelConfig(vocab_size=vocab.size, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("causal") / "ckpt_unmasking_0.pt"
    state = {
        "format_version": 1,
        "model": Transformer(config).state_dict(),
        "model_config": dataclasses.asdict(config),
        "vocab": list(vocab.itos),
        "config": {},
        "iter_num": 0,
    }
    torch.save(state, path)
    return path


def sample(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main(["sample", *flags, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def error(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    assert main(["sample", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unmask sample: error: "), err
    return err


def test_unconditional_json_has_texts_settings_metrics_and_reference(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = sample(capsys, f"--out_dir={run_dir}", "--num_samples=3", "--length=24", "--steps=6")
    assert doc["checkpoint"].endswith("ckpt_unmasking_16.pt")
    assert [len(s["text"]) for s in doc["samples"]] == [24, 24, 24]
    assert not any(MASK_GLYPH in s["text"] for s in doc["samples"])
    assert doc["settings"]["steps"] == 6 and doc["settings"]["remasking"] == "random"
    samples, reference = doc["metrics"]["samples"], doc["metrics"]["reference"]
    for key in ("repeated_4gram_rate", "distinct_2", "distinct_starts", "char_entropy_bits", "word_hit_rate"):
        assert 0.0 <= samples[key] <= 5.0 and key in reference
    assert samples["mean_self_logprob"] < 0
    assert reference["word_hit_rate"] > 0.5  # real text of the same corpus (words cut at the edges miss)
    assert doc["metrics"]["train_char_entropy_bits"] > 3
    assert doc["speed"]["forward_passes"] == 6 and doc["speed"]["chars_per_second"] > 0


def test_same_seed_same_text_and_batches_cover_all_samples(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = (f"--out_dir={run_dir}", "--num_samples=5", "--batch_size=2", "--length=20", "--steps=4", "--metrics=False")
    a, b = sample(capsys, *flags), sample(capsys, *flags)
    c = sample(capsys, *flags, "--seed=99")
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
    assert [s["text"] for s in a["samples"]] != [s["text"] for s in c["samples"]]
    assert len(a["samples"]) == 5 and a["speed"]["forward_passes"] == 3 * 4  # 3 batches
    assert a["metrics"] is None


@pytest.mark.parametrize("remasking", ["random", "low_confidence", "remask"])
def test_a_sample_does_not_depend_on_the_batch_size(
    run_dir: Path, capsys: pytest.CaptureFixture[str], remasking: str
) -> None:
    flags = (f"--out_dir={run_dir}", "--num_samples=8", "--length=40", "--steps=8", "--metrics=False", "--prompt=The")
    texts = [
        [s["text"] for s in sample(capsys, *flags, f"--remasking={remasking}", f"--batch_size={b}")["samples"]]
        for b in (1, 3, 8)
    ]
    assert texts[0] == texts[1] == texts[2] and len(set(texts[0])) > 1


def test_confidence_threshold_reports_nfe_per_sample(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = (f"--out_dir={run_dir}", "--num_samples=3", "--length=20", "--prompt=The", "--metrics=False")
    doc = sample(capsys, *flags, "--confidence_threshold=0")
    assert [s["nfe"] for s in doc["samples"]] == [1, 1, 1] and doc["speed"]["mean_nfe"] == 1.0
    assert doc["settings"]["confidence_threshold"] == 0.0
    doc = sample(capsys, *flags, "--confidence_threshold=1.5", "--remasking=low_confidence")
    assert [s["nfe"] for s in doc["samples"]] == [17, 17, 17] and doc["speed"]["forward_passes"] == 17
    doc = sample(capsys, *flags, "--confidence_threshold=0.2", "--length=80", "--block_length=16")
    nfe = [s["nfe"] for s in doc["samples"]]
    assert all(5 <= n <= 77 for n in nfe) and doc["speed"]["mean_nfe"] == pytest.approx(sum(nfe) / 3)
    assert all(len(s["text"]) == 80 and MASK_GLYPH not in s["text"] for s in doc["samples"])
    assert main(["sample", *flags, "--confidence_threshold=0.5"]) == 0
    out = capsys.readouterr().out
    assert "confidence threshold 0.5 (adaptive steps)" in out and "NFE per sample: mean " in out


def test_entropy_budget_reports_adaptive_nfe_that_falls_with_the_budget(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = (f"--out_dir={run_dir}", "--num_samples=3", "--length=20", "--prompt=The", "--metrics=False")
    doc = sample(capsys, *flags, "--entropy_budget=0", "--remasking=low_confidence")
    assert [s["nfe"] for s in doc["samples"]] == [17, 17, 17] and doc["speed"]["forward_passes"] == 17
    assert doc["settings"]["entropy_budget"] == 0.0 and doc["settings"]["confidence_threshold"] is None
    doc = sample(capsys, *flags, "--entropy_budget=1e9")
    assert [s["nfe"] for s in doc["samples"]] == [1, 1, 1]  # the whole canvas (one block) in one step
    means = []
    for budget in ("0", "8", "20", "1e9"):
        doc = sample(capsys, *flags, f"--entropy_budget={budget}", "--length=80", "--block_length=16")
        nfe = [s["nfe"] for s in doc["samples"]]
        assert all(5 <= n <= 77 for n in nfe) and doc["speed"]["mean_nfe"] == pytest.approx(sum(nfe) / 3)
        assert all(len(s["text"]) == 80 and MASK_GLYPH not in s["text"] for s in doc["samples"])
        means.append(doc["speed"]["mean_nfe"])
    assert means[0] == 77 and means[-1] == 5 and means[0] > means[1] > means[2] > means[3], means
    assert main(["sample", *flags, "--entropy_budget=0.5"]) == 0
    out = capsys.readouterr().out
    assert "entropy budget 0.5 nats per step (adaptive steps)" in out and "NFE per sample: mean " in out


@pytest.fixture(scope="session")
def ar_run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """out_dir of a tiny autoregressive run (block_size 32) on the `tiny` dataset."""
    out = tmp_path_factory.mktemp("sample_ar_run")
    assert main(["train", *tiny_flags(tiny_data, out, objective="autoregressive")]) == 0
    return out


def test_autoregressive_checkpoint_samples_beyond_its_context(
    ar_run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = (f"--out_dir={ar_run_dir}", "--prompt=The", "--length=80", "--num_samples=3", "--batch_size=2")
    doc = sample(capsys, *flags, "--temperature=0.8", "--top_k=10", "--top_p=0.95")
    assert doc["kind"] == "autoregressive"
    assert all(len(s["text"]) == 80 and s["text"].startswith("The") for s in doc["samples"])
    assert all(MASK_GLYPH not in s["text"] and s["nfe"] == 77 for s in doc["samples"])  # one pass per character
    assert doc["speed"]["forward_passes"] == 2 * 77 and doc["metrics"]["samples"]["mean_self_logprob"] < 0
    again = sample(capsys, *flags, "--temperature=0.8", "--top_k=10", "--top_p=0.95", "--batch_size=1")
    assert [s["text"] for s in again["samples"]] == [s["text"] for s in doc["samples"]]
    doc = sample(capsys, f"--out_dir={ar_run_dir}", "--length=20", "--num_samples=2", "--metrics=False")
    assert all(s["text"].startswith("\n") and len(s["generated"]) == 19 for s in doc["samples"])
    assert any("newline" in note for note in doc["notes"])
    assert main(["sample", f"--out_dir={ar_run_dir}", "--length=40", "--num_samples=1", "--prompt=The"]) == 0
    assert "autoregressive: one character per forward pass, KV cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--infill=The ___ king", "--infill: "),
        ("--sweep_steps=4,8", "--sweep_steps=4,8: "),
        ("--confidence_threshold=0.5", "--confidence_threshold=0.5: "),
        ("--entropy_budget=0.5", "--entropy_budget=0.5: "),
        ("--block_length=8", "--block_length=8: "),
    ],
)
def test_autoregressive_refusals(ar_run_dir: Path, capsys: pytest.CaptureFixture[str], flag: str, message: str) -> None:
    err = error(capsys, f"--out_dir={ar_run_dir}", flag)
    assert message in err and "is an autoregressive checkpoint" in err


@pytest.fixture(scope="session")
def bd_ckpt(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (random) block-diffusion checkpoint, blocks of 8, block_size 32, as the trainer will record it."""
    vocab = load_dataset(tiny_data / "tiny").vocab
    config = ModelConfig(vocab_size=vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=16, diffusion_block=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("block_diffusion") / "ckpt_unmasking_0.pt"
    state = {
        "format_version": 1,
        "model": Transformer(config).state_dict(),
        "model_config": dataclasses.asdict(config),
        "vocab": list(vocab.itos),
        "config": {"objective": "block_diffusion", "data_dir": str(tiny_data), "dataset": "tiny"},
        "iter_num": 0,
    }
    torch.save(state, path)
    return path


def test_block_diffusion_checkpoint_samples_block_by_block(bd_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = (f"--ckpt={bd_ckpt}", "--prompt=The king", "--length=70", "--num_samples=3", "--remasking=low_confidence")
    doc = sample(capsys, *flags, "--steps=16")
    assert doc["kind"] == "block_diffusion"
    assert all(len(s["text"]) == 70 and s["text"].startswith("The king") for s in doc["samples"])
    assert all(MASK_GLYPH not in s["text"] and s["nfe"] == 16 for s in doc["samples"])
    # The finished blocks enter the cache inside the next block's first denoising pass: no pass of their own.
    assert doc["speed"]["forward_passes"] == 16
    one = sample(capsys, *flags, "--steps=16", "--batch_size=1")
    assert [s["text"] for s in one["samples"]] == [s["text"] for s in doc["samples"]]
    fast = sample(capsys, *flags, "--confidence_threshold=0")
    assert [s["nfe"] for s in fast["samples"]] == [8, 8, 8]  # one step per block
    budgets = [sample(capsys, *flags, f"--entropy_budget={g}")["samples"] for g in (0, 8, 1e9)]
    assert [s["nfe"] for s in budgets[0]] == [62] * 3 and [s["nfe"] for s in budgets[2]] == [8] * 3
    assert all(8 < s["nfe"] < 62 for s in budgets[1]), budgets[1]  # 62 positions in 8 blocks
    template = "The __ k" + "_" * 10  # fixed text after a hole only inside its block of 8; then a free suffix
    doc = sample(capsys, f"--ckpt={bd_ckpt}", f"--infill={template}", "--steps=6", "--metrics=False")
    assert all(s["text"][:4] == "The " and s["text"][6:8] == " k" and len(s["text"]) == 18 for s in doc["samples"])
    assert main(["sample", f"--ckpt={bd_ckpt}", "--length=24", "--num_samples=1", "--steps=3"]) == 0
    assert "block diffusion: blocks of 8 left to right, KV cache" in capsys.readouterr().out


@pytest.fixture(scope="session")
def random_ckpts(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Randomly initialised checkpoints of each kind (block_size 32), written by the trainer's checkpoint writer:
    block diffusion with K = 4, mdlm and autoregressive."""
    vocab = load_dataset(tiny_data / "tiny").vocab
    kinds = {
        "block_diffusion": ({"diffusion_block": 4}, {"objective": "block_diffusion"}),
        "mdlm": ({}, {"objective": "mdlm"}),
        "autoregressive": ({"causal": True}, {"objective": "autoregressive"}),
    }
    paths = {}
    for kind, (model, config) in kinds.items():
        mc = ModelConfig(vocab_size=vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=16, **model)
        torch.manual_seed(0)
        state = {
            "model": Transformer(mc).state_dict(),
            "model_config": dataclasses.asdict(mc),
            "vocab": list(vocab.itos),
            "config": {**config, "data_dir": str(tiny_data), "dataset": "tiny"},
            "iter_num": 0,
        }
        paths[kind] = save_checkpoint(tmp_path_factory.mktemp(kind), 0, state, {"iter_num": 0})
    return paths


@pytest.mark.parametrize("kind", ["block_diffusion", "mdlm", "autoregressive"])
@pytest.mark.parametrize("length", [8, 32, 100, 1100])
def test_steps_unset_works_for_every_checkpoint_kind_and_length(
    random_ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str, length: int
) -> None:
    """Without --steps a run never fails for too few steps: 64 up to block_size characters, as many per character
    beyond (here block_size 32: more than one per character, so one per character), at least one per block.
    Before, K = 4 at 512 characters needed 128 blocks > 64 steps, and mdlm at 1100 needed 69 blocks of 16."""
    flags = (f"--ckpt={random_ckpts[kind]}", f"--length={length}", "--num_samples=1", "--metrics=False")
    # --remasking chooses the sampler (else the kind's adaptive default applies), so the steps rule is what runs
    doc = sample(capsys, *flags, *(() if kind == "autoregressive" else ("--remasking=random",)))
    text = doc["samples"][0]["text"]
    assert len(text) == length and MASK_GLYPH not in text and doc["kind"] == kind.replace("mdlm", "diffusion")
    if kind != "autoregressive":
        assert doc["settings"]["steps"] == max(64, length)
        assert doc["samples"][0]["nfe"] <= doc["settings"]["steps"]


def test_no_sampler_flag_takes_the_kinds_default_sampler(
    random_ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = f"--ckpt={random_ckpts['block_diffusion']}"
    doc = sample(capsys, ckpt, "--length=40", "--num_samples=2", "--metrics=False")
    chosen = DEFAULT_SAMPLERS["block_diffusion"]
    assert {k: doc["settings"][k] for k in chosen} == chosen
    assert any(note.startswith(f"sampler: the default for {doc['kind']} checkpoints") for note in doc["notes"])
    # exactly the run of a user who gives those flags
    given = [f"--{k}={v}" for k, v in chosen.items()]
    same = sample(capsys, ckpt, "--length=40", "--num_samples=2", "--metrics=False", *given)
    assert [s["text"] for s in same["samples"]] == [s["text"] for s in doc["samples"]]
    assert not any(note.startswith("sampler: the default") for note in same["notes"])
    # any flag that chooses the sampler turns the default off; temperature does not
    for flags in (["--steps=40"], ["--remasking=random"], ["--schedule=cosine"], ["--confidence_threshold=0.9"]):
        other = sample(capsys, ckpt, "--length=40", "--num_samples=1", "--metrics=False", *flags)
        assert other["settings"]["entropy_budget"] is None
    cooler = sample(capsys, ckpt, "--length=40", "--num_samples=1", "--metrics=False", "--temperature=0.8")
    assert {k: cooler["settings"][k] for k in chosen} == chosen
    # an mdlm checkpoint keeps the flags' own defaults: random order, the default steps
    plain = sample(capsys, f"--ckpt={random_ckpts['mdlm']}", "--length=40", "--num_samples=1", "--metrics=False")
    assert plain["settings"]["remasking"] == "random" and plain["settings"]["entropy_budget"] is None
    assert plain["settings"]["steps"] == 64 and not any(n.startswith("sampler: the default") for n in plain["notes"])


def test_steps_given_are_used_as_given(random_ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bd = f"--ckpt={random_ckpts['block_diffusion']}"
    doc = sample(capsys, bd, "--length=512", "--steps=128", "--num_samples=1", "--metrics=False")
    assert doc["settings"]["steps"] == 128 and doc["samples"][0]["nfe"] == 128  # one step for each block of 4
    assert "--steps=64: fewer steps than the 128 blocks to generate" in error(capsys, bd, "--length=512", "--steps=64")
    assert "--sweep_steps=64,256: fewer steps than the 128 blocks" in error(
        capsys, bd, "--length=512", "--sweep_steps=64,256"
    )
    # The guide preset's 25 steps are a default too: they scale and never fall below the blocks.
    doc = sample(capsys, bd, "--length=512", "--preset=guide", "--num_samples=1", "--metrics=False")
    assert doc["settings"]["steps"] == 400  # ceil(25 * 512 / 32), under the 512 characters to fill


def test_default_steps_at_real_sizes() -> None:
    # block_size 256, the quickstart's: the default canvas keeps 64 steps, longer ones as many per character.
    assert default_steps(DEFAULT_STEPS, 256, 256, 1) == 64
    assert default_steps(DEFAULT_STEPS, 100, 256, 1) == 64
    assert default_steps(DEFAULT_STEPS, 1024, 256, 8) == 256  # mdlm: 8 blocks of 128, 32 steps each
    assert default_steps(DEFAULT_STEPS, 512, 256, 128) == 128  # block diffusion K = 4: one step per block
    assert default_steps(DEFAULT_STEPS, 512, 256, 512) == 512  # K = 1: one step per block wins
    assert default_steps(GUIDE_STEPS, 1024, 256, 8) == 100
    assert default_steps(DEFAULT_STEPS, 1_000_000, 256, 7813) == 250_000


def test_block_diffusion_refusals(bd_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error(capsys, f"--ckpt={bd_ckpt}", "--infill=The __ king and the queen of rome")
    assert (
        "--infill: " in err
        and "fixed text at position 8 lies after the block of the first hole (positions 0..7)" in err
    )
    assert "--block_length=4: " in error(capsys, f"--ckpt={bd_ckpt}", "--block_length=4")
    assert "fewer steps than the 9 blocks" in error(capsys, f"--ckpt={bd_ckpt}", "--length=70", "--steps=5")


def test_prompt_and_infill_characters_are_kept(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = sample(capsys, f"--out_dir={run_dir}", "--prompt=The king", "--length=30", "--steps=5")
    for s in doc["samples"]:
        assert s["text"].startswith("The king") and len(s["text"]) == 30 and s["generated"] == s["text"][8:]
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("And the queen\n")
    doc = sample(capsys, f"--out_dir={run_dir}", f"--prompt_file={prompt_file}", "--length=30", "--steps=5")
    assert all(s["text"].startswith("And the queen\n") for s in doc["samples"])

    template = "The ____ and the ___ of rome."
    doc = sample(capsys, f"--out_dir={run_dir}", f"--infill={template}", "--steps=7", "--num_samples=3")
    for s in doc["samples"]:
        text = s["text"]
        assert len(text) == len(template)
        assert all(t == c for t, c in zip(text, template, strict=True) if c != "_")
        assert "_" not in text[4:8] + text[17:20] and MASK_GLYPH not in text
    doc = sample(capsys, f"--out_dir={run_dir}", "--infill=The ##### hall", "--placeholder=#", "--steps=5")
    assert all(s["text"].startswith("The ") and s["text"].endswith(" hall") for s in doc["samples"])


def test_longer_than_block_size_generates_in_blocks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = sample(capsys, f"--out_dir={run_dir}", "--length=80", "--steps=10", "--num_samples=2", "--prompt=The")
    assert all(len(s["text"]) == 80 and MASK_GLYPH not in s["text"] for s in doc["samples"])
    assert doc["speed"]["forward_passes"] <= 2 * 10


@pytest.mark.parametrize("remasking", ["random", "margin", "entropy", "remask"])
def test_every_strategy_and_schedule_runs(run_dir: Path, capsys: pytest.CaptureFixture[str], remasking: str) -> None:
    doc = sample(
        capsys, f"--out_dir={run_dir}", f"--remasking={remasking}", "--schedule=cosine", "--length=20", "--steps=5",
        "--block_length=10", "--top_k=5", "--top_p=0.9", "--temperature=0.8", "--metrics=False",
    )  # fmt: skip
    assert all(len(s["text"]) == 20 and MASK_GLYPH not in s["text"] for s in doc["samples"])


def test_guide_preset_and_explicit_flags_win(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = sample(capsys, f"--out_dir={run_dir}", "--preset=guide", "--length=30", "--metrics=False")
    settings = doc["settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"], settings["steps"]) == (0.6, 20, 0.85, 25)
    doc = sample(capsys, f"--out_dir={run_dir}", "--preset=guide", "--steps=8", "--length=30", "--metrics=False")
    assert doc["settings"]["steps"] == 8 and doc["settings"]["temperature"] == 0.6


def test_show_steps_and_trace(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    flags = ("--length=12", "--steps=12", "--num_samples=2", "--metrics=False", "--show_steps", f"--trace={trace}")
    assert main(["sample", f"--out_dir={run_dir}", *flags]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert out.count("--- step ") == 12 and lines[0] == "--- step 1/12 (block 1) ---"
    assert lines[1].startswith("[1] ") and lines[1].count(MASK_GLYPH) == 11  # after step 1, 11 of 12 masked
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(12))
    assert all(len(r["changed"]) == 2 and all(len(c) == 1 for c in r["changed"]) for r in records)
    assert records[-1]["canvas"][0].count(MASK_GLYPH) == 0 and records[0]["canvas"][0].count(MASK_GLYPH) == 11


def test_text_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", f"--out_dir={run_dir}", "--length=16", "--steps=4", "--num_samples=2"]) == 0
    out = capsys.readouterr().out
    for expected in ("=== sample 1 ===", "=== sample 2 ===", "repeated 4-gram rate", "real text", "chars/s"):
        assert expected in out


def test_missing_dataset_skips_corpus_metrics_with_a_note(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = sample(capsys, f"--out_dir={run_dir}", "--length=16", "--steps=4", f"--data_dir={tmp_path / 'none'}")
    assert "word_hit_rate" not in doc["metrics"]["samples"] and doc["metrics"]["reference"] is None
    assert any("skipped" in note for note in doc["notes"])


def test_causal_judge_scores_samples_and_real_text(
    run_dir: Path, causal_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = (f"--out_dir={run_dir}", "--length=40", "--steps=8", "--prompt=The", f"--judge_ckpt={causal_ckpt}")
    doc = sample(capsys, *flags)
    # A random causal model over ~27 characters: about log(27) = 3.3 nats per character for any text.
    assert 2.5 < doc["metrics"]["samples"]["judge_nll"] < 4.5
    assert 2.5 < doc["metrics"]["reference"]["judge_nll"] < 4.5


def test_diffusion_judge_gives_the_negative_elbo(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("unmask.likelihood.elbo")
    flags = (f"--out_dir={run_dir}", "--length=24", "--steps=4", f"--judge_ckpt={run_dir / 'ckpt_unmasking_16.pt'}")
    a, b = sample(capsys, *flags, "--judge_draws=2"), sample(capsys, *flags, "--judge_draws=2")
    assert 1.0 < a["metrics"]["samples"]["judge_nll"] < 8.0 and 1.0 < a["metrics"]["reference"]["judge_nll"] < 8.0
    assert a["metrics"] == b["metrics"] | {"speed": a["metrics"]["speed"]}  # the same ELBO draws every run


def test_sweep_prints_a_table_and_writes_json(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "sweep.json"
    argv = [f"--out_dir={run_dir}", "--sweep_steps=2,4", "--remasking=low_confidence,random", "--length=16"]
    assert main(["sample", *argv, f"--sweep_out={out_file}"]) == 0
    table = capsys.readouterr().out
    assert "chars/s" in table and "real text" in table and table.count("low_confidence") == 2
    doc = json.loads(out_file.read_text())
    assert [(r["remasking"], r["steps"]) for r in doc["rows"]] == [
        ("low_confidence", 2), ("low_confidence", 4), ("random", 2), ("random", 4),
    ]  # fmt: skip
    assert all(r["speed"]["forward_passes"] == r["steps"] * 1 for r in doc["rows"])
    assert all(len(r["texts"]) == 4 for r in doc["rows"])


def test_sweep_writes_into_the_run_directory_and_never_overwrites(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    argv = ["sample", f"--out_dir={run}", "--sweep_steps=2", "--length=16", "--num_samples=2", "--metrics=False"]
    assert main(argv) == 0 and main([*argv, "--seed=5"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'sweep_steps.json'}" in out and f"wrote {run / 'sweep_steps_2.json'}" in out
    first, second = (
        json.loads((run / "sweep_steps.json").read_text()),
        json.loads((run / "sweep_steps_2.json").read_text()),
    )
    assert first["settings"]["seed"] == 1337 and second["settings"]["seed"] == 5
    assert not list(tmp_path.glob("sweep_steps*.json")) and not list(run.glob(".*.tmp"))  # nothing in the cwd either
    taken = tmp_path / "taken.json"
    taken.write_text("keep me")
    assert "--sweep_out=" in error(capsys, *argv[1:], f"--sweep_out={taken}")
    assert taken.read_text() == "keep me"


def test_out_of_vocabulary_characters_are_listed(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error(capsys, f"--out_dir={run_dir}", "--prompt=The jazz§ king")
    assert err.endswith("--prompt: 3 character(s) not in the dataset's vocabulary of 39: 'j' 'z' '§'")
    err = error(capsys, f"--out_dir={run_dir}", "--infill=Zebra ___")
    assert "--infill:" in err and "'Z'" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--remasking=best",), "--remasking=best: expected distinct names"),
        (("--remasking=random,margin",), "several strategies need --sweep_steps"),
        (("--top_p=0",), "--top_p=0.0: must be in (0, 1]"),
        (("--temperature=-1",), "--temperature=-1.0"),
        (("--steps=0",), "--steps=0: must be in [1, 1,000,000]"),
        (("--sweep_steps=4,x",), "--sweep_steps=4,x: expected a comma list"),
        (("--prompt=The", "--infill=a_"), "--prompt and --infill: give only one"),
        (("--infill=a_", "--length=9"), "--length=9: not with --infill"),
        (("--placeholder=ab",), "--placeholder=ab"),
        (("--preset=fast",), "--preset=fast"),
        (("--bogus=1",), "--bogus: unknown flag"),
        (("--threads=-1",), "--threads=-1: must be in [0, 1,024]"),
        (("--confidence_threshold=-0.1",), "--confidence_threshold=-0.1: must be in [0, 1,000]"),
        (("--length=1000001",), "--length=1000001: must be in [1, 1,000,000]"),
        (("--length=1000000000",), "--length=1000000000: must be in [1, 1,000,000]"),
        (("--confidence_threshold=0.9", "--remasking=remask"), "not with --remasking=remask"),
        (("--confidence_threshold=0.9", "--sweep_steps=4,8"), "not with --sweep_steps"),
        (("--entropy_budget=-1",), "--entropy_budget=-1.0: must be in [0, 1e+09]"),
        (("--entropy_budget=1e10",), "--entropy_budget=10000000000.0: must be in [0, 1e+09]"),
        (("--entropy_budget=nan",), "--entropy_budget=nan: expected a finite number"),
        (("--entropy_budget=1", "--confidence_threshold=0.9"), "--entropy_budget=1.0: not with --confidence_thr"),
        (("--entropy_budget=1", "--remasking=remask"), "--entropy_budget=1.0: not with --remasking=remask"),
        (("--entropy_budget=1", "--sweep_steps=4,8"), "--entropy_budget=1.0: not with --sweep_steps"),
        (("--entropy_budget=1", "--policy=margin"), "--policy=margin: not with --entropy_budget"),
    ],
)
def test_bad_flags_are_one_line_errors(
    run_dir: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], message: str
) -> None:
    assert message in error(capsys, f"--out_dir={run_dir}", *flags)


def test_errors_that_need_the_checkpoint(
    run_dir: Path, causal_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--prompt: 12 characters leave nothing" in error(
        capsys, f"--out_dir={run_dir}", "--prompt=The king and", "--length=12"
    )
    assert "--block_length=64: longer than the model's block_size=32" in error(
        capsys, f"--out_dir={run_dir}", "--block_length=64"
    )
    assert "--steps=2: fewer steps than the 5 blocks" in error(
        capsys, f"--out_dir={run_dir}", "--length=80", "--steps=2"
    )
    assert "--infill: the template has no '_'" in error(capsys, f"--out_dir={run_dir}", "--infill=The king")
    # The longest canvas is planned at once (62,500 blocks of 16): the steps check answers without generating.
    assert "--steps=64: fewer steps than the 62500 blocks" in error(
        capsys, f"--out_dir={run_dir}", "--length=1000000", "--steps=64"
    )
    assert "is an autoregressive checkpoint, which sees no text to the right" in error(
        capsys, f"--ckpt={causal_ckpt}", "--infill=The ___ king"
    )
    assert "--ckpt=nope.pt: no such checkpoint file" in error(capsys, "--ckpt=nope.pt")
    assert f"--out_dir={tmp_path}: no ckpt_unmasking_" in error(capsys, f"--out_dir={tmp_path}")
    assert "give --ckpt=PATH or --out_dir=DIR" in error(capsys)
    assert "--judge_ckpt=nope.pt: no such checkpoint" in error(capsys, f"--out_dir={run_dir}", "--judge_ckpt=nope.pt")
    assert "--prompt_file=" in error(capsys, f"--out_dir={run_dir}", f"--prompt_file={tmp_path / 'missing.txt'}")


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--help"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(SampleArgs):
        if f.init:
            assert f"--{f.name}=" in text, f.name
    assert "low_confidence" in text and "--remasking=STR|None  (default: None)" in text
    assert "the checkpoint kind's sampler" in text.replace("\n      ", " ")
    assert "--steps=INT|None in [1, 1,000,000]  (default: None)" in text and "at least one per block" in text


@pytest.mark.slow
def test_real_cli_in_a_subprocess(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "unmask", "sample", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = cli(f"--out_dir={run_dir}", "--length=20", "--steps=4", "--num_samples=2", "--prompt=The")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("=== sample") == 2 and "\nThe" in done.stdout and "chars/s" in done.stdout
    done = cli(f"--out_dir={run_dir}", "--prompt=jazz")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == "unmask sample: error: --prompt: 2 character(s) not in the dataset's vocabulary of 39: 'j' 'z'"
