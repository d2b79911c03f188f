"""Self-verifying checkpoints: the digest inside the file, malformed sidecars, declared model vs tensors, the
fallback past a damaged newest checkpoint in the inference commands, and the refusal of unsafe pickles."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_flags
from unmask.cli import main
from unmask.errors import UserError
from unmask.model import ModelConfig, Transformer
from unmask.storage import checkpoint as ck
from unmask.storage import run_dir
from unmask.storage.loading import read_trained

MARKER = torch.arange(1000, 1016, dtype=torch.float32)  # bytes easy to find in the file


def _state(i: int) -> dict[str, Any]:
    return {"model": {"w": MARKER + i, "b": torch.zeros(3, dtype=torch.int64)}, "iter_num": i, "best": 1.5}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_without_a_sidecar(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 4, _state(4), {})
    path.with_suffix(".json").unlink()  # a kill between the two writes
    assert ck.load_checkpoint(path)["iter_num"] == 4  # intact: loads, verified by its own digest
    offset = path.read_bytes().find((MARKER + 4).numpy().tobytes())
    assert offset > 0
    _flip(path, offset + 5)
    with pytest.raises(UserError, match=r"ckpt_unmasking_4.pt: damaged checkpoint \(its content differs"):
        ck.load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a flipped protocol byte
def test_every_single_byte_flip_is_caught_or_changes_nothing(tmp_path: Path) -> None:
    """Whatever byte (every third one, for time) of a sidecar-less file flips, the load fails with a UserError or
    returns the same content (a flip in zip padding or in a record name torch ignores is harmless)."""
    path = ck.save_checkpoint(tmp_path, 3, {"model": {"w": MARKER.clone()}, "iter_num": 3}, {})
    path.with_suffix(".json").unlink()
    original = path.read_bytes()
    reference = ck.load_checkpoint(path)
    silent = []
    for offset in range(0, len(original), 3):
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            loaded = ck.load_checkpoint(path)
        except UserError:
            continue
        if not _same(loaded, reference):
            silent.append(offset)
    assert silent == []


def test_format_1_checkpoints_still_load_and_their_sidecar_still_counts(tmp_path: Path) -> None:
    legacy = tmp_path / "ckpt_unmasking_2.pt"
    torch.save({"format_version": 1, "model": {"w": MARKER.clone()}, "iter_num": 2}, legacy)
    assert ck.load_checkpoint(legacy)["iter_num"] == 2  # no digest, no sidecar: as before
    payload = legacy.read_bytes()
    import hashlib

    side = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    legacy.with_suffix(".json").write_text(json.dumps(side))
    assert ck.load_checkpoint(legacy)["iter_num"] == 2
    _flip(legacy, payload.find(MARKER.numpy().tobytes()) + 1)
    with pytest.raises(UserError, match="sha256 differs from the one its sidecar recorded"):
        ck.load_checkpoint(legacy)


def test_format_2_without_its_digest_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "ckpt_unmasking_2.pt"
    torch.save({"format_version": 2, "model": {"w": MARKER.clone()}, "iter_num": 2}, path)
    with pytest.raises(UserError, match="damaged checkpoint \\(format 2 without the 'integrity' digest"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: {**r, "bytes": str(r["bytes"])}, "malformed 'bytes' field"),
        (lambda r: {**r, "bytes": None}, "malformed 'bytes' field"),
        (lambda r: {k: v for k, v in r.items() if k != "sha256"}, "lacks 'sha256'"),
        (lambda r: {k: v for k, v in r.items() if k not in ("sha256", "bytes")}, "lacks 'bytes' and 'sha256'"),
        (lambda r: {**r, "sha256": 12}, "malformed 'sha256' field"),
        (lambda r: [r], "is not a JSON object"),
        (lambda r: "{not json", "is not JSON"),
    ],
)
def test_a_malformed_sidecar_is_one_warning_and_the_damaged_fallback(tmp_path: Path, edit: Any, message: str) -> None:
    for it in (4, 8):
        ck.save_checkpoint(tmp_path, it, _state(it), {"iter": it})
    side = tmp_path / "ckpt_unmasking_8.json"
    changed = edit(json.loads(side.read_text()))
    side.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(UserError, match=f"ckpt_unmasking_8.pt: damaged checkpoint \\(its sidecar .*{message}"):
        ck.load_checkpoint(tmp_path / "ckpt_unmasking_8.pt")
    warnings: list[str] = []
    path, ckpt = run_dir.load_for_resume(tmp_path, warn=warnings.append)
    assert path.name == "ckpt_unmasking_4.pt" and ckpt["iter_num"] == 4
    assert len(warnings) == 1 and "\n" not in warnings[0] and message in warnings[0]


def _model_checkpoint(run: Path, it: int, **declared: Any) -> Path:
    """A real tiny model's checkpoint whose model_config may declare something else (`declared`)."""
    config = ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
    state = {
        "model": Transformer(config).state_dict(),
        "model_config": {**dataclasses.asdict(config), **declared},
        "vocab": list("abcd"),
        "config": {},
        "iter_num": it,
    }
    return ck.save_checkpoint(run, it, state, {"iter": it})


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"n_layer": 2}, "declares n_layer=2 but the file holds weights of 1 layer"),
        ({"n_layer": 10**9}, "declares n_layer=1000000000 but the file holds weights of 1 layer"),
        ({"n_embd": 4096, "n_head": 32}, "declares vocab_size=5, n_embd=4096 but tok_emb.weight is 5 x 8"),
        ({"vocab_size": 10**9}, "declares vocab_size=1000000000"),
        ({"block_size": 2**40}, "declares block_size=1099511627776, beyond the limit"),
        ({"bias": True}, "do not match the declared model_config: blocks.0.ln1.bias: missing"),
        ({"head": "sequence_binary"}, "head.weight: \\(5, 8\\) vs declared \\(2, 8\\)"),
    ],
)
def test_the_declared_model_is_checked_against_the_tensors_before_allocation(
    tmp_path: Path, declared: dict[str, Any], message: str
) -> None:
    path = _model_checkpoint(tmp_path, 1, **declared)
    with pytest.raises(UserError, match=message):
        read_trained(str(path), None)


