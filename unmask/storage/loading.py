"""Load a trained model for inference (`sample`, `eval`, `classify`): checkpoint -> model + vocabulary + config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.model import ModelConfig, Transformer
from unmask.storage import checkpoint as ckpt_io
from unmask.storage.run_dir import read_checkpoint

_HEAD_NAMES = {
    "lm": "a language model",
    "token_binary": "a per-character binary classifier (--binary_task=replaced_token)",
    "sequence_binary": "a sequence binary classifier (--binary_task=sequence)",
}


@dataclass
class Trained:
    model: Transformer  # in eval mode, on the requested device
    vocab: Vocab
    model_config: ModelConfig
    config: dict[str, Any]  # the training run's resolved config (JSON values)
    iter_num: int
    path: Path
    task: dict[str, Any] = field(default_factory=dict)  # head and task (checkpoints before binary heads: {})

    @property
    def head(self) -> str:
        return self.model_config.head

    def require_head(self, heads: tuple[str, ...], use: str) -> None:
        """Refuse, in one line, a checkpoint whose head `use` (a command or flag) cannot work with."""
        if self.head in heads:
            return
        needed = " or ".join(_HEAD_NAMES[h] for h in heads)
        raise UserError(f"{self.path}: {_HEAD_NAMES[self.head]}; {use} needs {needed}")


def checkpoint_source(ckpt: str | None, out_dir: str | None, flag_prefix: str = "") -> tuple[Path, str]:
    """(file or run directory, the flag that named it): `--ckpt=PATH` wins, else `--out_dir`; one is required."""
    if ckpt is not None:
        return Path(ckpt), f"--{flag_prefix}ckpt={ckpt}"
    if out_dir is None:
        raise UserError(f"give --{flag_prefix}ckpt=PATH or --out_dir=DIR")
    return Path(out_dir), f"--out_dir={out_dir}"


def resolve_checkpoint(
    ckpt: str | None, out_dir: str | None, flag_prefix: str = "", warn: ckpt_io.Warn | None = None
) -> Path:
    """The checkpoint file `--ckpt=PATH` names (a run directory there means the run's newest intact checkpoint, as
    `unmask.storage.run_dir.newest_checkpoint` says), else the run's newest intact checkpoint in `--out_dir`; one of
    them is required. A file named directly is not verified here: `load_trained` verifies it."""
    source, flag = checkpoint_source(ckpt, out_dir, flag_prefix)
    if source.is_dir():
        return read_checkpoint(source, flag, warn)[0]
    if not source.is_file():
        raise UserError(f"{flag}: no such checkpoint file or run directory")
    return source


def read_trained(
    ckpt: str | None,
    out_dir: str | None,
    device: torch.device | str = "cpu",
    flag_prefix: str = "",
    warn: ckpt_io.Warn | None = None,
) -> Trained:
    """The model `--{flag_prefix}ckpt` / `--out_dir` name, verified: a file must be intact; a run directory gives
    the run's newest intact checkpoint (`unmask.storage.run_dir.newest_checkpoint`), each damaged newer one reported in
    one warning line (`warn`, default stderr), exactly as `train --init_from=resume` falls back."""
    source, flag = checkpoint_source(ckpt, out_dir, flag_prefix)
    path, payload = read_checkpoint(source, flag, warn)
    return trained_from(path, payload, device)


def load_trained(path: Path, device: torch.device | str = "cpu") -> Trained:
    """The model in the checkpoint file `path`, which must be intact."""
    return trained_from(path, ckpt_io.load_checkpoint(path), device)


def trained_from(path: Path, ckpt: dict[str, Any], device: torch.device | str = "cpu") -> Trained:
    """A `Trained` from a checkpoint dict `unmask.storage.checkpoint` has verified (digest, declared model vs
    tensors)."""
    try:
        model_config = ModelConfig(**ckpt["model_config"])
        vocab = Vocab(tuple(ckpt["vocab"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: checkpoint metadata is incomplete ({exc})") from None
    model = Transformer(model_config)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    config, task = dict(ckpt.get("config", {})), dict(ckpt.get("task", {}))
    return Trained(model, vocab, model_config, config, int(ckpt["iter_num"]), path, task)
