"""User-facing errors: one line, exit code 2, no traceback.

Anything the user can fix (a flag, a file, a stage) raises `UserError` with a message that starts with the
flag or file it is about; `unmask.cli.main` prints it as one line (`report`) and exits with code 2. Under DDP the
ranks agree on their user errors first (`unmask.runtime.Runtime.shared_user_errors`): the line is printed once,
before any rank exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_USER_ERROR = 2

_prefix = "unmask"  # "unmask <command>" once the CLI runs a command: how every error line starts


class UserError(Exception):
    """An error in user input: printed as `unmask <command>: error: <message>` and exit code 2."""

    reported = False  # set once its line is printed


class ReportedByAnotherRank(UserError):
    """Under DDP: a user error that another rank reported in its one line; this rank exits with code 2 silently."""

    reported = True


def set_command(command: str) -> None:
    """The command the error lines name (the CLI sets it before running one)."""
    global _prefix
    _prefix = f"unmask {command}"


def report(exc: UserError) -> None:
    """Print the error's one line on stderr, unless it was printed already."""
    if not exc.reported:
        print(f"{_prefix}: error: {exc}", file=sys.stderr, flush=True)
        exc.reported = True


def file_in_the_way(path: Path) -> Path | None:
    """The first parent of `path` that exists but is not a directory: creating `path` then fails with EEXIST or
    ENOTDIR, whose own text ("File exists") names neither that file nor the cause."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None
