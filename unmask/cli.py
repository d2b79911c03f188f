"""`unmask <command>`: a dispatch table from command names to the `main` of the module named after each command.

Commands are imported only when run, so `unmask sample` never imports the trainer. User errors print one line and
exit with code 2; a training run stopped by a signal exits with 128 + the signal number.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from unmask import __version__
from unmask.errors import EXIT_USER_ERROR, UserError, report, set_command
from unmask.training.preemption import TrainingInterrupted

# name -> (module whose `main(argv) -> int` runs it, one-line description)
COMMANDS = {
    "prepare": ("unmask.commands.prepare", "turn a text corpus into train.bin / val.bin / meta.json"),
    "train": ("unmask.commands.train", "train a model (unmasking curriculum, mdlm, autoregressive, binary heads)"),
    "sample": (
        "unmask.commands.sample",
        "generate text by iterative unmasking (prompts, infilling, strategies, metrics)",
    ),
    "eval": ("unmask.commands.eval", "likelihood of a checkpoint: ELBO / exact NLL in bits per character"),
    "compare": ("unmask.commands.compare", "train several objectives (--objectives) on the same data and budget"),
    "classify": ("unmask.transfer.classify", "score texts with a binary classifier checkpoint"),
    "export": (
        "unmask.commands.export",
        "write a checkpoint as model.safetensors + config.json + README.md (unmask.load)",
    ),
    "plot": ("unmask.commands.plot", "draw loss and val_bpc curves of one or more runs into a PNG (needs matplotlib)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: unmask <command> [flags]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`unmask <command> --help` lists a command's flags.")
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] == "--version":
        print(f"unmask {__version__}")
        return 0
    set_command(argv[0])
    try:
        if argv[0] not in COMMANDS:
            raise UserError(f"{argv[0]}: unknown command (expected one of {', '.join(COMMANDS)})")
        module = importlib.import_module(COMMANDS[argv[0]][0])
        code: int = module.main(argv[1:])
        return code
    except UserError as exc:
        report(exc)  # under DDP only the rank that reported it, before the ranks parted, printed its line
        return _leave(EXIT_USER_ERROR)
    except TrainingInterrupted as exc:
        print(f"unmask {argv[0]}: {exc}", file=sys.stderr)
        return _leave(exc.exit_code)
    except KeyboardInterrupt:
        print(f"unmask {argv[0]}: interrupted", file=sys.stderr)
        return _leave(130)


def _leave(code: int) -> int:
    """Called inside an `except` block: a torchrun worker exits right here, while the exception still holds the
    run (its traceback reaches the trainer, its DDP reducer and the process group). Leaving the block would free
    them, and the process group's destructor joins gloo's threads, which wait for a peer that may already have
    exited (a stop on another node): the rank hung forever in that join (seen in 1 of 4 two-node SIGTERM runs).
    A single process returns the code."""
    if _in_process_group():
        from unmask.runtime import exit_process

        exit_process(code)
    return code


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`unmask train --help | head`): silence the flush at exit, as a Unix tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except Exception:
        if not _in_process_group():
            raise
        traceback.print_exc()  # what the interpreter would print
        _leave(1)  # inside the block, before the traceback (and the process group it reaches) is freed
        code = 1
    if _in_process_group():
        from unmask.runtime import exit_process

        exit_process(code)  # a torchrun worker never finalizes the interpreter: see exit_process for why
    sys.exit(code)


def _in_process_group() -> bool:
    """Whether this process joined a torchrun process group. Only commands that compute import unmask.runtime
    (and torch), so `unmask --help` still starts without them."""
    if "unmask.runtime" not in sys.modules:
        return False
    from unmask.runtime import process_group_started

    return process_group_started()
