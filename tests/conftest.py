"""Shared fixtures: a tiny prepared corpus and tiny-model training flags."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from unmask.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "rome",
    "speak",
    "to",
    "their",
    "people",
    "in",
    "the",
    "hall",
    "while",
    "a",
    "fool",
    "sings",
    "of",
    "love",
    "and",
    "war",
    "and",
    "bread",
    "and",
    "night",
]


def tiny_corpus(n_lines: int = 1200, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ".")
        if i % 7 == 6:
            lines.append("")  # blank lines make paragraphs
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models run fastest on one thread; two spinning threads on a loaded 2-core machine crawl. Reset before
    every test: a command run in-process with the default --threads=0 sets the count from the load of the moment,
    and floating-point sums (the golden losses) differ with it."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_dir holding a prepared `tiny` dataset (~60k characters, ~27 distinct)."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "tiny.txt"
    corpus.write_text(tiny_corpus())
    prepare(None, corpus, "tiny", root, 0.1, log=lambda _: None)
    return root


def tiny_flags(data_dir: Path, out_dir: Path, **overrides: object) -> list[str]:
    """Flags for a model of a few thousand parameters that trains in about a second."""
    values: dict[str, object] = dict(
        data_dir=data_dir,
        dataset="tiny",
        out_dir=out_dir,
        device="cpu",
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=32,
        batch_size=4,
        dropout=0.1,
        eval_interval=4,
        eval_iters=3,
        log_interval=2,
        learning_rate=3e-2,
        warmup_iters=2,
        lr_decay_iters=40,
        max_iters=16,
        keep_last=0,
        threads=1,  # the default (the cores idle now) varies with the load: results must not
    )
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


CLOCK_FIELDS = (
    "time",
    "elapsed_s",
    "eta_s",
    "eval_seconds",
    "run_id",
)  # fields of metrics.jsonl records that differ between runs


def run_records(out_dir: Path, kind: str) -> list[dict]:
    """The `kind` ("train" or "eval") records of a run's metrics.jsonl, without their wall-clock fields."""
    import json

    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in map(json.loads, lines) if r["kind"] == kind]


def shuffled_task(path: Path, n: int = 80) -> Path:
    """A fixed labelled JSONL task of `n` lines (label 1: the words of the line in a different order)."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        if i % 2:
            while (order := rng.sample(words, len(words))) == words:
                pass
            words = order
        lines.append(json.dumps({"text": " ".join(words) + ".", "label": i % 2}))
    path.write_text("\n".join(lines) + "\n")
    return path