@pytest.mark.parametrize("head", ["lm", "token_binary", "sequence_binary"])
@pytest.mark.parametrize("bias", [False, True])
def test_declared_shapes_are_the_models_state_dict(head: str, bias: bool) -> None:
    config = ModelConfig(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=bias, head=head)  # type: ignore[arg-type]
    real = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    assert ck.declared_shapes(config) == real


def test_an_unsafe_pickle_is_refused_without_torchs_advice(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    evil = tmp_path / "ckpt_unmasking_1.pt"
    buffer = io.BytesIO()
    torch.save({"format_version": 2, "model": Payload()}, buffer)
    evil.write_bytes(buffer.getvalue())
    with pytest.raises(UserError) as exc:
        ck.load_checkpoint(evil)
    text = str(exc.value)
    assert text.startswith(f"{evil}: refused") and "system" in text and "\n" not in text
    assert "weights_only=False" not in text and "set to `False`" not in text and "trusted source" not in text


# --- the inference commands fall back past a damaged newest checkpoint -----------------------------------------


@pytest.fixture(scope="module")
def two_checkpoint_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fallback_run")
    assert main(["train", *tiny_flags(tiny_data, out, max_iters=8, always_save_checkpoint=True)]) == 0
    assert [i for i, _ in ck.list_checkpoints(out)] == [4, 8]
    return out


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for p in run.iterdir():
        if p.name.startswith("ckpt_"):
            (copy / p.name).write_bytes(p.read_bytes())
    newest = copy / "ckpt_unmasking_8.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    return copy


@pytest.mark.parametrize(
    "command", [["sample", "--num_samples=1", "--length=8", "--steps=2", "--json"], ["eval", "--json", "--draws=1"]]
)
def test_sample_and_eval_fall_back_past_a_damaged_newest_checkpoint(
    two_checkpoint_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    run = _damaged_copy(two_checkpoint_run, tmp_path)
    assert main([command[0], f"--out_dir={run}", *command[1:]]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ckpt_unmasking_8.pt: damaged checkpoint" in warnings[0]
    assert json.loads(captured.out)["checkpoint"] == str(run / "ckpt_unmasking_4.pt")
    # Named as a file, the damaged checkpoint is an error, never silently replaced.
    assert main([command[0], f"--ckpt={run / 'ckpt_unmasking_8.pt'}", *command[1:]]) == 2
    assert "ckpt_unmasking_8.pt: damaged checkpoint" in capsys.readouterr().err


def test_read_trained_on_a_run_directory_warns_once_per_damaged_checkpoint(tmp_path: Path) -> None:
    for it in (1, 2, 3):
        _model_checkpoint(tmp_path, it)
    for it in (2, 3):
        _flip(tmp_path / f"ckpt_unmasking_{it}.pt", 200)
    warnings: list[str] = []
    trained = read_trained(None, str(tmp_path), warn=warnings.append)
    assert trained.iter_num == 1 and len(warnings) == 2
    assert all("damaged checkpoint" in w and "trying the previous checkpoint" in w for w in warnings)
