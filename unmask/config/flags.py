"""`--key=value` flags and Python preset files, read into typed config dataclasses.

Why not a CLI library: the compatibility contract is the original nanoGPT-style `--key=value` form
(`--compile=False`), stage lists given as literals, and *one-line* errors naming the flag with exit code 2.
tyro (researched first) renders errors as multi-line boxes and cannot take a list of heterogeneous stage dicts,
so this ~200-line module converts each flag by the dataclass field's type annotation instead.

Presets are small Python files of plain assignments (`n_layer = 4`, `unmasking_stages = [{...}]`). They are
parsed with `ast` and evaluated by a tiny literal evaluator (numbers, strings, lists, dicts, arithmetic,
names assigned earlier in the same file): never `exec`, never the program's globals.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal

from unmask.config.literal import MAX_SOURCE_CHARS, LiteralError, _eval, _parse_source, parse_literal, resolve_preset
from unmask.errors import UserError


def _fields(cls: type) -> dict[str, Any]:
    """Public field name -> resolved type hint."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _choices(cls: type) -> dict[str, Any]:
    """Field name -> a function returning its allowed values, for fields whose metadata names one (`choices`): a
    `str` field whose values are known only at run time (the registered objectives), checked like a Literal."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if "choices" in f.metadata}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right under each field) -> help text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(hint)) + "}"
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        names = "|".join(_type_name(a) for a in args if a is not type(None))
        return names + "|None" if type(None) in args else names
    if origin in (tuple, list):
        return "LIST"
    return getattr(hint, "__name__", str(hint)).upper()


# --- ranges of numeric flags -----------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; a DDP rank is added to the training seed
RANGE = "range"  # the key of a field's metadata that holds its `Range`


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: lo..hi, each end closed unless marked open."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    words: tuple[str, ...] = ()  # non-numeric values the flag also takes (e.g. `auto`), checked elsewhere

    def admits(self, value: float) -> bool:
        """True inside the range; False outside and for NaN (every comparison with NaN is False)."""
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}{')' if self.hi_open else ']'}"


def _number(value: float) -> str:
    """1,024 for integers and whole floats below a million (10.0 -> 10); 1e+06 and 0.5 as %g writes them."""
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e6):
        return f"{int(value):,}"
    return f"{value:g}"


def bounded(
    default: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, words: tuple[str, ...] = ()
) -> Any:
    """A dataclass field whose flag accepts only lo..hi (each end closed unless marked open), or one of `words`;
    `check_ranges` in the dataclass's `__post_init__` enforces it, so flags, presets, saved configs and the library
    are all checked."""
    return dataclasses.field(default=default, metadata={RANGE: Range(lo, hi, lo_open, hi_open, words)})


def field_range(field: dataclasses.Field[Any]) -> Range | None:
    """The declared range of a field (None: not a numeric flag with a range)."""
    found = field.metadata.get(RANGE)
    return found if isinstance(found, Range) else None


def shown(value: Any) -> str:
    """A flag value as an error message shows it: long integers by their number of digits."""
    text = str(value)
    return text if len(text) <= 24 else f"<{len(text.lstrip('-'))} digits>"


def check_range(flag: str, value: Any, allowed: Range) -> None:
    """UserError `--flag=value: must be in [lo, hi]` unless `value` (a number, or a list of numbers) is in range."""
    if isinstance(value, str) and value in allowed.words:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            words = "".join(f" or {w}" for w in allowed.words)
            raise UserError(f"{flag}={shown(value)}: expected a number in {allowed}{words}")
        if not allowed.admits(item):
            raise UserError(f"{flag}={shown(value)}: must be in {allowed}")


def check_values(cls: type, values: dict[str, Any]) -> None:
    """`check_range` for each value in `values` whose field of the dataclass `cls` declares a range (see `bounded`);
    None passes (an optional flag left unset)."""
    for field in dataclasses.fields(cls):
        allowed = field_range(field)
        if allowed is not None and values.get(field.name) is not None:
            check_range(f"--{field.name}", values[field.name], allowed)


def check_ranges(config: Any) -> None:
    """Check every field of the dataclass instance `config` that declares a range. Called first in each argument
    dataclass's `__post_init__`, before a value can reach arithmetic or torch."""
    check_values(type(config), vars(config))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _words(union: Any) -> tuple[Any, ...]:
    """The choices of the Literal members of a Union hint."""
    args = typing.get_args(union)
    return tuple(w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a))


def _main_type(union: Any) -> Any:
    """The member of a Union hint a value that is not None nor a Literal word must have: the first other member
    (the Literal itself when there is none, so its error lists the choices)."""
    args = [a for a in typing.get_args(union) if a is not type(None)]
    return next((a for a in args if typing.get_origin(a) is not Literal), args[0])


