"""`unmask` command line: parse, build, run. User errors print one line and exit with code 2."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask import __version__
from unmask.errors import EXIT_USER_ERROR, UserError
from unmask.flags import format_help, load_preset, parse_flags

USAGE = """usage: unmask <command> [flags]

commands:
  prepare   turn a text corpus into train.bin / val.bin / meta.json
  train     train a model with the unmasking curriculum
  sample    generate text by iterative unmasking (prompts, infilling, strategies, metrics)
  eval      likelihood of a checkpoint: ELBO / exact NLL in bits per character
  compare   train an autoregressive baseline and a diffusion model on the same budget, compare val_bpc

`unmask <command> --help` lists a command's flags."""


@dataclass
class PrepareArgs:
    data_dir: str = "data"
    """Directory the dataset directory is written into."""
    input: str | None = None
    """A UTF-8 text file to prepare (for shakespeare_char: use this file instead of fetching)."""
    name: str | None = None
    """Dataset name for --input (default: the file's stem)."""
    val_fraction: float = 0.1
    """Fraction of the characters, taken from the end, that form the validation split."""


def run_prepare(argv: list[str]) -> int:
    from unmask.prepare import KNOWN_DATASETS, prepare

    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                PrepareArgs,
                "unmask prepare [DATASET] [flags]",
                f"Prepare a known dataset ({', '.join(KNOWN_DATASETS)}) or any UTF-8 file (--input).",
            )
        )
        return 0
    positional, flags = parse_flags(PrepareArgs, argv, max_positional=1)
    args = PrepareArgs(**flags)
    dataset = positional[0] if positional else None
    if dataset is None and args.input is None:
        raise UserError(f"unmask prepare: name a dataset ({', '.join(KNOWN_DATASETS)}) or give --input=FILE")
    prepare(dataset, Path(args.input) if args.input else None, args.name, Path(args.data_dir), args.val_fraction)
    return 0


def build_train_config(argv: list[str]) -> tuple[Any, dict[str, Any] | None, Path | None]:
    """Defaults < preset (positional, by name or path) < flags; on resume the checkpoint's config is the base."""
    from unmask import checkpoint as ckpt_io
    from unmask.config import TrainConfig

    positional, flags = parse_flags(TrainConfig, argv, max_positional=1)
    values = {**(load_preset(positional[0], TrainConfig) if positional else {}), **flags}
    explicit = frozenset(values)
    checkpoint = path = None
    if values.get("init_from") == "resume":
        out_dir = Path(values.get("out_dir", TrainConfig.out_dir))
        path = ckpt_io.find_checkpoint(out_dir, values.get("ckpt_filename"))
        checkpoint = ckpt_io.load_checkpoint(path)
        values = {**checkpoint["config"], **values}
    return TrainConfig.from_dict(values, explicit), checkpoint, path


def run_train(argv: list[str]) -> int:
    from unmask.config import TrainConfig

    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                TrainConfig,
                "unmask train [PRESET] [--flag=value ...]",
                "Train a bidirectional transformer to fill masked characters through a curriculum of "
                "masking stages.\nPRESET: a preset name (cpu, gpu) or a .py file of plain assignments.",
            )
        )
        return 0
    cfg, checkpoint, path = build_train_config(argv)

    from unmask.runtime import init_runtime
    from unmask.train import Trainer

    runtime = init_runtime(cfg.device, cfg.dtype, cfg.backend)
    try:
        Trainer(cfg, runtime, checkpoint, path).run()
    finally:
        runtime.shutdown()
    return 0


def run_sample(argv: list[str]) -> int:
    from unmask.sample import main as sample_main

    return sample_main(argv)


def run_eval(argv: list[str]) -> int:
    from unmask.evaluate import main as eval_main

    return eval_main(argv)


def run_compare(argv: list[str]) -> int:
    from unmask.compare import main as compare_main

    return compare_main(argv)


COMMANDS = {
    "prepare": run_prepare,
    "train": run_train,
    "sample": run_sample,
    "eval": run_eval,
    "compare": run_compare,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] == "--version":
        print(f"unmask {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UserError(f"{argv[0]}: unknown command (expected one of {', '.join(COMMANDS)})")
        return command(argv[1:])
    except UserError as exc:
        print(f"unmask {argv[0]}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"unmask {argv[0]}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`unmask train --help | head`): silence the flush at exit, as a Unix tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)
