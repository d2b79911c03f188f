"""Transfer learning: start a run from a pretrained checkpoint, switch heads, freeze, report what trains.

`unmask train --init_from=resume --pretrained_checkpoint_path=PATH [--switch_to_binary=True]
--transfer_learning_mode=feature_extraction|fine_tuning|from_scratch` starts a *new* run in `out_dir` (iteration 0,
fresh optimizer, fresh counters) from PATH, as the original framework did (docs/origin.md §1.7). Unlike the
original, nothing is silently overridden or half-loaded (docs/origin.md §2.3, §2.4):

- the architecture (`n_layer`, `n_head`, `n_embd`, `block_size`, `bias`) and the vocabulary come from the
  checkpoint; an architecture flag given explicitly with another value is one error listing every differing field
  with both values;
- `data_dir` and `dataset` default to the checkpoint's (the text it was pretrained on);
- a binary head is a new, untied `Linear(n_embd, 2)`; every other weight is copied and checked (the LM head is the
  tied embedding, so nothing is lost);
- `feature_extraction` freezes every parameter but the head's, the optimizer holds exactly the trainable
  parameters (checked), and the checkpoint records the head and the task, so resume, `unmask classify` and the
  critic sampler rebuild the same model.

Without `--pretrained_checkpoint_path`, `--init_from=resume` continues out_dir, transfer runs included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unmask.config.train_config import ARCHITECTURE_FLAGS, TrainConfig, differing_fields
from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.model import Transformer
from unmask.storage.run_dir import read_checkpoint

DATA_FIELDS = ("data_dir", "dataset")  # default to the pretraining data
# Config keys a resumed run must keep: they decide the head and which parameters the optimizer holds.
TASK_FIELDS = ("switch_to_binary", "binary_task", "transfer_learning_mode")
_FLAG = "--pretrained_checkpoint_path"


@dataclass
class Pretrained:
    path: Path
    state: dict[str, torch.Tensor]  # the model's state dict
    model_config: dict[str, Any]
    vocab: Vocab
    config: dict[str, Any]  # the pretraining run's config (JSON values)


def is_transfer_start(values: dict[str, Any], explicit: frozenset[str]) -> bool:
    """A new run from pretrained weights: --init_from=resume with --pretrained_checkpoint_path given now (a
    resumed transfer run has the path only in its saved config)."""
    return (
        values.get("init_from") == "resume"
        and "pretrained_checkpoint_path" in explicit
        and values.get("pretrained_checkpoint_path") is not None
    )


def load_pretrained(value: str) -> Pretrained:
    """The checkpoint file, or the newest checkpoint of a run directory; it must be a bidirectional LM."""
    path, ckpt = read_checkpoint(Path(value), f"{_FLAG}={value}")
    try:
        model_config = dict(ckpt["model_config"])
        vocab = Vocab(tuple(ckpt["vocab"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: checkpoint metadata is incomplete ({exc})") from None
    if model_config.get("head", "lm") != "lm":
        raise UserError(
            f"{_FLAG}={value}: a binary classifier ({model_config['head']}); transfer learning starts from a "
            "language-model checkpoint"
        )
    if model_config.get("causal"):
        raise UserError(
            f"{_FLAG}={value}: an autoregressive (causal) checkpoint; the binary heads need a bidirectional "
            "(unmasking or mdlm) model"
        )
    return Pretrained(path, ckpt["model"], model_config, vocab, dict(ckpt.get("config", {})))


def transfer_values(values: dict[str, Any], explicit: frozenset[str], pretrained: Pretrained) -> dict[str, Any]:
    """The run's config values: architecture from the checkpoint (explicit flags must agree), data location from
    it unless given, everything else from defaults < preset < flags."""
    saved = pretrained.model_config
    diffs = differing_fields({k: v for k, v in values.items() if k in explicit}, saved)
    if diffs:
        raise UserError(
            f"{_FLAG}={pretrained.path}: the architecture differs from the checkpoint ({'; '.join(diffs)}); "
            "drop these flags or give the checkpoint's values"
        )
    out = {**values, **{k: saved[k] for k in ARCHITECTURE_FLAGS if k in saved}}
    for k in DATA_FIELDS:
        if k not in explicit and k in pretrained.config:
            out[k] = pretrained.config[k]
    out_dir = Path(out.get("out_dir", "out"))
    if out_dir.resolve() == pretrained.path.parent.resolve():
        raise UserError(
            f"--out_dir={out_dir}: holds the pretrained checkpoint {pretrained.path}; give the new run another "
            "--out_dir (its checkpoints would rotate the pretrained one away)"
        )
    return out


def check_resume_task(cfg: TrainConfig, ckpt: dict[str, Any], path: Path) -> None:
    """A resumed run keeps the checkpoint's head and task (the optimizer state matches only those parameters)."""
    saved = ckpt.get("config", {})
    head = ckpt.get("model_config", {}).get("head", "lm")
    diffs = []
    if cfg.head != head:
        diffs.append(f"head: flags give {cfg.head} vs checkpoint {head}")
    if head != "lm":
        diffs += differing_fields(cfg, saved, TASK_FIELDS)
    if diffs:
        raise UserError(f"{path}: a resumed run keeps the checkpoint's task ({'; '.join(diffs)})")