def convert(text: str, hint: Any, flag: str) -> Any:
    """Convert the string `text` given for `--flag` to the type `hint`; UserError naming the flag otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in typing.get_args(hint) and text in ("None", "none", "null"):
            return None
        if text in _words(hint):  # a word of a Literal member, e.g. `auto` of `tuple[float, float] | Literal["auto"]`
            return text
        return convert(text, _main_type(hint), flag)
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise UserError(f"--{flag}={text}: expected one of {', '.join(map(str, choices))}")
        return text
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UserError(f"--{flag}={text}: expected True or False")
    if hint is int:
        if len(text.strip().lstrip("+-")) > 80:  # int() of a 4,000-digit text is slow and no flag needs one
            raise UserError(f"--{flag}=<{len(text)} characters>: expected an integer of at most 80 digits")
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{flag}={text}: expected an integer") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--{flag}={text}: expected a number") from None
        if not math.isfinite(value):
            raise UserError(f"--{flag}={text}: expected a finite number")
        return value
    if hint is str:
        return text
    if origin in (tuple, list):
        return parse_literal(text, f"--{flag}")
    raise TypeError(f"no flag converter for {hint!r} (field {flag})")


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Type-check a value read from a preset file (already a Python object)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        if isinstance(value, str) and value in _words(hint):
            return value
        return _check_value(value, _main_type(hint), where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: expected one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return value
    if hint in (bool, int, float, str) and type(value) is not hint:
        raise UserError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_flags(cls: type, argv: list[str], max_positional: int) -> tuple[list[str], dict[str, Any]]:
    """Split `argv` into positional arguments and typed `--key=value` overrides for `cls`.

    Accepts `--key=value`, `--key value` and a bare `--key` for booleans (True).
    """
    hints = _fields(cls)
    choices = _choices(cls)
    positional: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if arg.startswith("-") and len(arg) > 1:
                raise UserError(f"{arg}: unknown option (flags are written --key=value)")
            positional.append(arg)
            if len(positional) > max_positional:
                raise UserError(f"{arg}: unexpected positional argument")
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1, cutoff=0.75)
            guess = f"did you mean --{close[0]}? " if close else ""
            raise UserError(f"--{key}: unknown flag ({guess}see --help)")
        hint = hints[key]
        if not eq:
            if hint is bool:
                text = "True"
            elif i < len(argv) and not argv[i].startswith("--"):
                text = argv[i]
                i += 1
            else:
                raise UserError(f"--{key}: missing value (write --{key}=VALUE)")
        overrides[key] = convert(text, hint, key)
        if key in choices and text not in choices[key]():
            raise UserError(f"--{key}={text}: expected one of {', '.join(choices[key]())}")
    return positional, overrides


def format_help(cls: type, usage: str, description: str) -> str:
    docs = field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    choices = _choices(cls)
    lines = [f"usage: {usage}", "", description, "", "flags:"]
    for name, hint in _fields(cls).items():
        default = fields[name].default
        if isinstance(default, tuple) and default and hasattr(default[0], "to_dict"):
            default = f"{len(default)} stages"
        allowed = field_range(fields[name])
        within = f" in {allowed}" if allowed is not None else ""
        kind = "{" + ",".join(choices[name]()) + "}" if name in choices else _type_name(hint)
        lines.append(f"  --{name}={kind}{within}  (default: {default})")
        if docs.get(name):
            lines.extend("      " + line for line in textwrap.wrap(docs[name], 96))
    return "\n".join(lines)


# --- presets --------------------------------------------------------------------------------------------------


def load_preset(ref: str, cls: type) -> dict[str, Any]:
    """Read a preset file of plain assignments into a dict of typed values for `cls`."""
    path = resolve_preset(ref)
    try:
        if path.stat().st_size > 4 * MAX_SOURCE_CHARS:  # before reading it: UTF-8 has at most 4 bytes a character
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, far more than a preset of plain assignments")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read preset ({exc})") from None
    tree = _parse_source(text, str(path), "exec")
    assert isinstance(tree, ast.Module)
    hints = _fields(cls)
    choices = _choices(cls)
    values: dict[str, Any] = {}
    weighted: dict[str, tuple[Any, int]] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or bare string
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise UserError(f"{path}:{stmt.lineno}: presets hold only plain assignments `name = value`")
        key = stmt.targets[0].id
        where = f"{path}:{stmt.lineno}: {key}"
        if key not in hints:
            raise UserError(f"{where}: unknown key (not a flag of this command)")
        try:
            value, weight = _eval(stmt.value, weighted, 0)
        except LiteralError as exc:
            line = exc.lineno if exc.lineno is not None else stmt.lineno
            raise UserError(f"{path}:{line}: {key}: {exc}") from None
        values[key] = _check_value(value, hints[key], where)
        if key in choices and values[key] not in choices[key]():
            raise UserError(f"{where}: expected one of {', '.join(choices[key]())}, got {values[key]!r}")
        weighted[key] = (values[key], weight)
    return values
