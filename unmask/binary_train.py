"""`unmask train --switch_to_binary=True`: the training loop of `Trainer` with a binary task's data, loss and metrics.

`BinaryTrainer` reuses the loop, the learning-rate schedule, gradient accumulation, non-finite-step handling,
checkpointing and resume of `unmask.train.Trainer`; it replaces what a step trains on and what an evaluation
measures:

- `replaced_token`: windows of the dataset (re-encoded to the model's vocabulary if needed) with characters
  replaced at a per-window rate (`unmask.binary.replace_characters`, from the masking generator); a per-position
  2-class head; class-balanced cross-entropy over every position.
- `sequence`: texts of `--classification_data`, split once into train/validation (seed 42, stratified); random
  training examples from the data generator; a 2-class head on the mean hidden state; class-balanced CE.

Validation is fixed (seed 42) and evaluated whole on every rank, so the metrics (accuracy per class, F1, AUROC,
trivial baseline) need no collective. The stage curriculum is inactive (as for the other non-unmasking
objectives) but keeps its place in checkpoints, so one checkpoint layout serves every run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unmask import transfer
from unmask.batches import BatchSource, SelectionPool
from unmask.binary import binary_metrics, class_balanced_cross_entropy, replace_characters
from unmask.config import TrainConfig
from unmask.curriculum import Curriculum
from unmask.data import Vocab, check_split_length, load_dataset
from unmask.labeled_text import EncodedTexts, encode_texts, read_labeled, stratified_split
from unmask.runtime import Runtime
from unmask.train import Trainer
from unmask.validation import VALIDATION_SEED

CLASS_NAMES = {"replaced_token": ("kept", "replaced"), "sequence": ("label 0", "label 1")}


class BinaryTrainer(Trainer):
    def __init__(
        self,
        cfg: TrainConfig,
        runtime: Runtime,
        checkpoint: dict[str, Any] | None = None,
        checkpoint_path: Path | None = None,
        pretrained: transfer.Pretrained | None = None,
    ) -> None:
        self.bind(cfg, runtime, checkpoint)
        self.pretrained = None if checkpoint is not None else pretrained
        self.notes: list[str] = []
        self.task = cfg.binary_task
        if self.task == "sequence":
            self._read_texts(checkpoint)
        else:
            self._open_corpus(checkpoint)

        self.raw_model = self.build_model(head=cfg.head)
        if self.pretrained is not None and cfg.transfer_learning_mode != "from_scratch":
            transfer.load_backbone(self.raw_model, self.pretrained.state)
        # Before the optimizer is built: it must hold exactly the trainable parameters (also on resume).
        transfer.set_trainable(self.raw_model, cfg.transfer_learning_mode)
        self.optimizer = self.build_optimizer()
        self.summary = transfer.parameter_summary(self.raw_model, self.optimizer)
        # Positions per optimizer step over all ranks (sequence texts are padded to at most block_size).
        self.chars_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * runtime.world_size
        self.examples_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * runtime.world_size
        self.curriculum = Curriculum(cfg.unmasking_stages, cfg.use_all_stages_for_training)
        self.pool = None
        self.init_state(checkpoint, checkpoint_path)

    # --- data -----------------------------------------------------------------------------------------------------

    def _model_vocab(self, checkpoint: dict[str, Any] | None, fallback: Vocab) -> Vocab:
        """The checkpoint's vocabulary (resume), the pretrained one (transfer), else the data's."""
        if checkpoint is not None:
            return Vocab(tuple(checkpoint["vocab"]))
        if self.pretrained is not None:
            return self.pretrained.vocab
        return fallback

    def _open_corpus(self, checkpoint: dict[str, Any] | None) -> None:
        cfg = self.cfg
        self.data = load_dataset(Path(cfg.data_dir) / cfg.dataset)
        for split in ("train", "val"):
            check_split_length(self.data, split, cfg.block_size)
        self.vocab = self._model_vocab(checkpoint, self.data.vocab)
        table = transfer.reencoding(self.data.vocab, self.vocab, cfg.dataset)
        self.table = None if table is None else table.to(self.rt.device)
        if table is not None:
            self.notes.append(
                f"{cfg.dataset}'s {self.data.vocab.n_chars} characters re-encoded with the checkpoint's vocabulary of "
                f"{self.vocab.n_chars}"
            )
        paragraphs = self.data.paragraphs if cfg.use_paragraph_boundaries else {"train": None, "val": None}
        self.train_source = BatchSource(self.data.train, cfg.block_size, self.rt.device, paragraphs["train"])
        # The fixed validation set: its own generators (seed 42), the same windows and replacements every time.
        val_source = BatchSource(self.data.val, cfg.block_size, self.rt.device, paragraphs["val"])
        clean = val_source.clean(cfg.eval_iters * cfg.batch_size, torch.Generator().manual_seed(VALIDATION_SEED))
        replace_gen = torch.Generator(device=self.rt.device).manual_seed(VALIDATION_SEED)
        self.val_x, self.val_labels = self._corrupt(clean, replace_gen)
        self.n_train = len(self.data.train)

    def _corrupt(self, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace characters among the data's own (never characters only the checkpoint knows), then re-encode."""
        x, labels = replace_characters(clean, self.data.vocab.n_chars, self.cfg.replace_ratio_range, generator)
        return (x if self.table is None else self.table[x]), labels

    def _read_texts(self, checkpoint: dict[str, Any] | None) -> None:
        cfg = self.cfg
        path = Path(str(cfg.classification_data))
        train, val = stratified_split(read_labeled(path), cfg.val_fraction, path)
        # Without a checkpoint the vocabulary is the training texts' characters.
        own = Vocab(tuple(sorted({ch for r in train for ch in r.text})))
        self.vocab = self._model_vocab(checkpoint, own)
        self.train_texts = encode_texts(train, self.vocab, cfg.block_size, path)
        self.val_texts = encode_texts(val, self.vocab, cfg.block_size, path)
        self.n_train = len(self.train_texts)
        truncated = self.train_texts.truncated + self.val_texts.truncated
        self.notes.append(
            f"{path}: {len(train)} training / {len(val)} validation texts (fixed split, seed {VALIDATION_SEED}); "
            f"{truncated} cut to block_size={cfg.block_size}"
        )

    # --- the Trainer hooks --------------------------------------------------------------------------------------

    @property
    def curriculum_active(self) -> bool:
        return False

    @property
    def epochs(self) -> float:
        """Passes over the training data: characters for replaced_token, texts for sequence."""
        if self.task == "sequence":
            return self.iter_num * self.examples_per_iter / self.n_train
        return self.train_chars_seen / self.n_train

    def micro_batch_loss(
        self,
        model: torch.nn.Module,
        data_gen: torch.Generator,
        mask_gen: torch.Generator,
        pool: SelectionPool | None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        B = self.cfg.batch_size
        if self.task == "sequence":
            rows = torch.randint(0, len(self.train_texts), (B,), generator=data_gen)
            x, pad = (t.to(self.rt.device) for t in self.train_texts.batch(rows))
            labels = self.train_texts.labels[rows].to(self.rt.device)
            seconds = time.perf_counter() - t0
            with self.rt.autocast():
                logits = model(x, pad=pad)  # (B, 2)
            return class_balanced_cross_entropy(logits, labels), seconds
        x, labels = self._corrupt(self.train_source.clean(B, data_gen), mask_gen)
        seconds = time.perf_counter() - t0
        with self.rt.autocast():
            logits = model(x)  # (B, T, 2)
        return class_balanced_cross_entropy(logits.flatten(0, 1), labels.flatten()), seconds

    @torch.no_grad()
    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over the whole validation set: P(class 1) (N,), labels (N,), cross-entropy per example (N,)."""
        model, B, dev = self.raw_model, self.cfg.batch_size, self.rt.device
        probs, labels, losses = [], [], []
        if self.task == "sequence":
            texts: EncodedTexts = self.val_texts
            for rows in torch.arange(len(texts)).split(B):
                x, pad = (t.to(dev) for t in texts.batch(rows))
                with self.rt.autocast():
                    logits = model(x, pad=pad).float()  # (b, 2)
                y = texts.labels[rows].to(dev)
                probs.append(logits.softmax(-1)[:, 1])
                labels.append(y)
                losses.append(F.cross_entropy(logits, y, reduction="none"))
        else:
            for rows in torch.arange(len(self.val_x)).split(B):
                with self.rt.autocast():
                    logits = model(self.val_x[rows]).float().flatten(0, 1)  # (b T, 2)
                y = self.val_labels[rows].flatten()
                probs.append(logits.softmax(-1)[:, 1])
                labels.append(y)
                losses.append(F.cross_entropy(logits, y, reduction="none"))
        return torch.cat(probs).cpu(), torch.cat(labels).cpu(), torch.cat(losses).cpu()

    def validation_metrics(self) -> dict[str, Any]:
        p1, labels, losses = self.scores()
        # Class-balanced CE over the whole set: the mean of the two classes' mean losses (as in training).
        per_class = [losses[labels == c].double().mean() for c in (0, 1) if bool((labels == c).any())]
        metrics = binary_metrics(p1.double().numpy(), labels.numpy())
        return {"val_loss": float(torch.stack(per_class).mean()), **{f"val_{k}": v for k, v in metrics.items()}}

    def task_record(self) -> dict[str, Any]:
        return {
            "head": self.model_config.head,
            "binary_task": self.task,
            "classes": list(CLASS_NAMES[self.task]),
            "transfer_learning_mode": self.cfg.transfer_learning_mode,
            "pretrained_checkpoint_path": self.cfg.pretrained_checkpoint_path,
        }

    def start(self) -> None:
        cfg, p = self.cfg, self.log.print
        self.open_run()
        if self.pretrained is not None:
            for line in transfer.banner(cfg, self.pretrained):
                p(line)
        for line in self.summary:
            p(line)
        p(
            f"unmask: binary classifier ({self.model_config.head}, task {self.task}), vocabulary "
            f"{self.vocab.n_chars} characters + [MASK], {self.rt.device} {str(self.rt.dtype).removeprefix('torch.')}, "
            f"world size {self.rt.world_size}"
        )
        for note in self.notes:
            p(note)
        if self.task == "replaced_token":
            lo, hi = cfg.replace_ratio_range
            p(
                f"replaced_token on {cfg.dataset}: rate ~ U({lo}, {hi}) per window; validation {len(self.val_x)} "
                f"windows x {cfg.block_size} (seed {VALIDATION_SEED}), {float(self.val_labels.double().mean()):.3f} "
                "replaced"
            )
        if self.resumed:
            p(f"Resumed at iteration {self.iter_num}")

    def report(self, m: dict[str, Any]) -> None:
        zero, one = CLASS_NAMES[self.task]
        p = self.log.print
        p(f"step {m['iter']}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, lr {m['lr']:.6f}")
        p(
            f"  val accuracy {m['val_accuracy']:.4f} ({zero} {m['val_accuracy_class_0']:.4f}, {one} "
            f"{m['val_accuracy_class_1']:.4f}; balanced {m['val_balanced_accuracy']:.4f}; trivial baseline "
            f"{m['val_trivial_accuracy']:.4f})"
        )
        p(
            f"  val F1 ({one}) {m['val_f1']:.4f}, precision {m['val_precision']:.4f}, recall {m['val_recall']:.4f}, "
            f"AUROC {m['val_auroc']:.4f}, epochs {m['epochs']:.3f}"
        )
        self.log.record("eval", m)
