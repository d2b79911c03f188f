"""Transfer learning end to end: the README commands, freezing and counts, checks, resume, classify, eval refusal."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, WORDS, run_records, shuffled_task, tiny_flags
from unmask.cli import main
from unmask.data.prepare import prepare
from unmask.model import ModelConfig, Transformer
from unmask.transfer.pretrained import parameter_summary, set_trainable

N_EMBD = 16  # tiny_flags


@pytest.fixture(scope="module")
def pretrained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unmasking language model (tiny_flags architecture) trained for 8 iterations."""
    out = tmp_path_factory.mktemp("pretrained")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8)]) == 0
    return out / "ckpt_unmasking_8.pt"


def transfer_flags(pre: Path, out: Path, **overrides: object) -> list[str]:
    """The README's transfer command; architecture, data_dir and dataset come from the checkpoint."""
    values: dict[str, object] = dict(
        init_from="resume",
        pretrained_checkpoint_path=pre,
        switch_to_binary=True,
        transfer_learning_mode="feature_extraction",
        out_dir=out,
        device="cpu",
        batch_size=4,
        dropout=0.0,
        eval_interval=4,
        eval_iters=2,
        log_interval=4,
        learning_rate=3e-2,
        warmup_iters=2,
        lr_decay_iters=40,
        max_iters=8,
        keep_last=0,
    )
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def summary_numbers(out: str) -> dict[str, int]:
    return {k: int(v.replace(",", "")) for k, v in re.findall(r"  (\w+) parameters: ([\d,]+)", out)}


def evals(out_dir: Path) -> list[dict]:
    return run_records(out_dir, "eval")