def reencoding(data_vocab: Vocab, model_vocab: Vocab, data_name: str) -> torch.Tensor | None:
    """None when the vocabularies are equal; a table data id -> model id when the model knows every character of
    the data (the data is then re-encoded); otherwise an error naming the characters the model lacks."""
    if data_vocab == model_vocab:
        return None
    known = {ch: i for i, ch in enumerate(model_vocab.itos)}
    missing = [ch for ch in data_vocab.itos if ch not in known]
    if missing:
        shown = " ".join(repr(ch) for ch in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise UserError(
            f"--dataset={data_name}: {len(missing)} character(s) of the data are not in the checkpoint's vocabulary "
            f"of {model_vocab.n_chars}: {shown}"
        )
    return torch.tensor([known[ch] for ch in data_vocab.itos], dtype=torch.long)


def check_same_vocab(data_vocab: Vocab, pretrained: Pretrained, data_name: str) -> None:
    """A language-model transfer predicts the checkpoint's characters: the data must have exactly them."""
    if data_vocab == pretrained.vocab:
        return
    only_data = sorted(set(data_vocab.itos) - set(pretrained.vocab.itos))
    only_ckpt = sorted(set(pretrained.vocab.itos) - set(data_vocab.itos))
    parts = [f"only in the data: {' '.join(map(repr, only_data[:20]))}"] if only_data else []
    parts += [f"only in the checkpoint: {' '.join(map(repr, only_ckpt[:20]))}"] if only_ckpt else []
    detail = "; ".join(parts) or "same characters in another order"
    raise UserError(
        f"--dataset={data_name}: its vocabulary differs from {pretrained.path}'s ({detail}); language-model "
        "transfer needs the same characters (binary heads re-encode data whose characters the checkpoint knows)"
    )


def load_backbone(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy every pretrained weight except the LM head into `model`; its own head stays as initialised.

    The LM head is tied to the embedding, so `head.weight` in `state` is the embedding matrix again: the
    embedding is copied under its own name and the new model's (untied) head is not touched.
    """
    is_lm = model.config.head == "lm"
    backbone = state if is_lm else {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    expected_missing = set() if is_lm else {k for k in model.state_dict() if k.startswith("head.")}
    if set(missing) != expected_missing or unexpected:
        raise RuntimeError(f"pretrained weights do not fit: missing {sorted(missing)}, unexpected {unexpected}")


def set_trainable(model: Transformer, mode: str) -> None:
    """feature_extraction: only the head's parameters train; otherwise every parameter does."""
    for name, param in model.named_parameters():
        param.requires_grad_(mode != "feature_extraction" or name.startswith("head."))


def _percent(part: int, whole: int) -> str:
    value = 100.0 * part / whole if whole else 0.0
    return f"{value:.1f}%" if value >= 0.1 or value == 0 else f"{value:.3f}%"


def parameter_summary(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The seed README's "Optimizer parameter summary" block; the optimizer must hold exactly the trainable
    parameters (the original only warned when it did not)."""
    params = list(model.parameters())  # the tied embedding/head weight once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if len({id(p) for p in held}) != len(held) or sum(p.numel() for p in held) != trainable:
        raise RuntimeError(f"optimizer holds {sum(p.numel() for p in held)} parameters, {trainable} are trainable")
    return [
        "*** TRANSFER LEARNING OPTIMIZER SETUP ***",
        "Optimizer parameter summary:",
        f"  Total parameters: {total:,}",
        f"  Trainable parameters: {trainable:,}",
        f"  Frozen parameters: {total - trainable:,}",
        f"  Trainable percentage: {_percent(trainable, total)}",
    ]


def banner(cfg: TrainConfig, pretrained: Pretrained) -> list[str]:
    """The seed README's "*** TRANSFER LEARNING MODE ***" lines, saying what actually happened."""
    mode = cfg.transfer_learning_mode
    lines = [
        "*** TRANSFER LEARNING MODE ***",
        f"Loading pretrained weights from: {pretrained.path}",
        f"Transfer learning mode: {mode}",
        f"Switch to binary classification: {cfg.switch_to_binary}",
    ]
    if mode == "from_scratch":
        lines.append("✓ Architecture and vocabulary from the checkpoint; weights randomly initialised (from_scratch)")
    else:
        lines.append("✓ Pretrained weights loaded successfully")
    if cfg.switch_to_binary:
        lines.append(f"✓ Switched to binary classification ({cfg.head} head, task {cfg.binary_task})")
    if mode == "feature_extraction":
        lines.append("✓ Backbone frozen for feature extraction")
    return lines


def start_language_model(model: Transformer, cfg: TrainConfig, pretrained: Pretrained, vocab: Vocab) -> list[str]:
    """A language-model run (no --switch_to_binary) from pretrained weights: same vocabulary, all weights copied
    (fine_tuning) or none (from_scratch); every parameter trains. Returns the banner lines.

    Called before the optimizer is built; every DDP rank copies the same file, so the replicas agree.
    """
    check_same_vocab(vocab, pretrained, cfg.dataset)
    if cfg.transfer_learning_mode != "from_scratch":
        with torch.no_grad():
            load_backbone(model, pretrained.state)
    return banner(cfg, pretrained)
