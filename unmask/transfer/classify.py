"""`unmask classify`: score texts with a binary classifier checkpoint, one score per line or record.

The score is the classifier's probability of class 1: for a sequence classifier (`--binary_task=sequence`) the
probability that the text has label 1; for a per-character classifier (`--binary_task=replaced_token`) the mean
over the text's characters of P(replaced), i.e. the expected share of wrong characters (`--json` adds every
character's P(replaced)). Texts longer than the model's block_size: a sequence classifier reads the first
block_size characters (the trainer did the same), a per-character one scores the text in consecutive windows.

When every record of a JSONL/CSV input has a label, the metrics against those labels go to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.config.command import parse_command
from unmask.config.flags import bounded, check_ranges
from unmask.errors import UserError
from unmask.runtime import MAX_THREADS, resolve_device, set_threads
from unmask.storage.loading import Trained, read_trained
from unmask.transfer.binary import binary_metrics
from unmask.transfer.labeled_text import LabeledText, encode_texts, read_labeled

USAGE = "unmask classify (--ckpt=PATH | --out_dir=DIR) --input=FILE [--json]"
DESCRIPTION = (
    "Print one score per text: P(label 1) for a sequence classifier, the mean P(replaced) over the characters for a\n"
    'per-character one. FILE: JSONL ({"text": ...}), CSV (a header with a text column) or plain text (one text per\n'
    "non-blank line)."
)


@dataclass
class ClassifyArgs:
    ckpt: str | None = None
    """Classifier checkpoint (a --switch_to_binary=True run) to score with."""
    out_dir: str | None = None
    """Use the newest checkpoint of this training run (or give --ckpt)."""
    input: str | None = None
    """The texts: .jsonl / .ndjson records with "text" (and optionally "label"), .csv with a header row naming a
    text column (and optionally label), anything else one text per non-blank line."""
    json: bool = False
    """Print one JSON object per text (line, score, label if given; per-character scores for per-character
    classifiers) instead of one number per line."""
    batch_size: int = bounded(64, 1, 2**20)
    """Texts (or windows) per forward pass."""
    threads: int = bounded(0, 0, MAX_THREADS)
    """CPU threads for torch (0: the cores that are idle now, measured over 0.15 s from /proc/stat, at least 1)."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""

    def __post_init__(self) -> None:
        check_ranges(self)


@torch.inference_mode()
def score_sequences(trained: Trained, records: list[LabeledText], path: Path, batch_size: int) -> list[float]:
    """P(class 1) of each text (cut to block_size) under a sequence classifier."""
    encoded = encode_texts(records, trained.vocab, trained.model_config.block_size, path)
    device = next(trained.model.parameters()).device
    scores: list[float] = []
    for rows in torch.arange(len(encoded)).split(batch_size):
        x, pad = encoded.batch(rows)
        logits = trained.model(x.to(device), pad=pad.to(device)).float()  # (b, 2)
        scores.extend(logits.softmax(-1)[:, 1].tolist())
    return scores


@torch.inference_mode()
def score_characters(trained: Trained, records: list[LabeledText], path: Path, batch_size: int) -> list[list[float]]:
    """P(replaced) of every character of each text under a per-character classifier (windows of block_size)."""
    T = trained.model_config.block_size
    pieces = [LabeledText(r.text[i : i + T], None, r.line) for r in records for i in range(0, len(r.text), T)]
    owner = [k for k, r in enumerate(records) for _ in range(0, len(r.text), T)]
    encoded = encode_texts(pieces, trained.vocab, T, path)
    device = next(trained.model.parameters()).device
    per_text: list[list[float]] = [[] for _ in records]
    for rows in torch.arange(len(encoded)).split(batch_size):
        x, pad = encoded.batch(rows)
        # The padding mask makes a short last window read as the shorter text it is.
        p_wrong = trained.model(x.to(device), pad=pad.to(device)).float().softmax(-1)[..., 1].cpu()  # (b, t)
        for row, probs, length in zip(rows.tolist(), p_wrong, encoded.lengths[rows].tolist(), strict=True):
            per_text[owner[row]].extend(probs[:length].tolist())
    return per_text


def main(argv: list[str]) -> int:
    parsed = parse_command(ClassifyArgs, argv, USAGE, DESCRIPTION)
    if parsed is None:
        return 0
    args = parsed[1]
    set_threads(args.threads)
    if args.input is None:
        raise UserError("--input=FILE: the texts to score are required")
    if args.batch_size < 1:
        raise UserError(f"--batch_size={args.batch_size}: must be at least 1")
    path = Path(args.input)
    trained = read_trained(args.ckpt, args.out_dir, resolve_device(args.device))
    trained.require_head(("token_binary", "sequence_binary"), "unmask classify")
    records = read_labeled(path, "--input", labels_required=False)

    char_scores: list[list[float]] | None = None
    if trained.head == "sequence_binary":
        scores = score_sequences(trained, records, path, args.batch_size)
        T = trained.model_config.block_size
        cut = sum(len(r.text) > T for r in records)
        if cut:
            print(f"note: {cut} text(s) longer than block_size={T} were cut to {T} characters", file=sys.stderr)
    else:
        char_scores = score_characters(trained, records, path, args.batch_size)
        scores = [sum(c) / len(c) for c in char_scores]

    for k, (record, score) in enumerate(zip(records, scores, strict=True)):
        if not args.json:
            print(f"{score:.6f}")
            continue
        obj: dict[str, object] = {"line": record.line, "score": score}
        if record.label is not None:
            obj["label"] = record.label
        if char_scores is not None:
            obj["char_scores"] = [round(p, 6) for p in char_scores[k]]
        print(json.dumps(obj))
    if all(r.label is not None for r in records):
        m = binary_metrics(torch.tensor(scores).numpy(), torch.tensor([r.label for r in records]).numpy())
        print(
            f"{len(records)} labeled texts: accuracy {m['accuracy']:.4f} (trivial baseline "
            f"{m['trivial_accuracy']:.4f}), balanced accuracy {m['balanced_accuracy']:.4f}, F1 {m['f1']:.4f}, "
            f"AUROC {m['auroc']:.4f}",
            file=sys.stderr,
        )
    return 0
