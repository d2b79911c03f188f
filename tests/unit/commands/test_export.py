"""`unmask export` / `unmask.load` of an export: the digests, config.json checked before anything is built, the
files an incomplete export lacks, and write errors as one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import unmask
import unmask.storage.export_format as export_mod
from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.errors import UserError
from unmask.storage.export_format import CONFIG_FILE, DIGEST_KEY, WEIGHTS_FILE, definition_digest


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export_run")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=4)]) == 0
    return out


@pytest.fixture(scope="module")
def pristine(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "model"
    assert main(["export", f"--ckpt={run_dir}", f"--out={out}"]) == 0
    return out


@pytest.fixture
def exported(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the export for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def edit_config(export: Path, change: Callable[[dict[str, Any]], Any], restamp: bool = True) -> None:
    """Apply `change` to config.json; `restamp` records the new definition digest, as a consistent but wrong
    config would carry, so the checks after the digest are reached."""
    path = export / CONFIG_FILE
    config = json.loads(path.read_text())
    replaced = change(config)
    if replaced is not None:
        config = replaced
    elif restamp:
        config[DIGEST_KEY]["definition_sha256"] = definition_digest(config)
    path.write_text(json.dumps(config))


def load_error(export: Path) -> str:
    with pytest.raises(UserError) as info:
        unmask.load(export)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the model is an error: a check must refuse the config before anything is allocated."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(export_mod, "Transformer", refuse)


# --- digests --------------------------------------------------------------------------------------------------


def test_export_records_the_digest_of_its_weights_and_definition(exported: Path) -> None:
    config = json.loads((exported / CONFIG_FILE).read_text())
    weights = (exported / WEIGHTS_FILE).read_bytes()
    assert config["format_version"] == 2
    record = config[DIGEST_KEY]
    assert record["weights_bytes"] == len(weights)
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["definition_sha256"] == definition_digest(config)
    assert unmask.load(exported).config[DIGEST_KEY] == record


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(exported: Path) -> None:
    weights = exported / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # the top exponent bit of the last float32: off by ~2**128, and safetensors reads it fine
    weights.write_bytes(bytes(data))
    message = load_error(exported)
    assert message == f"{weights}: damaged: its sha256 differs from the one {CONFIG_FILE} records"
    weights.write_bytes(bytes(data[:-4]))
    assert f"{weights}: damaged: {len(data) - 4:,} bytes, {CONFIG_FILE} records {len(data):,}" == load_error(exported)


def test_an_edited_model_definition_is_refused_and_a_descriptive_field_is_not(exported: Path) -> None:
    edit_config(exported, lambda c: c["model_config"].update(rope_base=10001.0), restamp=False)  # same shapes
    assert "model definition (model_config, vocab, tied_weights) differs from the digest" in load_error(exported)
    edit_config(exported, lambda c: c["model_config"].update(rope_base=10000.0), restamp=False)
    edit_config(exported, lambda c: c["training"].update(best_val_bpc=1.0), restamp=False)
    assert unmask.load(exported).config["training"]["best_val_bpc"] == 1.0


def test_a_format_1_export_without_digest_loads_with_a_warning(
    exported: Path, pristine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def as_format_1(config: dict[str, Any]) -> dict[str, Any]:
        del config[DIGEST_KEY]
        return {**config, "format_version": 1}

    edit_config(exported, as_format_1)
    model = unmask.load(exported)
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "format 1 carries no digest" in err and len(err.splitlines()) == 1
    x = torch.arange(32).remainder(model.vocab.size)[None]
    with torch.no_grad():
        assert torch.equal(model.model(x), unmask.load(pristine).model(x))


def test_a_format_2_export_without_its_digest_is_refused(exported: Path) -> None:
    edit_config(exported, lambda c: c.pop(DIGEST_KEY) and None, restamp=False)
    assert f"field '{DIGEST_KEY}' is missing or malformed" in load_error(exported)


# --- config.json checked before anything is built ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("n_layer", 100_000, "model_config declares n_layer=100000 but the file holds weights of 1 layer(s)"),
        ("n_embd", 65536, "model_config declares vocab_size=40, n_embd=65536 but tok_emb.weight is 40 x 16"),
        ("block_size", 2**40, f"model_config declares block_size={2**40}, beyond the limit"),
    ],
)
def test_a_declared_size_that_disagrees_with_the_tensors_builds_nothing(
    exported: Path, nothing_built: None, field: str, value: int, expected: str
) -> None:
    edit_config(exported, lambda c: c["model_config"].update({field: value}))
    message = load_error(exported)
    assert message.startswith(f"{exported / WEIGHTS_FILE}: does not match {CONFIG_FILE}: ") and expected in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: [c], "not an unmask export config (a JSON list, not an object)"),
        (lambda c: "model", "not an unmask export config (a JSON str, not an object)"),
        (lambda c: c.update(training=[1, 2]), "field 'training' must be a JSON object, not a list"),
        (lambda c: c.update(train_config="x"), "field 'train_config' must be a JSON object, not a string"),
        (lambda c: c["training"].update(iterations="8"), "field 'training.iterations' must be an integer >= 0"),
        (lambda c: c.update(objective=None), "field 'objective' must be a string, not null"),
        (lambda c: c.update(model_config=[]), "field 'model_config' must be a JSON object, not a list"),
        (lambda c: c["model_config"].update(n_layer=1.0), "field 'model_config.n_layer' must be an integer"),
        (lambda c: c["model_config"].update(n_head="2"), "field 'model_config.n_head' must be an integer"),
        (lambda c: c["model_config"].update(causal=0), "field 'model_config.causal' must be true or false"),
        (lambda c: c["model_config"].update(wings=2), "field 'model_config' is invalid"),
        (lambda c: c.update(vocab="abc"), "field 'vocab' must be a list of single characters"),
        (lambda c: c.update(vocab=c["vocab"][:10]), "field 'vocab' has 10 characters (+ [MASK] = 11 ids), but "),
        (lambda c: c.update(tied_weights={"head.weight": 3}), "field 'tied_weights' must be an object of tensor"),
        (lambda c: c.update(format_version=True), "field 'format_version' must be a positive integer"),
        (lambda c: c.update(format_version=3), "export format 3 is newer than this unmask (2); upgrade unmask"),
    ],
)
def test_a_malformed_config_is_one_line_naming_the_file_and_field(
    exported: Path, nothing_built: None, change: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    edit_config(exported, change)
    message = load_error(exported)
    assert message.startswith(f"{exported / CONFIG_FILE}: ") and expected in message, message


def test_a_tied_weight_the_file_lacks_is_one_line(exported: Path, nothing_built: None) -> None:
    edit_config(exported, lambda c: c.update(tied_weights={"head.weight": "no.such.weight"}))
    assert "tied weight head.weight: its source no.such.weight is not in the file" in load_error(exported)


def test_a_config_nested_too_deeply_is_one_line(exported: Path) -> None:
    (exported / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    assert load_error(exported) == f"{exported / CONFIG_FILE}: not JSON (nested too deeply)"


def test_a_weights_file_that_is_not_safetensors_is_one_line(exported: Path) -> None:
    edit_config(exported, lambda c: {**{k: v for k, v in c.items() if k != DIGEST_KEY}, "format_version": 1})
    (exported / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert load_error(exported).startswith(f"{exported / WEIGHTS_FILE}: not a readable safetensors file (")


# --- incomplete export directories ------------------------------------------------------------------------------


def test_a_missing_export_file_is_named(exported: Path) -> None:
    (exported / WEIGHTS_FILE).unlink()
    assert load_error(exported) == f"{exported}: an unmask export ({CONFIG_FILE}) without its {WEIGHTS_FILE}"
    (exported / WEIGHTS_FILE).mkdir()
    assert load_error(exported) == f"{exported / WEIGHTS_FILE}: not a file"
    (exported / WEIGHTS_FILE).rmdir()
    (exported / CONFIG_FILE).rename(exported / WEIGHTS_FILE)  # any bytes: only the names matter here
    assert load_error(exported) == f"{exported}: has {WEIGHTS_FILE} but no {CONFIG_FILE}; an unmask export needs both"


def test_a_run_directory_is_not_taken_for_an_incomplete_export(run_dir: Path) -> None:
    assert (run_dir / CONFIG_FILE).is_file()  # a run's own config.json, not an export's
    assert unmask.load(run_dir).config["training"]["iterations"] == 4


# --- writing ----------------------------------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unmask export: error: "), err
    return err


def test_export_tolerates_a_metrics_line_without_a_numeric_iter(run_dir: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "eval", "iter": "late", "val_bpc": 1.0}) + "\n")
    assert main(["export", f"--ckpt={run}", f"--out={tmp_path / 'model'}"]) == 0


def test_export_under_a_file_is_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "model"
    err = one_line_error(capsys, ["export", f"--ckpt={run_dir}", f"--out={out}"])
    assert f"--out={out}: cannot write: {tmp_path / 'file'} is not a directory; nothing was written" in err


@pytest.mark.parametrize(
    ("code", "text"), [(errno.ENOSPC, "no space left on the device (ENOSPC)"), (errno.EROFS, "read-only")]
)
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_is_one_line_and_leaves_nothing_behind(
    run_dir: Path,
    pristine: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    text: str,
    existing: bool,
) -> None:
    out = tmp_path / "model"
    if existing:
        shutil.copytree(pristine, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    real_fsync = os.fsync
    calls = iter(range(100))

    def failing_fsync(fd: int) -> None:
        if next(calls) == 1:  # the second file: a write that fails half way through the directory
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    argv = ["export", f"--ckpt={run_dir}", f"--out={out}", *(["--overwrite=True"] if existing else [])]
    err = one_line_error(capsys, argv)
    kept = "the existing directory is unchanged" if existing else "nothing was written"
    assert f"--out={out}: cannot write: {text}" in err and err.endswith(kept)
    assert [p.name for p in tmp_path.iterdir()] == (["model"] if existing else [])  # no temporary directory left
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failed_rename_puts_the_previous_export_back(
    run_dir: Path, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(pristine, tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(src).name.endswith(".tmp"):  # the new export into place
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    err = one_line_error(capsys, ["export", f"--ckpt={run_dir}", f"--out={out}", "--overwrite=True"])
    assert "read-only file system (EROFS); the existing directory is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_objective_params_are_the_registered_classes_own() -> None:
    """The exported objective_params come from the objective's registered class, so a new objective brings its own."""
    from unmask.objectives import registry
    from unmask.objectives.mdlm import MDLM

    assert export_mod.objective_params("unmasking") == (
        "unmasking_stages",
        "validation_stages",
        "use_all_stages_for_training",
        "label_smoothing",
    )
    assert export_mod.objective_params("mdlm") == ("elbo_draws", "zero_masking", "mdlm_estimator", "mask_rate_window")
    assert export_mod.objective_params("autoregressive") == ("zero_masking",)
    assert export_mod.objective_params("block_diffusion") == (
        "diffusion_block",
        "mask_rate_window",
        "elbo_draws",
        "zero_masking",
    )
    assert export_mod.objective_params("retired_objective") == ()  # a checkpoint of an objective since removed

    class Sharper(MDLM):
        params = ("elbo_draws", "sharpness")

    registry.register("toy_sharper", Sharper)
    try:
        assert export_mod.objective_params("toy_sharper") == ("elbo_draws", "sharpness")
    finally:
        del registry.ENTRIES["toy_sharper"]
