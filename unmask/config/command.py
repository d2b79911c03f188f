"""What every command's `main` starts with: `--help`, then flags parsed into the command's dataclass, with the
one device-name check of every command that has a `--device` flag."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from unmask.config.flags import format_help, parse_flags

T = TypeVar("T")


def parse_command(
    cls: type[T],
    argv: list[str],
    usage: str,
    description: str,
    max_positional: int = 0,
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[list[str], T] | None:
    """(positional arguments, the command's arguments), or None after printing `--help`.

    `adjust` may rewrite the parsed flag values before construction (e.g. a preset's defaults under the flags).
    Bad flags raise `UserError` (one line, exit code 2).
    """
    if "--help" in argv or "-h" in argv:
        print(format_help(cls, usage, description))
        return None
    positional, flags = parse_flags(cls, argv, max_positional=max_positional)
    if adjust is not None:
        flags = adjust(flags)
    if isinstance(flags.get("device"), str):
        from unmask.runtime import check_device_name  # (imports torch: only commands with a --device do)

        check_device_name(flags["device"])  # before anything is loaded: torch would raise a traceback
    return positional, cls(**flags)
