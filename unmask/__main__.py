"""`python -m unmask` is the `unmask` command."""

from unmask.cli import entry

entry()
