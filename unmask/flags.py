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
import json
import math
import operator
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

from unmask.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


def _fields(cls: type) -> dict[str, Any]:
    """Public field name -> resolved type hint."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


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
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _type_name(args[0]) + "|None"
    if origin in (tuple, list):
        return "LIST"
    return getattr(hint, "__name__", str(hint)).upper()


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def convert(text: str, hint: Any, flag: str) -> Any:
    """Convert the string `text` given for `--flag` to the type `hint`; UserError naming the flag otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if text in ("None", "none", "null"):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return convert(text, inner, flag)
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


def parse_literal(text: str, what: str) -> Any:
    """A JSON or Python literal (lists, dicts, numbers, strings, True/False/None)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return safe_eval(ast.parse(text, mode="eval").body, {})
    except (SyntaxError, UserError) as exc:
        raise UserError(f"{what}: not a valid JSON or Python literal ({exc})") from None


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Type-check a value read from a preset file (already a Python object)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_value(value, inner, where)
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
    return positional, overrides


def format_help(cls: type, usage: str, description: str) -> str:
    docs = field_docs(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    lines = [f"usage: {usage}", "", description, "", "flags:"]
    for name, hint in _fields(cls).items():
        default = defaults[name]
        if isinstance(default, tuple) and default and hasattr(default[0], "to_dict"):
            default = f"{len(default)} stages"
        lines.append(f"  --{name}={_type_name(hint)}  (default: {default})")
        if docs.get(name):
            lines.extend("      " + line for line in textwrap.wrap(docs[name], 96))
    return "\n".join(lines)


# --- presets --------------------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def safe_eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate a literal expression: constants, containers, unary +/-, arithmetic, earlier names."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [safe_eval(e, names) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(safe_eval(e, names) for e in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise UserError("dict unpacking (**) is not allowed")
        return {safe_eval(k, names): safe_eval(v, names) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = safe_eval(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](safe_eval(node.left, names), safe_eval(node.right, names))
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise UserError(f"name {node.id!r} is not defined earlier in the file")
    raise UserError(f"only literals and arithmetic are allowed, found {type(node).__name__}")


def resolve_preset(ref: str) -> Path:
    """A preset given by path (`my.py`, `cfg/x.py`) or by name (`cpu` -> unmask/presets/cpu.py)."""
    path = Path(ref)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise UserError(f"{ref}: preset file not found")
        return path
    named = PRESET_DIR / f"{ref}.py"
    if not named.is_file():
        available = available_presets()
        raise UserError(f"{ref}: no such preset (available: {', '.join(available)}; or give a .py path)")
    return named


def available_presets() -> list[str]:
    """Names of the presets shipped in `unmask/presets/`."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_preset(ref: str, cls: type) -> dict[str, Any]:
    """Read a preset file of plain assignments into a dict of typed values for `cls`."""
    path = resolve_preset(ref)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read preset ({exc})") from None
    except SyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid Python syntax in preset") from None
    hints = _fields(cls)
    values: dict[str, Any] = {}
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
            value = safe_eval(stmt.value, values)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        values[key] = _check_value(value, hints[key], where)
    return values
