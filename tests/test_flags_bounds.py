"""Bounded presets and flag literals: huge numbers, long sequences, deep nesting and arithmetic errors are one
UserError line naming the file (and line) or the flag, found before anything is computed; numeric flags and stage
fields have ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmask.commands.train import build_train_run as build_train_config
from unmask.config.flags import load_preset
from unmask.config.train_config import TrainConfig
from unmask.errors import UserError

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
        ("--max_iters=10000000000000", "--max_iters=10000000000000 is too large (at most 1,000,000,000,000)"),
        ("--n_layer=2000", "--n_layer=2000 is too large (at most 1,024)"),
        ("--block_size=2097152", "--block_size=2097152 is too large (at most 1,048,576)"),
        ("--batch_size=2097152", "--batch_size=2097152 is too large"),
        ("--n_embd=131072", "--n_embd=131072 is too large"),
        ("--eval_iters=10000000", "--eval_iters=10000000 is too large"),
        ("--learning_rate=100", "--learning_rate=100.0 is too large (at most 10.0)"),
        ("--seed=-1", "--seed=-1 must be >= 0"),
        ("--seed=" + "9" * 30, "--seed=<30 digits> is too large"),
    ],
)
def test_numeric_flags_have_ranges(flag: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")) as exc:
        build_train_config([flag])
    assert "\n" not in str(exc.value)


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
