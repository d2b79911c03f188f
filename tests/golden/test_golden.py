"""Golden losses: a seeded tiny CPU run per objective and binary task, pinned to 1e-6.

Each case trains 16 iterations through the real `unmask train` entry point (in-process) with an evaluation and a
training log line every 2 iterations, and compares every recorded train and validation loss with
`tests/golden/<case>.json`. A refactor that moves any loss, even by 1 %, fails here.

The files are regenerated only on purpose: `UNMASK_REGEN_GOLDEN=1 python -m pytest tests/golden/test_golden.py` rewrites
them (and the test then fails, so a regeneration is never silent). Commit the new files with the reason.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shuffled_task, tiny_flags
from unmask.cli import main
from unmask.curriculum.stages import ORIGINAL_STAGES

GOLDEN = Path(__file__).resolve().parent  # the JSON files live next to this test
REGENERATE = os.environ.get("UNMASK_REGEN_GOLDEN") == "1"
TOLERANCE = 1e-6
ITERS = 16
# The keys pinned per record kind: train lines carry the step loss, evaluations the train and val losses.
PINNED = {"train": ("train_loss_step",), "eval": ("train_loss", "val_loss", "val_bpc")}


# The original three stages: the curriculum (and validation set) these files were pinned with; only the
# `unmasking` case trains the default curriculum.
ORIGINAL = "--unmasking_stages=" + json.dumps([stage.to_dict() for stage in ORIGINAL_STAGES])


def _flags(tiny_data: Path, out: Path, **overrides: object) -> list[str]:
    common: dict[str, object] = dict(max_iters=ITERS, eval_interval=2, log_interval=2, eval_iters=2, seed=7)
    return [*tiny_flags(tiny_data, out, **{**common, **overrides}), ORIGINAL]


def _pretrained(tiny_data: Path, root: Path) -> Path:
    out = root / "pretrained"
    if not (out / "ckpt_unmasking_8.pt").exists():
        assert main(["train", *_flags(tiny_data, out, max_iters=8, eval_interval=8)]) == 0
    return out / "ckpt_unmasking_8.pt"


def _case_argv(case: str, tiny_data: Path, root: Path) -> list[str]:
    out = root / case
    if case == "unmasking":  # the default curriculum
        return _flags(tiny_data, out)[:-1]
    if case in ("mdlm", "autoregressive"):
        return _flags(tiny_data, out, objective=case)
    if case == "unmasking_original_stages":  # the curriculum before the default gained its final stage
        return ["original", *_flags(tiny_data, out)[:-1]]
    if case == "autoregressive_zero_masking":  # the autoregressive default before it became the full softmax
        return _flags(tiny_data, out, objective="autoregressive", zero_masking=True)
    if case.endswith("_full_softmax"):  # the losses before zero-masking became the default
        return _flags(tiny_data, out, objective=case.removesuffix("_full_softmax"), zero_masking=False)
    if case == "block_diffusion":
        return [*_flags(tiny_data, out, objective="block_diffusion"), "--diffusion_block=4"]
    if case == "mdlm_exact_k":
        return _flags(tiny_data, out, objective="mdlm", mdlm_estimator="exact_k")
    if case == "binary_replaced_token":
        return _flags(tiny_data, out, switch_to_binary=True, binary_task="replaced_token")
    if case == "binary_sequence":
        data = shuffled_task(root / "texts.jsonl", 60)
        return _flags(tiny_data, out, switch_to_binary=True, binary_task="sequence", classification_data=data)
    pre = _pretrained(tiny_data, root)
    transfer = ["--init_from=resume", f"--pretrained_checkpoint_path={pre}"]
    if case == "transfer_fine_tuning":
        return [*_flags(tiny_data, out, switch_to_binary=True, transfer_learning_mode="fine_tuning"), *transfer]
    assert case == "transfer_language_model"
    return [*_flags(tiny_data, out, transfer_learning_mode="fine_tuning"), *transfer]


CASES = (
    "unmasking",
    "unmasking_original_stages",
    "mdlm",
    "autoregressive",
    "mdlm_full_softmax",
    "autoregressive_full_softmax",
    "autoregressive_zero_masking",
    "mdlm_exact_k",
    "block_diffusion",
    "binary_replaced_token",
    "binary_sequence",
    "transfer_fine_tuning",
    "transfer_language_model",
)


def _pinned_records(out: Path) -> list[dict[str, Any]]:
    records = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        keys = PINNED.get(r.get("kind", ""), ())
        if keys:
            records.append({"kind": r["kind"], "iter": r["iter"], **{k: r[k] for k in keys if k in r}})
    return records


@pytest.mark.parametrize("case", CASES)
def test_golden_losses(case: str, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp() / "golden_runs"
    root.mkdir(exist_ok=True)
    assert main(["train", *_case_argv(case, tiny_data, root)]) == 0
    got = _pinned_records(root / case)
    path = GOLDEN / f"{case}.json"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
        pytest.fail(f"regenerated {path.name}: rerun without UNMASK_REGEN_GOLDEN to check it")
    expected = json.loads(path.read_text())
    assert [(r["kind"], r["iter"]) for r in got] == [(r["kind"], r["iter"]) for r in expected]
    assert len([r for r in got if r["kind"] == "eval"]) == ITERS // 2 + 1  # every 2 iterations, 0 included
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e), (g, e)
        for key in PINNED[g["kind"]]:
            if key in e:
                assert math.isclose(g[key], e[key], rel_tol=TOLERANCE, abs_tol=TOLERANCE), (case, g["iter"], key)
