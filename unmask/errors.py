"""User-facing errors: one line, exit code 2, no traceback.

Anything the user can fix (a flag, a file, a stage) raises `UserError` with a message that starts with the
flag or file it is about; `unmask.cli.main` prints it as one line and exits with code 2.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in user input: printed as `unmask: error: <message>` and exit code 2."""
