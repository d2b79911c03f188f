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


def parse_literal(text: str, what: str) -> Any:
    """A JSON or Python literal (lists, dicts, numbers, strings, True/False/None), within the preset bounds."""
    if len(text) > MAX_SOURCE_CHARS:
        raise UserError(f"{what}: {len(text):,} characters, more than the {MAX_SOURCE_CHARS:,} a literal may have")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):  # not JSON, too deep, or an over-long integer
        pass
    else:
        try:
            _check_json(value)
        except UserError as exc:
            raise UserError(f"{what}: {exc}") from None
        return value
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UserError(f"{what}: not a valid JSON or Python literal ({exc.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise UserError(f"{what}: not a valid JSON or Python literal (too deeply nested or malformed)") from None
    try:
        return safe_eval(tree.body, {})
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


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
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    choices = _choices(cls)
    lines = [f"usage: {usage}", "", description, "", "flags:"]
    for name, hint in _fields(cls).items():
        default = defaults[name]
        if isinstance(default, tuple) and default and hasattr(default[0], "to_dict"):
            default = f"{len(default)} stages"
        kind = "{" + ",".join(choices[name]()) + "}" if name in choices else _type_name(hint)
        lines.append(f"  --{name}={kind}  (default: {default})")
        if docs.get(name):
            lines.extend("      " + line for line in textwrap.wrap(docs[name], 96))
    return "\n".join(lines)


# --- presets --------------------------------------------------------------------------------------------------

# Bounds on what a preset or a flag literal may hold. A literal evaluator without them hangs on `9**9**9` (a
# 370-million-digit integer) and exhausts memory on `[[0] * 10**5] * 10**5`; no real configuration comes near.
MAX_SOURCE_CHARS = 1_000_000  # a preset file or one flag's literal
MAX_DEPTH = 64  # nesting of containers and operators
MAX_INT_BITS = 256  # about 77 decimal digits: seeds, iteration counts and sizes fit with room to spare
MAX_STR_CHARS = 100_000
MAX_ITEMS = 1_000_000  # values in one container tree (a shared sub-list counts every time it is referenced)


class LiteralError(UserError):
    """A literal that cannot be evaluated; `lineno` is the line of the sub-expression at fault (None: unknown)."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message)
        self.lineno = lineno


def _too_big(node: ast.AST, what: str) -> LiteralError:
    return LiteralError(f"{what} is beyond the limits of a configuration literal", getattr(node, "lineno", None))


def _int_bits(value: int) -> int:
    return abs(value).bit_length()


def _weight(value: Any, budget: int = MAX_ITEMS) -> int:
    """How many values `value` holds, counting into containers; stops counting past `budget`."""
    if not isinstance(value, (list, tuple, dict)):
        return 1
    total = 1
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    for item in items:
        total += _weight(item, budget - total)
        if total > budget:
            break
    return total


def _check_scalar(value: Any, node: ast.AST) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if _int_bits(value) > MAX_INT_BITS:
            raise _too_big(node, f"an integer of {len(str(abs(value)))} digits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise LiteralError(f"{value} is not a finite number (overflow?)", getattr(node, "lineno", None))
    elif isinstance(value, str):
        if len(value) > MAX_STR_CHARS:
            raise _too_big(node, f"a string of {len(value):,} characters")
    elif not isinstance(value, (list, tuple, dict)):
        kind = type(value).__name__
        raise LiteralError(f"a {kind} value is not allowed (numbers, strings, lists, dicts, True/False/None)")


def _result_bits(op: ast.operator, left: Any, right: Any) -> int | None:
    """A cheap upper bound on the bits of `left op right` for integers, computed before the operation."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return None
    if isinstance(op, ast.Pow):
        if right < 0 or abs(left) <= 1:
            return 1 if abs(left) <= 1 else None  # a float result (or 0, 1, -1): bounded by itself
        return math.ceil(right * math.log2(abs(left)))  # exact up to rounding: 2**255 passes, 2**300 does not
    if isinstance(op, ast.Mult):
        return _int_bits(left) + _int_bits(right)
    if isinstance(op, ast.LShift):
        return _int_bits(left) + max(right, 0)
    return max(_int_bits(left), _int_bits(right)) + 1


def _sequence_repeat(op: ast.operator, left: Any, right: Any) -> tuple[Any, int] | None:
    """(sequence, count) when `op` repeats a string, list or tuple."""
    if not isinstance(op, ast.Mult):
        return None
    if isinstance(left, (str, list, tuple)) and isinstance(right, int) and not isinstance(right, bool):
        return left, right
    if isinstance(right, (str, list, tuple)) and isinstance(left, int) and not isinstance(left, bool):
        return right, left
    return None


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
}
_SYMBOL = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
}


