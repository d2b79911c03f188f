"""`unmask` command line: parse, build, run. User errors print one line and exit with code 2."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask import __version__
from unmask.errors import EXIT_USER_ERROR, UserError
from unmask.flags import available_presets, format_help, load_preset, parse_flags
from unmask.preemption import TrainingInterrupted

USAGE = """usage: unmask <command> [flags]

commands:
  prepare   turn a text corpus into train.bin / val.bin / meta.json
  train     train a model with the unmasking curriculum
  sample    generate text by iterative unmasking (prompts, infilling, strategies, metrics)
  eval      likelihood of a checkpoint: ELBO / exact NLL in bits per character
  compare   train an autoregressive baseline and a diffusion model on the same budget, compare val_bpc
  classify  score texts with a binary classifier checkpoint (--switch_to_binary=True runs)
  export    write a checkpoint as model.safetensors + config.json + README.md (load with unmask.load)
  plot      draw loss and val_bpc curves of one or more runs into a PNG (needs matplotlib)

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


@dataclass
class TrainRun:
    """What `unmask train` starts from: the config, a checkpoint to resume, or pretrained weights to transfer."""

    cfg: Any  # TrainConfig
    checkpoint: dict[str, Any] | None = None
    path: Path | None = None
    pretrained: Any = None  # unmask.transfer.Pretrained: a new run from these weights


def build_train_run(argv: list[str]) -> TrainRun:
    """Defaults < preset (positional, by name or path) < flags. On resume the checkpoint's config is the base; with
    --pretrained_checkpoint_path (a transfer start) the checkpoint gives the architecture (see unmask.transfer)."""
    from unmask import checkpoint as ckpt_io
    from unmask import transfer
    from unmask.config import TrainConfig

    positional, flags = parse_flags(TrainConfig, argv, max_positional=1)
    values = {**(load_preset(positional[0], TrainConfig) if positional else {}), **flags}
    explicit = frozenset(values)
    if transfer.is_transfer_start(values, explicit):
        pretrained = transfer.load_pretrained(values["pretrained_checkpoint_path"])
        values = transfer.transfer_values(values, explicit, pretrained)
        return TrainRun(TrainConfig.from_dict(values, explicit), pretrained=pretrained)
    if values.get("init_from") != "resume":
        return TrainRun(TrainConfig.from_dict(values, explicit))
    out_dir = Path(values.get("out_dir", TrainConfig.out_dir))
    path, checkpoint = ckpt_io.load_for_resume(out_dir, values.get("ckpt_filename"))
    cfg = TrainConfig.from_dict({**checkpoint["config"], **values}, explicit)
    transfer.check_resume_task(cfg, checkpoint, path)
    return TrainRun(cfg, checkpoint, path)


def build_train_config(argv: list[str]) -> tuple[Any, dict[str, Any] | None, Path | None]:
    """(config, checkpoint to resume, its path): `build_train_run` without the transfer source."""
    run = build_train_run(argv)
    return run.cfg, run.checkpoint, run.path


def run_train(argv: list[str]) -> int:
    from unmask.config import TrainConfig

    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                TrainConfig,
                "unmask train [PRESET] [--flag=value ...]",
                "Train a bidirectional transformer to fill masked characters through a curriculum of "
                "masking stages.\nPRESET: a preset name ("
                + ", ".join(available_presets())
                + ") or a .py file of plain assignments.",
            )
        )
        return 0
    run = build_train_run(argv)
    cfg = run.cfg

    from unmask.runtime import init_runtime
    from unmask.train import Trainer

    runtime = init_runtime(cfg.device, cfg.dtype, cfg.backend)
    try:
        if cfg.switch_to_binary:
            from unmask.binary_train import BinaryTrainer

            BinaryTrainer(cfg, runtime, run.checkpoint, run.path, run.pretrained).run()
        else:
            trainer = Trainer(cfg, runtime, run.checkpoint, run.path)
            if run.pretrained is not None:
                from unmask.transfer import start_language_model

                start_language_model(trainer, run.pretrained)
            trainer.run()
    finally:
        runtime.shutdown()
    return 0


def run_sample(argv: list[str]) -> int:
    from unmask.sample import main as sample_main

    return sample_main(argv)


def run_eval(argv: list[str]) -> int:
    from unmask.evaluate import main as eval_main

    return eval_main(argv)


def run_classify(argv: list[str]) -> int:
    from unmask.classify import main as classify_main

    return classify_main(argv)


def run_compare(argv: list[str]) -> int:
    from unmask.compare import main as compare_main

    return compare_main(argv)


COMMANDS = {
    "prepare": run_prepare,
    "train": run_train,
    "sample": run_sample,
    "eval": run_eval,
    "compare": run_compare,
    "classify": run_classify,
    "export": lambda argv: __import__("unmask.export", fromlist=["main"]).main(argv),
    "plot": lambda argv: __import__("unmask.plot", fromlist=["main"]).main(argv),
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
    except TrainingInterrupted as exc:
        print(f"unmask {argv[0]}: {exc}", file=sys.stderr)
        return exc.exit_code
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
