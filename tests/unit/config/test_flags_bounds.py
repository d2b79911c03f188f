"""Bounded presets and flag literals: huge numbers, long sequences, deep nesting and arithmetic errors are one
UserError line naming the file (and line) or the flag, found before anything is computed; every numeric flag of
every command, and every stage field, has a range."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from unmask.cli import COMMANDS
from unmask.cli import main as cli_main
from unmask.commands.compare import CompareArgs
from unmask.commands.eval import EvalArgs
from unmask.commands.export import ExportArgs
from unmask.commands.plot import PlotArgs
from unmask.commands.prepare import PrepareArgs
from unmask.commands.sample import SampleArgs
from unmask.commands.train import build_train_run as build_train_config
from unmask.config.flags import Range, check_range, field_range, load_preset
from unmask.config.train_config import TrainConfig
from unmask.errors import UserError
from unmask.transfer.classify import ClassifyArgs

STAGE = '{"type": "span", "spans_count": 4}'


def _preset_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.py"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_preset(str(path), TrainConfig)
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{path}:"), message
    return message.removeprefix(f"{path}:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_iters = 9**9**9\n", "1: max_iters: the result of ** (about"),
        (
            "n_layer = 2\nunmasking_stages = [\n    {'type': 'span',\n     'spans_count': 9**9**9},\n]\n",
            "4: unmasking_stages",
        ),
        ("max_iters = 10**400\n", "1: max_iters: the result of ** (about 401 digits) is beyond the limits"),
        ("max_iters = 1 << 10**6\n", "1: max_iters: the result of << "),
        ("max_iters = 1/0\n", "1: max_iters: /: division by zero"),
        ("max_iters = 7 // 0\n", "1: max_iters: //: integer division or modulo by zero"),
        ("max_iters = 5 % 0\n", "1: max_iters: %: integer"),
        ("learning_rate = 10.0**400\n", "1: learning_rate: **: "),
        ("learning_rate = 1e308 * 10\n", "1: learning_rate: inf is not a finite number"),
        ("learning_rate = (-1) ** 0.5\n", "1: learning_rate: **: the result"),
        ("dataset = 'ab' + 1\n", "1: dataset: +: "),
        ("dataset = 'x' * 10**9\n", "1: dataset: repeating a str 1,000,000,000 times"),
        ("unmasking_stages = [0] * 10**7\n", "1: unmasking_stages: repeating a list 10,000,000 times"),
        ("unmasking_stages = [[0] * 10**5] * 10**5\n", "1: unmasking_stages: repeating a list 100,000 times"),
        (
            "validation_stages = [0] * 600000\nunmasking_stages = [validation_stages, validation_stages]\n",
            "2: unmasking_stages: a value of 1,200,003 items",
        ),
        ("unmasking_stages = " + "[" * 150 + "]" * 150 + "\n", "1: unmasking_stages: nested deeper than 64 levels"),
        ("unmasking_stages = " + "[" * 5000 + "]" * 5000 + "\n", "1: invalid Python syntax"),
        ("max_iters = " + "1+" * 100000 + "1\n", "cannot parse (RecursionError"),
        ("max_iters = " + "-" * 100000 + "1\n", "cannot parse (MemoryError"),
        ("max_iters = 1j\n", "1: max_iters: a complex literal is not allowed"),
        ("dataset = b'x'\n", "1: dataset: a bytes literal is not allowed"),
    ],
)
def test_preset_literals_are_bounded(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _preset_error(tmp_path, text)


def test_a_huge_preset_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    assert "2,000,000 characters, more than the 1,000,000" in _preset_error(tmp_path, "# padding\n" * 200_000)
    assert "5,000,000 bytes, far more than a preset" in _preset_error(tmp_path, "# padding\n" * 500_000)


def test_real_literals_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "ok.py"
    path.write_text(f"max_iters = 2 ** 20\nlearning_rate = 3e-4 * 2\nunmasking_stages = [{STAGE}] * 3\n")
    values = load_preset(str(path), TrainConfig)
    assert values["max_iters"] == 2**20 and values["learning_rate"] == 6e-4 and len(values["unmasking_stages"]) == 3


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ('--unmasking_stages=[{"type": "span", "spans_count": 9**9**9}]', "--unmasking_stages: the result of **"),
        ("--unmasking_stages=[1/0]", "--unmasking_stages: /: division by zero"),
        ("--unmasking_stages=" + "[" * 100000 + "]" * 100000, "--unmasking_stages: not a valid JSON or Python literal"),
        ("--unmasking_stages=[" + "1" * 5000 + "]", "--unmasking_stages: "),
        ("--unmasking_stages=" + "[" * 100 + "]" * 100, "--unmasking_stages: nested deeper than 64 levels"),
        ('--unmasking_stages=[{"type": "span", "spans_count": 1e999}]', "not a finite number"),
        ("--max_iters=" + "9" * 5000, "--max_iters=<5000 characters>: expected an integer of at most 80 digits"),
    ],
)
def test_flag_literals_are_bounded(flag: str, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        build_train_config([flag])
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400 and expected in message, message[:400]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--max_iters=10000000000000", "--max_iters=10000000000000: must be in [0, 1,000,000,000,000]"),
        ("--n_layer=2000", "--n_layer=2000: must be in [1, 1,024]"),
        ("--block_size=2097152", "--block_size=2097152: must be in [1, 1,048,576]"),
        ("--batch_size=2097152", "--batch_size=2097152: must be in [1, "),
        ("--n_embd=131072", "--n_embd=131072: must be in [1, 65,536]"),
        ("--eval_iters=10000000", "--eval_iters=10000000: must be in [1, 1,000,000]"),
        ("--learning_rate=100", "--learning_rate=100.0: must be in [0, 10]"),
        ("--adam_eps=0", "--adam_eps=0.0: must be in (0, 1]"),
        ("--beta2=1", "--beta2=1.0: must be in [0, 1)"),
        ("--grad_clip=1e7", "--grad_clip=10000000.0: must be in [0, 1e+06]"),
        ("--seed=-1", "--seed=-1: must be in [0, 9,223,372,036,854,775,807]"),
        ("--seed=" + "9" * 30, "--seed=<30 digits>: must be in [0, "),
        ("--mask_rate_window=[0.5, 2]", "--mask_rate_window=[0.5, 2]: must be in [0, 1]"),
    ],
)
def test_numeric_flags_have_ranges(flag: str, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        build_train_config([flag])
    assert str(exc.value).startswith(expected), str(exc.value)


# --- every numeric flag of every command has a range -----------------------------------------------------------

# The argument dataclasses of each command; test_every_command_is_listed keeps this complete.
COMMAND_ARGS: dict[str, tuple[type, ...]] = {
    "prepare": (PrepareArgs,),
    "train": (TrainConfig,),
    "sample": (SampleArgs,),
    "eval": (EvalArgs,),
    "compare": (CompareArgs, TrainConfig),
    "classify": (ClassifyArgs,),
    "export": (ExportArgs,),
    "plot": (PlotArgs,),
}


def _is_numeric(hint: Any) -> bool:
    """int or float, optional or in a tuple/list (bool and Literal choices are not numbers to bound)."""
    if hint in (int, float):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType, tuple, list):
        return any(_is_numeric(a) for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis)
    return False


NUMERIC_FLAGS = [
    (command, cls, field)
    for command, classes in COMMAND_ARGS.items()
    for cls in classes
    for field in dataclasses.fields(cls)
    if field.init and not field.name.startswith("_") and _is_numeric(typing.get_type_hints(cls)[field.name])
]


def test_every_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(COMMAND_ARGS) == set(COMMANDS)
    for command, classes in COMMAND_ARGS.items():
        assert cli_main([command, "--help"]) == 0
        shown = set(re.findall(r"^  --(\w+)=", capsys.readouterr().out, re.M))
        declared = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
        assert shown == declared, (command, shown ^ declared)
    assert len(NUMERIC_FLAGS) > 60  # the walk finds the numeric flags (train alone has over 30)


@pytest.mark.parametrize(("command", "cls", "field"), NUMERIC_FLAGS, ids=lambda v: getattr(v, "name", str(v)))
def test_every_numeric_flag_has_a_range(command: str, cls: type, field: dataclasses.Field[Any]) -> None:
    allowed = field_range(field)
    assert allowed is not None, f"{cls.__name__}.{field.name}: declare its range with unmask.config.flags.bounded"
    if field.default is not None:
        check_range(f"--{field.name}", field.default, allowed)  # the default lies in its own range


@pytest.mark.parametrize(("command", "cls", "field"), NUMERIC_FLAGS, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("value", [10**30, -1])
def test_out_of_range_values_are_one_line_errors(
    command: str,
    cls: type,
    field: dataclasses.Field[Any],
    value: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the command line (exit 2, one line naming the flag, nothing written) and the dataclass itself
    (presets, saved configs and the library construct it)."""
    is_list = typing.get_origin(typing.get_type_hints(cls)[field.name]) in (tuple, list)
    text = f"[{value}, {value}]" if is_list else str(value)
    monkeypatch.chdir(tmp_path)
    assert cli_main([command, f"--{field.name}={text}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"unmask {command}: error: --{field.name}="), err
    assert "must be in" in err, err
    assert not any(tmp_path.iterdir())
    with pytest.raises(UserError) as exc:
        cls(**{field.name: [value, value] if is_list else value})
    assert str(exc.value).startswith(f"--{field.name}=") and "\n" not in str(exc.value)


def test_ranges_and_their_messages() -> None:
    closed, half_open = Range(1, 1024), Range(0.0, 1.0, hi_open=True)
    assert closed.admits(1) and closed.admits(1024) and not closed.admits(0) and not closed.admits(1025)
    assert half_open.admits(0.0) and not half_open.admits(1.0) and not half_open.admits(math.nan)
    assert (str(closed), str(half_open), str(Range(0.0, 1e6, lo_open=True))) == ("[1, 1,024]", "[0, 1)", "(0, 1e+06]")
    with pytest.raises(UserError, match=r"^--x=nan: must be in \[0, 1\)$"):
        check_range("--x", math.nan, half_open)
    with pytest.raises(UserError, match=r"^--x=many: expected a number in \[1, 1,024\]$"):
        check_range("--x", "many", closed)
    with pytest.raises(UserError, match=r"^--temperature=nan: must be in \[0, 1,000\]$"):
        SampleArgs(temperature=math.nan)  # the library path: NaN never reaches the sampler


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            '{"type": "span", "spans_count": 4, "iters": 10**13}',
            "iters=10000000000000 must be <= 1,000,000,000,000",
        ),
        ('{"type": "span", "spans_count": 2**21}', "spans_count=2097152 must be <= 1,048,576"),
        ('{"type": "span", "spans_count": 4, "val_loss_stale_count": 10**7}', "val_loss_stale_count=10000000 must be"),
        ('{"type": "span", "spans_count": 4, "epochs": 1e7}', "epochs=10000000.0 must be <= 1e+06"),
        ('{"type": "span", "spans_count": 4, "lr_factor": 1e4}', "lr_factor=10000.0 must be <= 1,000"),
    ],
)
def test_stage_fields_have_ranges(stage: str, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        build_train_config([f"--unmasking_stages=[{stage}]"])
    assert str(exc.value).startswith("--unmasking_stages[0]: ") and expected in str(exc.value), str(exc.value)


def test_the_number_of_stages_is_bounded() -> None:
    with pytest.raises(UserError, match=r"--unmasking_stages: 2,000 stages, more than 1024"):
        build_train_config([f"--unmasking_stages=[{STAGE}] * 2000"])
