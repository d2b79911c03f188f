"""Flag parsing, presets and config validation: the seed's `--key=value` contract and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmask.commands.train import build_train_run
from unmask.config.flags import convert, load_preset, parse_flags
from unmask.config.train_config import TrainConfig
from unmask.curriculum.stages import RandomStage, SpanStage, StickyStage, default_curriculum
from unmask.errors import UserError

README_CPU_COMMAND = [
    "--training_type=unmasking",
    "--device=cpu",
    "--compile=False",
    "--batch_size=8",
    "--block_size=256",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=10000",
    "--learning_rate=5e-4",
]


def test_readme_cpu_command_parses_verbatim() -> None:
    run = build_train_run(README_CPU_COMMAND)
    cfg, ckpt = run.cfg, run.checkpoint
    assert ckpt is None
    assert (cfg.device, cfg.compile, cfg.batch_size, cfg.block_size) == ("cpu", False, 8, 256)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_iters) == (4, 4, 128, 10000)
    assert cfg.learning_rate == 5e-4
    assert cfg.unmasking_stages == default_curriculum(10000)  # no stage configuration: the default curriculum


def test_seed_readme_flag_forms() -> None:
    _, flags = parse_flags(
        TrainConfig,
        [
            "--compile=True",
            "--bias",
            "--eval_iters",
            "7",
            "--min_lr=None",
            "--init_from=resume",
            "--ckpt_filename=ckpt_unmasking_10.pt",
        ],
        0,
    )
    assert flags == {
        "compile": True,
        "bias": True,
        "eval_iters": 7,
        "min_lr": None,
        "init_from": "resume",
        "ckpt_filename": "ckpt_unmasking_10.pt",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus=1"], "--bogus: unknown flag"),
        (["--learing_rate=1e-3"], "--learing_rate: unknown flag (did you mean --learning_rate"),
        (["--batch_size=abc"], "--batch_size=abc: expected an integer"),
        (["--learning_rate=fast"], "--learning_rate=fast: expected a number"),
        (["--compile=maybe"], "--compile=maybe: expected True or False"),
        (["--init_from=gpt2"], "--init_from=gpt2: expected one of scratch, resume"),
        (["--objective=gpt"], "--objective=gpt: expected one of unmasking, mdlm, autoregressive, block_diffusion"),
        (["--batch_size"], "--batch_size: missing value"),
        (["-x"], "-x: unknown option"),
        (["a.py", "b.py"], "b.py: unexpected positional argument"),
    ],
)
def test_flag_errors_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as exc:
        build_train_run(argv)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--unmasking_stages=[{'type': 'sticky', 'target_masked_ratio': 1.5, 'p1_probability': 0.1, "
            "'p2_probability': 0.1}]",
            r"unmasking_stages\[0\]: target_masked_ratio=1.5 is outside \[0, 1\]",
        ),
        ("--unmasking_stages=[{'type': 'blur'}]", r"unmasking_stages\[0\]: unknown stage type 'blur'"),
        ("--unmasking_stages=[{'max_masked_ratio': 0.2}]", r"unmasking_stages\[0\]: missing key 'type'"),
        ("--unmasking_stages=[{'type': 'random'}]", r"missing key\(s\) 'max_masked_ratio'"),
        (
            '--unmasking_stages=[{"type": "random", "max_masked_ratio": 0.2, "colour": 1}]',
            r"unknown key\(s\) 'colour'",
        ),
        ("--unmasking_stages=[{'type': 'span', 'spans_count': 0}]", r"spans_count=0 must be >= 1"),
        ("--unmasking_stages=[]", "the list of stages is empty"),
        ("--n_embd=130", r"--n_embd=130 must be divisible by --n_head=6"),
        ("--dropout=1.5", r"--dropout=1.5: must be in \[0, 1\)"),
        ("--batch_size=0", r"--batch_size=0: must be in \[1, 1,048,576\]"),
        ("--device=tpu", "--device=tpu: expected auto"),
        ("--unmasking_stages=[{", "--unmasking_stages: not a valid JSON or Python literal"),
    ],
)
def test_invalid_values_and_stages(flag: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_train_run([flag])


def test_stage_list_as_json_and_python_literal() -> None:
    cfg = build_train_run(
        [
            '--unmasking_stages=[{"type": "random", "max_masked_ratio": 0.3, "val_loss_stale_count": 2},'
            ' {"type": "span", "spans_count": 4}]',
            "--validation_stages=[{'type': 'sticky', 'target_masked_ratio': 0.5, 'p1_probability': 0.2, "
            "'p2_probability': 0.8}]",
        ]
    ).cfg
    assert cfg.unmasking_stages == (
        RandomStage(max_masked_ratio=0.3, val_loss_stale_count=2),
        SpanStage(spans_count=4),
    )
    assert cfg.stages_for_validation == (StickyStage(target_masked_ratio=0.5, p1_probability=0.2, p2_probability=0.8),)


def test_named_presets_load_and_flags_override() -> None:
    cfg = build_train_run(["cpu", "--max_iters=12"]).cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.max_iters) == (4, 128, 256, 8, 12)
    gpu = build_train_run(["gpu"]).cfg
    assert (gpu.device, gpu.dtype, gpu.compile, gpu.block_size) == ("cuda", "float16", True, 1024)
    quick = build_train_run(["quickstart"]).cfg
    cpu = build_train_run(["cpu"]).cfg
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "device", "dtype"):
        assert getattr(quick, name) == getattr(cpu, name), name
    # Durations 150 + 150 + 200 fit the quickstart's 1,000 iterations; the final stage reaches full masking.
    assert [s.iters for s in quick.unmasking_stages[:3]] == [150, 150, 200]
    assert sum(s.iters for s in quick.unmasking_stages[:3]) < quick.max_iters == 1000
    assert quick.unmasking_stages[-1].masking_rate_range == (0.0, 1.0)


def test_preset_file_with_readme_stages(tmp_path: Path) -> None:
    preset = tmp_path / "mine.py"
    preset.write_text(
        '"""My preset."""\n'
        "learning_rate = 1e-3\n"
        "min_lr = learning_rate / 10\n"
        "unmasking_stages = [\n"
        '    {"type": "sticky", "target_masked_ratio": 0.2, "p1_probability": 0.3, "p2_probability": 0.0,\n'
        '     "val_loss_stale_count": 5},  # comment\n'
        '    {"type": "random", "max_masked_ratio": 0.7, "val_loss_stale_count": 8},\n'
        "]\n"
    )
    cfg = build_train_run([str(preset)]).cfg
    assert cfg.min_lr == pytest.approx(1e-4)
    assert cfg.unmasking_stages[1] == RandomStage(max_masked_ratio=0.7, val_loss_stale_count=8)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import os\n", "presets hold only plain assignments"),
        ("n_layer = __import__('os')\n", "only literals and arithmetic"),
        ("n_layer = 'four'\n", "n_layer: expected int"),
        ("colour = 3\n", "colour: unknown key"),
        ("objective = 'gpt'\n", "bad.py:1: objective: expected one of unmasking, mdlm, autoregressive, block"),
        ("n_layer = width\n", "name 'width' is not defined"),
        ("n_layer = (\n", "invalid Python syntax"),
    ],
)
def test_preset_errors(tmp_path: Path, body: str, message: str) -> None:
    preset = tmp_path / "bad.py"
    preset.write_text(body)
    with pytest.raises(UserError, match=message):
        load_preset(str(preset), TrainConfig)


def test_missing_preset_lists_available() -> None:
    with pytest.raises(UserError, match=r"no such preset \(available: cpu, gpu"):
        build_train_run(["nosuch"])


def test_convert_optional_and_bool_spellings() -> None:
    assert convert("false", bool, "x") is False and convert("1", bool, "x") is True
    assert convert("None", int | None, "x") is None and convert("3", int | None, "x") == 3


def test_config_round_trips_through_dict() -> None:
    cfg = build_train_run(["cpu", "--use_all_stages_for_training=True"]).cfg
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_recipe_stage_keys_as_python_literal_flag() -> None:
    cfg = build_train_run(
        [
            "--unmasking_stages=[{'type': 'random', 'masking_rate_range': (0.05, 0.2), 'epochs': 7.5,"
            " 'lr_factor': 0.5}, {'type': 'span', 'spans_count': 4, 'iters': 100, 'val_loss_stale_count': 3}]",
            "--stage_duration_scale=0.1",
            "--min_lr_ratio=0.05",
        ]
    ).cfg
    first, second = cfg.unmasking_stages
    assert first == RandomStage(masking_rate_range=(0.05, 0.2), epochs=7.5, lr_factor=0.5, val_loss_stale_count=None)
    assert second == SpanStage(spans_count=4, iters=100, val_loss_stale_count=3)
    assert cfg.stage_duration_scale == 0.1 and cfg.final_lr == pytest.approx(cfg.learning_rate * 0.05)
