"""The objectives by name: the one list of `--objective` values.

Each name maps to "module:Class" (or a class), imported only when something asks for that objective: the config
validates `--objective` and `--help` lists the names without importing an objective module (they import the
config, so the config cannot import them), and a language-model run never imports the transfer-learning package
whose binary tasks are registered here too. `unmask compare` and `unmask export` read the names and the classes'
attributes (`Objective.params`, `Objective.length_flag`, `Objective.run_only_flags`) through
`unmask.objectives.base.objective_class`.

A new objective is one subclass of `unmask.objectives.base.Objective` and one `register("name", "pkg.mod:Class")`
(or `register("name", Class)` for a class already imported). This module imports nothing else of unmask: the config
imports it, and the objectives import the config.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Entry:
    """One registered objective: where its class is, and whether `--objective` selects it."""

    target: str | type  # "module:Class", imported on first use, or the class itself
    flag: bool  # an --objective value (the binary tasks are chosen by --switch_to_binary and --binary_task)


ENTRIES: dict[str, Entry] = {}


def register(name: str, target: str | type, *, flag: bool = True) -> None:
    """Make an objective available under `name` (replacing one of that name); `target` is "module:Class" or a
    subclass of `unmask.objectives.base.Objective`. `flag=False`: reached through
    `unmask.objectives.base.objective_name` only, not an `--objective` value."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"objective name {name!r}: lowercase letters, digits and underscores, starting with a letter")
    if isinstance(target, str) and not re.fullmatch(r"[\w.]+:\w+", target):
        raise ValueError(f"objective {name!r}: target {target!r} is not 'module:Class'")
    ENTRIES[name] = Entry(target, flag)


def names() -> tuple[str, ...]:
    """The `--objective` values, in registration order."""
    return tuple(name for name, entry in ENTRIES.items() if entry.flag)


def load(name: str) -> object:
    """What `name` is registered as, imported now if registered by module path; KeyError if nothing is.
    (`unmask.objectives.base.objective_class` checks that it is an objective.)"""
    target = ENTRIES[name].target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target


register("unmasking", "unmask.objectives.unmasking:Unmasking")
register("mdlm", "unmask.objectives.mdlm:MDLM")
register("autoregressive", "unmask.objectives.autoregressive:Autoregressive")
register("block_diffusion", "unmask.objectives.block_diffusion:BlockDiffusion")
# Transfer learning's binary tasks: plug-ins of the optional `unmask.transfer` package, imported only by their runs.
register("binary_replaced_token", "unmask.transfer.tasks:ReplacedToken", flag=False)
register("binary_sequence", "unmask.transfer.tasks:SequenceTask", flag=False)