@pytest.mark.parametrize("mode", ["feature_extraction", "fine_tuning", "from_scratch"])
def test_readme_transfer_commands(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    out = tmp_path / mode
    assert main(["train", *transfer_flags(pretrained, out, transfer_learning_mode=mode)]) == 0
    printed = capsys.readouterr().out
    assert "*** TRANSFER LEARNING MODE ***" in printed and f"Transfer learning mode: {mode}" in printed
    assert "*** TRANSFER LEARNING OPTIMIZER SETUP ***" in printed
    counts = summary_numbers(printed)
    pre = torch.load(pretrained, weights_only=True)
    V = len(pre["vocab"]) + 1
    total = sum(p.numel() for p in Transformer(ModelConfig(V, 32, 1, 2, 16, head="token_binary")).parameters())
    head = 2 * N_EMBD + 2
    trainable = head if mode == "feature_extraction" else total
    assert counts == {"Total": total, "Trainable": trainable, "Frozen": total - trainable}
    assert f"Trainable percentage: {100 * trainable / total:.1f}%" in printed

    ckpt = torch.load(out / "ckpt_unmasking_8.pt", weights_only=True)
    assert ckpt["model_config"]["head"] == "token_binary" and ckpt["task"]["binary_task"] == "replaced_token"
    assert json.loads((out / "ckpt_unmasking_8.json").read_text())["task"]["transfer_learning_mode"] == mode
    backbone = [k for k in ckpt["model"] if not k.startswith("head.")]
    same = {k: torch.equal(ckpt["model"][k], pre["model"][k]) for k in backbone}
    if mode == "feature_extraction":
        assert all(same.values())  # frozen: bit for bit the pretrained weights
    else:
        assert not any(same.values())  # trained (fine_tuning) or never loaded (from_scratch)
    assert not torch.equal(ckpt["model"]["head.weight"], torch.zeros_like(ckpt["model"]["head.weight"]))
    last = evals(out)[-1]
    for key in (
        "val_loss",
        "val_accuracy_class_0",
        "val_accuracy_class_1",
        "val_f1",
        "val_auroc",
        "val_trivial_accuracy",
    ):
        assert key in last, key
    assert ckpt["config"]["n_layer"] == 1 and ckpt["config"]["dataset"] == "tiny"  # from the checkpoint


def test_optimizer_holds_exactly_the_trainable_parameters() -> None:
    model = Transformer(ModelConfig(12, 16, 2, 2, 16, head="sequence_binary"))
    set_trainable(model, "feature_extraction")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    good = torch.optim.AdamW(model.optimizer_groups(0.1))
    assert "  Trainable parameters: 34" in parameter_summary(model, good)
    with pytest.raises(RuntimeError, match="optimizer holds"):
        parameter_summary(model, torch.optim.AdamW(model.parameters()))
    set_trainable(model, "fine_tuning")
    assert all(p.requires_grad for p in model.parameters())


def test_binary_run_resumes_bit_for_bit(pretrained: Path, tmp_path: Path) -> None:
    flags = dict(transfer_learning_mode="fine_tuning", dropout=0.1, max_iters=12)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *transfer_flags(pretrained, straight, **flags)]) == 0
    assert main(["train", *transfer_flags(pretrained, split, **{**flags, "max_iters": 4})]) == 0
    assert main(["train", "--init_from=resume", f"--out_dir={split}", "--max_iters=12"]) == 0
    a = torch.load(straight / "ckpt_unmasking_12.pt", weights_only=True)
    b = torch.load(split / "ckpt_unmasking_12.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key in ("data", "mask", "torch"):
        assert torch.equal(a["rng"][0][key], b["rng"][0][key])
    assert evals(straight) == evals(split)


def test_resume_keeps_the_task(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fe"
    assert main(["train", *transfer_flags(pretrained, out, max_iters=4)]) == 0
    capsys.readouterr()
    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--transfer_learning_mode=fine_tuning"]) == 2
    err = capsys.readouterr().err
    assert "transfer_learning_mode: flag fine_tuning vs checkpoint feature_extraction" in err


def test_architecture_mismatch_lists_every_field(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main(["train", *transfer_flags(pretrained, out, n_layer=3, n_embd=64, n_head=2)]) == 2
    err = capsys.readouterr().err
    assert "n_layer: flag 3 vs checkpoint 1; n_embd: flag 64 vs checkpoint 16" in err and "n_head" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    ("path", "message"),
    [("missing.pt", "--pretrained_checkpoint_path=.*missing.pt: no such checkpoint file"), ("junk.pt", "cannot read")],
)
def test_missing_or_unreadable_pretrained_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, message: str
) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["train", *transfer_flags(tmp_path / path, tmp_path / "o")]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sub`: lowercase words only (a subset of tiny's characters); `extra`: adds characters tiny lacks."""
    root = tmp_path_factory.mktemp("other")
    rng = random.Random(1)
    sub = "\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(400)) + "\n"
    for name, text in (("sub", sub), ("extra", sub + "Zoë & Quinn!\n")):
        (root / f"{name}.txt").write_text(text)
        prepare(None, root / f"{name}.txt", name, root, 0.1, log=lambda _: None)
    return root


def test_vocabulary_subset_is_reencoded_superset_is_refused(
    pretrained: Path, other_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [f"--data_dir={other_data}"]
    assert main(["train", *transfer_flags(pretrained, tmp_path / "sub", max_iters=4), *data, "--dataset=sub"]) == 0
    assert "re-encoded with the checkpoint's vocabulary" in capsys.readouterr().out
    assert main(["train", *transfer_flags(pretrained, tmp_path / "x"), *data, "--dataset=extra"]) == 2
    err = capsys.readouterr().err
    assert "character(s) of the data are not in the checkpoint's vocabulary" in err
    assert "'!'" in err and "'&'" in err and "'ë'" in err
    # Language-model transfer needs the same characters exactly.
    flags = transfer_flags(pretrained, tmp_path / "lm", switch_to_binary=False, transfer_learning_mode="fine_tuning")
    assert main(["train", *flags, *data, "--dataset=sub"]) == 2
    assert "only in the checkpoint:" in capsys.readouterr().err


def test_language_model_fine_tuning_starts_from_the_pretrained_weights(pretrained: Path, tmp_path: Path) -> None:
    out = tmp_path / "lm"
    flags = transfer_flags(pretrained, out, switch_to_binary=False, transfer_learning_mode="fine_tuning", max_iters=4)
    assert main(["train", *flags, "--eval_iters=3", "--dropout=0.1"]) == 0
    # Same fixed validation set (seed 42, eval_iters x batch_size) as the pretraining run: iteration 0 of the new
    # run scores exactly what the pretrained model scored at its last evaluation.
    pre_last = evals(pretrained.parent)[-1]
    assert evals(out)[0]["iter"] == 0 and evals(out)[0]["val_loss"] == pre_last["val_loss"]


def test_sequence_task_then_classify(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = shuffled_task(tmp_path / "task.jsonl")
    out = tmp_path / "seq"
    flags = transfer_flags(pretrained, out, binary_task="sequence", classification_data=data, val_fraction=0.25)
    assert main(["train", *flags, "--transfer_learning_mode=fine_tuning"]) == 0
    printed = capsys.readouterr().out
    assert "60 training / 20 validation texts" in printed
    assert evals(out)[-1]["val_examples"] == 20
    ckpt = out / "ckpt_unmasking_8.pt"
    assert main(["classify", f"--ckpt={ckpt}", "--input", str(data)]) == 0
    captured = capsys.readouterr()
    scores = [float(line) for line in captured.out.splitlines()]
    assert len(scores) == 80 and all(0.0 <= s <= 1.0 for s in scores)
    assert "80 labeled texts: accuracy" in captured.err and "AUROC" in captured.err
    # One text at a time or 64 together: the padding mask makes the scores independent of the batch.
    assert main(["classify", f"--ckpt={ckpt}", f"--input={data}", "--json", "--batch_size=1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == list(range(1, 81)) and records[1]["label"] == 1
    assert [r["score"] for r in records] == pytest.approx(scores, abs=1e-5)


def test_classify_per_character_scores_long_texts(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "critic"
    assert main(["train", *transfer_flags(pretrained, out, max_iters=4)]) == 0
    texts = tmp_path / "texts.txt"
    long = "the king and the queen of rome speak to their people in the great hall"  # 70 characters: 3 windows of 32
    texts.write_text(f"{long}\n\nthe fool\n")
    capsys.readouterr()
    assert main(["classify", f"--out_dir={out}", f"--input={texts}", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == [1, 3]
    assert len(records[0]["char_scores"]) == len(long) == 70 and len(records[1]["char_scores"]) == 8
    assert records[1]["score"] == pytest.approx(sum(records[1]["char_scores"]) / 8, abs=1e-5)
    texts.write_text("the Zebra\n")
    assert main(["classify", f"--out_dir={out}", f"--input={texts}"]) == 2
    assert "texts.txt:1: 1 character(s) not in the model's vocabulary" in capsys.readouterr().err


def test_eval_sample_and_classify_refuse_the_wrong_head(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fe"
    assert main(["train", *transfer_flags(pretrained, out, max_iters=4)]) == 0
    capsys.readouterr()
    binary = out / "ckpt_unmasking_4.pt"
    assert main(["eval", f"--ckpt={binary}"]) == 2
    assert "a per-character binary classifier" in capsys.readouterr().err
    assert main(["sample", f"--ckpt={binary}"]) == 2
    assert "unmask sample needs a language model" in capsys.readouterr().err
    texts = tmp_path / "t.txt"
    texts.write_text("the king\n")
    assert main(["classify", f"--ckpt={pretrained}", f"--input={texts}"]) == 2
    err = capsys.readouterr().err
    assert "a language model; unmask classify needs" in err and len(err.strip().splitlines()) == 1


def test_critic_guided_sampling_via_cli(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "critic"
    assert main(["train", *transfer_flags(pretrained, out, max_iters=4)]) == 0
    critic = out / "ckpt_unmasking_4.pt"
    sweep = tmp_path / "sweep.json"
    common = [f"--ckpt={pretrained}", "--device=cpu", "--num_samples=2", "--length=24"]
    args = ["sample", *common, "--remasking=remask,critic", f"--critic_ckpt={critic}", "--sweep_steps=4,8"]
    assert main([*args, f"--sweep_out={sweep}"]) == 0
    rows = json.loads(sweep.read_text())["rows"]
    assert [(r["remasking"], r["steps"]) for r in rows] == [("remask", 4), ("remask", 8), ("critic", 4), ("critic", 8)]
    assert all(len(t) == 24 and "█" not in t for r in rows for t in r["texts"])
    capsys.readouterr()
    assert main(["sample", *common, "--remasking=critic"]) == 2
    assert "critic and --critic_ckpt=PATH go together" in capsys.readouterr().err
    assert main(["sample", *common, "--remasking=critic", f"--critic_ckpt={pretrained}"]) == 2
    assert "--critic_ckpt needs a per-character binary classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_feature_extraction_command_in_a_subprocess(pretrained: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        *("--init_from=resume", f"--pretrained_checkpoint_path={pretrained}", "--switch_to_binary=True"),
        *("--transfer_learning_mode=feature_extraction", "--learning_rate=1e-3", "--max_iters=4"),
        *("--eval_interval=4", "--eval_iters=2", "--batch_size=4", "--device=cpu", f"--out_dir={tmp_path / 'fe'}"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "unmask", "train", *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "✓ Backbone frozen for feature extraction" in done.stdout
    assert "  Trainable parameters: 34\n" in done.stdout and (tmp_path / "fe" / "ckpt_unmasking_4.pt").exists()