def _binary(node: ast.BinOp, left: tuple[Any, int], right: tuple[Any, int]) -> tuple[Any, int]:
    """`left op right` with every size checked before it is computed; errors carry the line."""
    (a, wa), (b, wb), op = left, right, node.op
    symbol = _SYMBOL[type(op)]
    bits = _result_bits(op, a, b)
    if bits is not None and bits > MAX_INT_BITS:
        raise _too_big(node, f"the result of {symbol} (about {int(bits * 0.30103) + 1:,} digits)")
    weight = wa + wb
    repeat = _sequence_repeat(op, a, b)
    if repeat is not None:
        seq, count = repeat
        limit = MAX_STR_CHARS if isinstance(seq, str) else MAX_ITEMS
        size = len(seq) * max(count, 0) if isinstance(seq, str) else (_weight(seq) - 1) * max(count, 0)
        if size > limit:
            raise _too_big(node, f"repeating a {type(seq).__name__} {count:,} times ({size:,} values)")
        weight = size + 1
    elif isinstance(op, ast.Add) and isinstance(a, str) and isinstance(b, str) and len(a) + len(b) > MAX_STR_CHARS:
        raise _too_big(node, f"a string of {len(a) + len(b):,} characters")
    if weight > MAX_ITEMS:
        raise _too_big(node, f"a value of {weight:,} items")
    try:
        value = _BINARY[type(op)](a, b)
    except (ArithmeticError, TypeError, ValueError) as exc:
        raise LiteralError(f"{symbol}: {exc}", node.lineno) from None
    if isinstance(value, complex):
        raise LiteralError(f"{symbol}: the result {value} is a complex number", node.lineno)
    _check_scalar(value, node)
    return value, weight


def _eval(node: ast.AST, names: dict[str, tuple[Any, int]], depth: int) -> tuple[Any, int]:
    """(value, how many values it holds) of a literal expression; every step bounded (see MAX_*)."""
    if depth > MAX_DEPTH:
        raise LiteralError(f"nested deeper than {MAX_DEPTH} levels", getattr(node, "lineno", None))
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, type(None))):
            raise LiteralError(f"a {type(node.value).__name__} literal is not allowed", node.lineno)
        _check_scalar(node.value, node)
        return node.value, 1
    if isinstance(node, (ast.List, ast.Tuple)):
        if len(node.elts) > MAX_ITEMS:
            raise _too_big(node, f"a list of {len(node.elts):,} items")
        items = [_eval(e, names, depth + 1) for e in node.elts]
        weight = 1 + sum(w for _, w in items)
        if weight > MAX_ITEMS:
            raise _too_big(node, f"a value of {weight:,} items")
        values = [v for v, _ in items]
        return (values if isinstance(node, ast.List) else tuple(values)), weight
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise LiteralError("dict unpacking (**) is not allowed", node.lineno)
        keys = [k for k in node.keys if k is not None]
        pairs = [
            (_eval(k, names, depth + 1), _eval(v, names, depth + 1)) for k, v in zip(keys, node.values, strict=True)
        ]
        weight = 1 + sum(wk + wv for (_, wk), (_, wv) in pairs)
        if weight > MAX_ITEMS:
            raise _too_big(node, f"a value of {weight:,} items")
        try:
            return {k: v for (k, _), (v, _) in pairs}, weight
        except TypeError as exc:  # an unhashable key such as a list
            raise LiteralError(f"dict key: {exc}", node.lineno) from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value, weight = _eval(node.operand, names, depth + 1)
        try:
            return (-value if isinstance(node.op, ast.USub) else +value), weight
        except TypeError as exc:
            raise LiteralError(f"unary {'-' if isinstance(node.op, ast.USub) else '+'}: {exc}", node.lineno) from None
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(node, _eval(node.left, names, depth + 1), _eval(node.right, names, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id], 1
        raise LiteralError(f"name {node.id!r} is not defined earlier in the file", node.lineno)
    raise LiteralError(
        f"only literals and arithmetic are allowed, found {type(node).__name__}", getattr(node, "lineno", None)
    )


def safe_eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate a literal expression: constants, containers, unary +/-, arithmetic (+ - * / // % ** <<), names
    assigned earlier; sizes, nesting and every intermediate result are bounded (MAX_*) before they are computed."""
    weighted = {name: (value, _weight(value)) for name, value in names.items()}
    return _eval(node, weighted, 0)[0]


def _parse_source(text: str, what: str, mode: str) -> ast.AST:
    """`ast.parse` with the source size bounded and the parser's own limits turned into one-line errors."""
    if len(text) > MAX_SOURCE_CHARS:
        raise UserError(
            f"{what}: {len(text):,} characters, more than the {MAX_SOURCE_CHARS:,} a configuration may have"
        )
    try:
        return ast.parse(text, filename=what, mode=mode)
    except SyntaxError as exc:
        raise UserError(f"{what}:{exc.lineno}: invalid Python syntax ({exc.msg})") from None
    except (RecursionError, MemoryError, ValueError) as exc:  # nesting the parser cannot handle; NUL bytes
        raise UserError(f"{what}: cannot parse ({type(exc).__name__}: too deeply nested or malformed)") from None


def _check_json(value: Any, depth: int = 0) -> int:
    """A JSON value within the literal bounds; returns its weight."""
    if depth > MAX_DEPTH:
        raise LiteralError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        weight = 1 + len(value) if isinstance(value, dict) else 1
        for item in items:
            weight += _check_json(item, depth + 1)
            if weight > MAX_ITEMS:
                raise LiteralError(f"more than {MAX_ITEMS:,} values")
        return weight
    _check_scalar(value, ast.Constant(value=None))
    return 1


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
