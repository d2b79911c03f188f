"""The two binary tasks of `unmask train --switch_to_binary=True`, as objectives of the common trainer.

- `replaced_token`: windows of the dataset (re-encoded to the model's vocabulary if needed) with characters
  replaced at a per-window rate (`unmask.transfer.binary.replace_characters`, from the masking generator); a
  per-position 2-class head; class-balanced cross-entropy over every position.
- `sequence`: texts of `--classification_data`, split once into train/validation (seed 42, stratified); random
  training examples from the data generator; a 2-class head on the mean hidden state; class-balanced CE.

Validation is fixed (seed 42) and evaluated whole on every rank, so the metrics (accuracy per class, F1, AUROC,
trivial baseline) need no collective. The model's vocabulary is the checkpoint's on resume, the pretrained one on
a transfer start, else the data's. `unmask.objectives.registry` names both tasks by module path, so only their runs
import this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.curriculum.batches import BatchSource
from unmask.data.dataset import Vocab, check_split_length, load_dataset
from unmask.model import Transformer
from unmask.objectives.base import Objective, RunInputs
from unmask.training.validation import VALIDATION_SEED
from unmask.transfer import pretrained as transfer
from unmask.transfer.binary import binary_metrics, class_balanced_cross_entropy, replace_characters
from unmask.transfer.labeled_text import encode_texts, read_labeled, stratified_split

CLASS_NAMES = {"replaced_token": ("kept", "replaced"), "sequence": ("label 0", "label 1")}
BatchT = TypeVar("BatchT")


@dataclass
class TokenBatch:
    """Corrupted windows x (B, T) and which characters were replaced, labels (B, T) long."""

    x: Tensor
    labels: Tensor


@dataclass
class SequenceBatch:
    """Texts x (B, T) with their padding pad (B, T) bool and labels (B,) long."""

    x: Tensor
    pad: Tensor
    labels: Tensor


class BinaryTask(Objective[BatchT]):
    """What both binary tasks share: the model vocabulary, the head, pretrained weights, freezing, metrics."""

    task: ClassVar[str]
    show_parameter_summary = True

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.checkpoint = inputs.checkpoint
        self.lines: list[str] = []

    def model_vocab(self, fallback: Vocab) -> Vocab:
        """The checkpoint's vocabulary (resume), the pretrained one (transfer), else the data's."""
        if self.checkpoint is not None:
            return Vocab(tuple(self.checkpoint["vocab"]))
        if self.pretrained is not None:
            return self.pretrained.vocab
        return fallback

    def model_fields(self) -> dict[str, Any]:
        return {"head": self.cfg.head}

    def prepare_model(self, model: Transformer) -> list[str]:
        """Pretrained backbone (unless from_scratch), then freezing: the optimizer built next must hold exactly
        the trainable parameters (also on resume)."""
        lines = []
        if self.pretrained is not None:
            if self.cfg.transfer_learning_mode != "from_scratch":
                transfer.load_backbone(model, self.pretrained.state)
            lines = transfer.banner(self.cfg, self.pretrained)
        transfer.set_trainable(model, self.cfg.transfer_learning_mode)
        return lines

    def predictions(self, model: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Over the whole validation set: P(class 1) (N,), labels (N,), cross-entropy per example (N,)."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        p1, labels, losses = self.predictions(model)
        # Class-balanced CE over the whole set: the mean of the two classes' mean losses (as in training).
        per_class = [losses[labels == c].double().mean() for c in (0, 1) if bool((labels == c).any())]
        metrics = binary_metrics(p1.double().numpy(), labels.numpy())
        return {"val_loss": float(torch.stack(per_class).mean()), **{f"val_{k}": v for k, v in metrics.items()}}

    def _scored(self, logits: Tensor, y: Tensor, out: tuple[list[Tensor], list[Tensor], list[Tensor]]) -> None:
        probs, labels, losses = out
        probs.append(logits.softmax(-1)[:, 1])
        labels.append(y)
        losses.append(F.cross_entropy(logits, y, reduction="none"))

    def task_record(self, head: str) -> dict[str, Any]:
        return {
            "head": head,
            "binary_task": self.task,
            "classes": list(CLASS_NAMES[self.task]),
            "transfer_learning_mode": self.cfg.transfer_learning_mode,
            "pretrained_checkpoint_path": self.cfg.pretrained_checkpoint_path,
        }

    def start_lines(self, resumed_at: int | None) -> list[str]:
        lines = [f"binary classifier ({self.cfg.head} head, task {self.task})", *self.lines]
        if resumed_at is not None:
            lines.append(f"Resumed at iteration {resumed_at}")
        return lines

    def report_lines(self, m: dict[str, Any]) -> list[str]:
        zero, one = CLASS_NAMES[self.task]
        return [
            f"  val accuracy {m['val_accuracy']:.4f} ({zero} {m['val_accuracy_class_0']:.4f}, {one} "
            f"{m['val_accuracy_class_1']:.4f}; balanced {m['val_balanced_accuracy']:.4f}; trivial baseline "
            f"{m['val_trivial_accuracy']:.4f})",
            f"  val F1 ({one}) {m['val_f1']:.4f}, precision {m['val_precision']:.4f}, recall {m['val_recall']:.4f}, "
            f"AUROC {m['val_auroc']:.4f}, epochs {m['epochs']:.3f}",
        ]


class ReplacedToken(BinaryTask[TokenBatch]):
    """Per-character classifier: which characters of a window were replaced by another character."""

    task = "replaced_token"

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg, dev = self.cfg, self.rt.device
        self.data = load_dataset(Path(cfg.data_dir) / cfg.dataset)
        for split in ("train", "val"):
            check_split_length(self.data, split, cfg.block_size)
        self.vocab = self.model_vocab(self.data.vocab)
        table = transfer.reencoding(self.data.vocab, self.vocab, cfg.dataset)
        self.table = None if table is None else table.to(dev)
        if table is not None:
            self.lines.append(
                f"{cfg.dataset}'s {self.data.vocab.n_chars} characters re-encoded with the checkpoint's vocabulary of "
                f"{self.vocab.n_chars}"
            )
        paragraphs = self.data.paragraphs if cfg.use_paragraph_boundaries else {"train": None, "val": None}
        self.train_source = BatchSource(self.data.train, cfg.block_size, dev, paragraphs["train"])
        # The fixed validation set: its own generators (seed 42), the same windows and replacements every time.
        val_source = BatchSource(self.data.val, cfg.block_size, dev, paragraphs["val"])
        clean = val_source.clean(cfg.eval_iters * cfg.batch_size, torch.Generator().manual_seed(VALIDATION_SEED))
        replace_gen = torch.Generator(device=dev).manual_seed(VALIDATION_SEED)
        self.val_x, self.val_labels = self._corrupt(clean, replace_gen)
        self.train_size = len(self.data.train)
        lo, hi = cfg.replace_ratio_range
        self.lines.append(
            f"replaced_token on {cfg.dataset}: rate ~ U({lo}, {hi}) per window; validation {len(self.val_x)} "
            f"windows x {cfg.block_size} (seed {VALIDATION_SEED}), {float(self.val_labels.double().mean()):.3f} "
            "replaced"
        )

    def _corrupt(self, clean: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replace characters among the data's own (never characters only the checkpoint knows), then re-encode."""
        x, labels = replace_characters(clean, self.data.vocab.n_chars, self.cfg.replace_ratio_range, generator)
        return (x if self.table is None else self.table[x]), labels

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> TokenBatch:
        return TokenBatch(*self._corrupt(self.train_source.clean(self.cfg.batch_size, data_gen), mask_gen))

    def loss(self, model: torch.nn.Module, batch: TokenBatch) -> Tensor:
        logits = model(batch.x)  # (B, T, 2)
        return class_balanced_cross_entropy(logits.flatten(0, 1), batch.labels.flatten())

    @torch.no_grad()
    def predictions(self, model: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        out: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for rows in torch.arange(len(self.val_x)).split(self.cfg.batch_size):
            with self.rt.autocast():
                logits = model(self.val_x[rows]).float().flatten(0, 1)  # (b T, 2)
            self._scored(logits, self.val_labels[rows].flatten(), out)
        return torch.cat(out[0]).cpu(), torch.cat(out[1]).cpu(), torch.cat(out[2]).cpu()


class SequenceTask(BinaryTask[SequenceBatch]):
    """Sequence classifier: one label per text of --classification_data."""

    task = "sequence"

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        cfg = self.cfg
        path = Path(str(cfg.classification_data))
        train, val = stratified_split(read_labeled(path), cfg.val_fraction, path)
        # Without a checkpoint the vocabulary is the training texts' characters.
        own = Vocab(tuple(sorted({ch for r in train for ch in r.text})))
        self.vocab = self.model_vocab(own)
        self.train_texts = encode_texts(train, self.vocab, cfg.block_size, path)
        self.val_texts = encode_texts(val, self.vocab, cfg.block_size, path)
        self.train_size = len(self.train_texts)
        self.examples_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * self.rt.world_size
        truncated = self.train_texts.truncated + self.val_texts.truncated
        self.lines.append(
            f"{path}: {len(train)} training / {len(val)} validation texts (fixed split, seed {VALIDATION_SEED}); "
            f"{truncated} cut to block_size={cfg.block_size}"
        )

    def epochs(self, iter_num: int, chars_seen: int) -> float:
        """Passes over the training texts."""
        return iter_num * self.examples_per_iter / self.train_size

    def batch(self, data_gen: torch.Generator, mask_gen: torch.Generator, training: bool) -> SequenceBatch:
        dev = self.rt.device
        rows = torch.randint(0, len(self.train_texts), (self.cfg.batch_size,), generator=data_gen)
        x, pad = (t.to(dev) for t in self.train_texts.batch(rows))
        return SequenceBatch(x, pad, self.train_texts.labels[rows].to(dev))

    def loss(self, model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
        logits = model(batch.x, pad=batch.pad)  # (B, 2)
        return class_balanced_cross_entropy(logits, batch.labels)

    @torch.no_grad()
    def predictions(self, model: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        out: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        texts, dev = self.val_texts, self.rt.device
        for rows in torch.arange(len(texts)).split(self.cfg.batch_size):
            x, pad = (t.to(dev) for t in texts.batch(rows))
            with self.rt.autocast():
                logits = model(x, pad=pad).float()  # (b, 2)
            self._scored(logits, texts.labels[rows].to(dev), out)
        return torch.cat(out[0]).cpu(), torch.cat(out[1]).cpu(), torch.cat(out[2]).cpu()
