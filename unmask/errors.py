"""User-facing errors: one line, exit code 2, no traceback.

Anything the user can fix (a flag, a file, a stage) raises `UserError` with a message that starts with the
flag or file it is about; `unmask.cli.main` prints it as one line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in user input: printed as `unmask: error: <message>` and exit code 2."""


def file_in_the_way(path: Path) -> Path | None:
    """The first parent of `path` that exists but is not a directory: creating `path` then fails with EEXIST or
    ENOTDIR, whose own text ("File exists") names neither that file nor the cause."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None
