"""`unmask export`: a checkpoint -> a self-describing model directory (weights, config, model card), in the format of
`unmask.storage.export_format` (which `unmask.load` reads).

The directory is written next to its destination under a temporary name and renamed into place, so a reader sees
either no export or a complete one; a write that fails (disk full, read-only file system, a file in the way) is one
error line naming --out.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask.config.flags import format_help, parse_flags
from unmask.data.prepare import MASK_TOKEN
from unmask.errors import UserError, file_in_the_way
from unmask.storage import checkpoint as ckpt_io
from unmask.storage.atomic import describe_os_error, replace_directory, temporary_directory, umask
from unmask.storage.export_format import (
    CARD_FILE,
    CONFIG_FILE,
    DIGEST_KEY,
    EXPORT_FORMAT_VERSION,
    WEIGHTS_FILE,
    export_config,
    integrity_record,
    split_tied,
)
from unmask.storage.loading import load_trained, resolve_checkpoint


@dataclass
class ExportArgs:
    ckpt: str | None = None
    """Checkpoint file to export, or a run directory for its newest checkpoint."""
    out: str | None = None
    """Directory to write (model.safetensors, config.json, README.md); must not exist or be empty."""
    overwrite: bool = False
    """Replace an existing non-empty --out directory."""


# --- the pieces -----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def model_card(config: dict[str, Any], n_params: int) -> str:
    """A short README.md: what the model is, how it was trained, how to use it."""
    mc, training = config["model_config"], config["training"]
    kind = "autoregressive (causal)" if mc["causal"] else "masked-diffusion (bidirectional)"
    train_cfg = config["train_config"]
    dataset = train_cfg.get("dataset", "unknown")
    lines = [
        f"# unmask model: {config['objective']} on {dataset}",
        "",
        f"A character-level {kind} transformer trained with unmask "
        f"(objective `{config['objective']}`, head `{mc['head']}`).",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {n_params:,} |",
        f"| layers / heads / width | {mc['n_layer']} / {mc['n_head']} / {mc['n_embd']} |",
        f"| context (block_size) | {mc['block_size']} |",
        f"| vocabulary | {len(config['vocab'])} characters + `{MASK_TOKEN}` |",
        f"| iterations | {training['iterations']:,} |",
        f"| best validation loss | {_fmt(training['best_val_loss'])} |",
        f"| val_bpc at export | {_fmt(training['val_bpc'])} (best {_fmt(training['best_val_bpc'])}) |",
        f"| unmask / torch | {config['versions']['unmask']} / {config['versions']['torch']} |",
        "",
        "val_bpc is bits per character on the validation split: the negative ELBO (an upper bound on the NLL) for "
        "diffusion models, the exact NLL for autoregressive ones.",
        "",
        "```python",
        "import unmask",
        "",
        'm = unmask.load("THIS_DIRECTORY")',
        'print(m.generate(length=200, steps=64))  # prompt="..." for a fixed start',
        'print(m.score(["some text in the training vocabulary"]))  # bits per character',
        "```",
        "",
        f"Files: `{WEIGHTS_FILE}` (weights only), `{CONFIG_FILE}` (architecture, vocabulary, objective, training "
        "summary, the full training config).",
    ]
    return "\n".join(lines) + "\n"


# --- writing and reading --------------------------------------------------------------------------------------


def _check_destination(out: Path, overwrite: bool) -> None:
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out={out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UserError(f"--out={out}: directory exists and is not empty (give --overwrite=True to replace it)")
    except OSError as exc:
        raise UserError(f"--out={out}: cannot use: {describe_os_error(exc)}") from None


def export(ckpt_path: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the export directory of checkpoint `ckpt_path` at `out`; returns its config document."""
    from safetensors.torch import save

    _check_destination(out, overwrite)
    trained = load_trained(ckpt_path, "cpu")
    ckpt = ckpt_io.load_checkpoint(ckpt_path)
    tensors, tied = split_tied(trained.model.state_dict())
    config = export_config(trained, ckpt, tied)
    # Serialised in memory and written by Python: the digest is of exactly these bytes, and a failed write is an
    # OSError (safetensors' own save_file reports it as a SafetensorError and renames over special files).
    weights = save(tensors, metadata={"format": "pt", "unmask_export": str(EXPORT_FORMAT_VERSION)})
    config[DIGEST_KEY] = integrity_record(weights, config)
    files = {
        WEIGHTS_FILE: weights,
        CONFIG_FILE: (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        CARD_FILE: model_card(config, trained.model.num_params()).encode("utf-8"),
    }
    existed = out.exists()
    try:
        _write_directory(out, files)
    except OSError as exc:
        blocker = file_in_the_way(out)
        reason = f"{blocker} is not a directory" if blocker else describe_os_error(exc)
        kept = "the existing directory is unchanged" if existed else "nothing was written"
        raise UserError(f"--out={out}: cannot write: {reason}; {kept}") from None
    return config


def _write_directory(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a temporary directory next to `out` and rename it into place
    (`unmask.storage.atomic.replace_directory`); on any failure the temporary directory is removed and an existing
    `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_directory(out)
    try:
        mode = 0o666 & ~umask()
        for name, data in files.items():
            with (tmp / name).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp / name, mode)
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- the command ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                ExportArgs,
                "unmask export --ckpt=PATH --out=DIR [--overwrite=True]",
                "Write a checkpoint's weights (model.safetensors), config.json and a README.md model card to DIR; "
                "load it with unmask.load(DIR).",
            )
        )
        return 0
    _, flags = parse_flags(ExportArgs, argv, max_positional=0)
    args = ExportArgs(**flags)
    if args.ckpt is None:
        raise UserError("--ckpt=PATH: required (a checkpoint file or a run directory)")
    if args.out is None:
        raise UserError("--out=DIR: required (the directory to write)")
    path = resolve_checkpoint(args.ckpt, None)
    config = export(path, Path(args.out), args.overwrite)
    training = config["training"]
    print(
        f"exported {path} (iter {training['iterations']}, {config['objective']}) to {args.out}: "
        f"{WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE}"
    )
    return 0
