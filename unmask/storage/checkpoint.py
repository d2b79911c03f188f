"""Checkpoint files: atomic writes, `weights_only=True` loads, self-verifying payloads, JSON sidecars, rotation.

A checkpoint `out_dir/ckpt_unmasking_{iter}.pt` is a plain dict of tensors and primitive containers (see
docs/architecture.md for the keys), so `torch.load(weights_only=True)` reads it and nothing is unpickled.

Integrity has two layers. Since format 2 the file verifies itself: `integrity` holds a sha256 over every value of
the dict (each tensor's dtype, shape and bytes, every other value's type and repr, in the dict's order; see
`payload_digest`), recomputed on every load, so a flipped byte is caught even when the sidecar is missing (a kill
between the two writes, or a copied .pt). The human-readable JSON sidecar (`ckpt_unmasking_{iter}.json`) repeats
the metadata and records the whole file's size and sha256, checked too when present; a sidecar that is not what
unmask writes makes the checkpoint count as damaged. Format 1 files (no digest) still load, verified by their
sidecar only. Before any model is allocated, the architecture a checkpoint declares (`model_config`) is compared
with the tensors actually in it.

Every load goes through `load_checkpoint` (one file, which must be intact) or `read_checkpoint` (a file, or a run
directory whose newest intact checkpoint is taken: `unmask.storage.run_dir.newest_checkpoint` says which that is).

Files are written to a temporary file in the same directory (created with the process umask, like any file),
fsynced and renamed, so a crash never leaves a partial file under the final name; `sweep_temp_files` removes the
temporary files a killed writer left. A write that fails (disk full, quota, read-only or forbidden directory) is
one `UserError` naming the path and saying what was kept. (docs/origin.md §4.2 has the fallback rule.)
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from unmask.errors import UserError
from unmask.storage.atomic import (  # noqa: F401 - re-exported: the writers of checkpoints and run files
    atomic_write_bytes,
    atomic_write_json,
    describe_os_error,
    remove_quietly,
    sweep_temp_files,
)

PREFIX = "ckpt_unmasking_"
_NAME = re.compile(rf"^{PREFIX}(\d+)\.pt$")
FORMAT_VERSION = 2  # 2: the `integrity` digest inside the file; 1: verified by the sidecar only
DIGEST_KEY = "integrity"
DIGEST_SCHEME = "unmask-sha256-values-1"
# Temporary files of `atomic_write_bytes`: `.{final name}.{tag}.tmp` (the tag was random before, pid.counter now).

Warn = Callable[[str], None]


def warn_stderr(line: str) -> None:
    """The default `Warn`: one line on stderr."""
    print(line, file=sys.stderr)


def checkpoint_path(out_dir: Path, iter_num: int) -> Path:
    return out_dir / f"{PREFIX}{iter_num}.pt"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(
    out_dir: Path,
    iter_num: int,
    state: dict[str, Any],
    sidecar: dict[str, Any],
    keep_last: int = 0,
    own: Callable[[], list[Path]] | None = None,
) -> Path:
    """Atomically write checkpoint (with its `integrity` digest) + sidecar, then delete all but the `keep_last`
    newest (0 keeps all) of `own()`: the run's own checkpoints, oldest written first (default: every checkpoint
    in out_dir by iteration). A failed write is one UserError; the checkpoints written before are intact."""
    path = checkpoint_path(out_dir, iter_num)
    full: dict[str, Any] = {"format_version": FORMAT_VERSION, **state}
    full.pop(DIGEST_KEY, None)
    full[DIGEST_KEY] = {"scheme": DIGEST_SCHEME, "sha256": payload_digest(full)}
    buffer = io.BytesIO()
    torch.save(full, buffer)
    payload = buffer.getvalue()
    earlier = "the previous checkpoints are intact" if list_checkpoints(out_dir) else "no checkpoint was written"
    # A sidecar left under this name (an iteration written again after a resume from an older checkpoint) would
    # describe the old file: remove it first, so a kill before the new sidecar leaves a file its digest verifies.
    remove_quietly(path.with_suffix(".json"))
    atomic_write_bytes(path, payload, kept=earlier)
    integrity = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write_json(
        path.with_suffix(".json"),
        {"format_version": FORMAT_VERSION, "file": path.name, **integrity, **sidecar},
        kept=f"{path.name} was written and verifies itself without it; the previous checkpoints are intact",
    )
    if keep_last > 0:
        candidates = own() if own is not None else [p for _, p in list_checkpoints(out_dir)]
        for old in candidates[:-keep_last]:
            remove_quietly(old)
            remove_quietly(old.with_suffix(".json"))
    return path


# --- finding and reading ----------------------------------------------------------------------------------------


def named_checkpoint(out_dir: Path, ckpt_filename: str) -> Path:
    """`--ckpt_filename`: that file in `out_dir` (not verified: `load_checkpoint` verifies)."""
    path = out_dir / ckpt_filename
    if not path.is_file():
        raise UserError(f"--ckpt_filename={ckpt_filename}: no such file in {out_dir}")
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one file with `weights_only=True` and verify it (sidecar, digest, declared architecture); unreadable,
    damaged or foreign files are a user error naming the file."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read checkpoint ({describe_os_error(exc)})") from None
    damage = _sidecar_problem(path, payload)
    if damage is not None:
        raise UserError(f"{path}: damaged checkpoint ({damage})")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or a pickle that is not plain data
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise UserError(
                f"{path}: refused: it holds Python objects beyond tensors and plain data ({found.group(1)}), which "
                "loading would have to execute; unmask reads only weights_only checkpoints"
            ) from None
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {_torch_reason(exc)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise UserError(f"{path}: not an unmask checkpoint")
    damage = _digest_problem(ckpt) or _model_problem(ckpt)
    if damage is not None:
        raise UserError(f"{path}: damaged checkpoint ({damage})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {version} is newer than this unmask ({FORMAT_VERSION}); upgrade unmask"
        )
    return ckpt


def _torch_reason(exc: Exception) -> str:
    """The specific line of a torch.load error, without torch's advice to pass weights_only=False (running the
    file's code is never the fix unmask suggests)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "weights_only")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if not any(a in line for a in advice)]
    return (specific or ["not a plain-data torch file"])[0][:200]


def _sidecar_problem(path: Path, payload: bytes) -> str | None:
    """Size and sha256 against the sidecar written with the file; None when they match or there is no sidecar.

    A sidecar that exists but is not what `save_checkpoint` writes (not JSON, not an object, `bytes` not an
    integer, `sha256` not 64 hex digits, keys missing) is a problem too: the checkpoint then counts as damaged."""
    side = path.with_suffix(".json")
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None  # a kill between the two writes, or a copied .pt: the file's own digest decides
    except (OSError, UnicodeDecodeError) as exc:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else "not UTF-8"
        return f"its sidecar {side.name} cannot be read: {reason}"
    try:
        record = json.loads(text)
    except ValueError:
        return f"its sidecar {side.name} is not JSON"
    if not isinstance(record, dict):
        return f"its sidecar {side.name} is not a JSON object"
    size, digest = record.get("bytes"), record.get("sha256")
    if "bytes" not in record or "sha256" not in record:
        missing = [k for k in ("bytes", "sha256") if k not in record]
        return f"its sidecar {side.name} lacks {' and '.join(repr(k) for k in missing)}"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"its sidecar {side.name} has a malformed 'bytes' field ({size!r:.40})"
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return f"its sidecar {side.name} has a malformed 'sha256' field ({digest!r:.40})"
    if len(payload) != size:
        return f"{len(payload):,} bytes, its sidecar recorded {size:,}"
    if hashlib.sha256(payload).hexdigest() != digest:
        return "sha256 differs from the one its sidecar recorded"
    return None


def _digest_problem(ckpt: dict[str, Any]) -> str | None:
    """The file's own digest (format 2) against its content; format 1 files have none."""
    record = ckpt.get(DIGEST_KEY)
    if record is None:
        if ckpt["format_version"] == 1:
            return None  # written before digests: verified by its sidecar alone
        return f"format {ckpt['format_version']!r} without the {DIGEST_KEY!r} digest it requires"
    if not (
        isinstance(record, dict) and record.get("scheme") == DIGEST_SCHEME and isinstance(record.get("sha256"), str)
    ):
        return f"its {DIGEST_KEY!r} record is malformed"
    if payload_digest(ckpt) != record["sha256"]:
        return "its content differs from the digest stored in it"
    return None


def payload_digest(state: Mapping[str, Any]) -> str:
    """sha256 over every value of a checkpoint dict except the digest itself.

    Tensors contribute their dtype, shape and raw bytes; dicts, lists and tuples their length and items in order
    (pickle keeps dict order, so the saved and the loaded dict hash alike); other values their type and repr
    (repr of a float round-trips exactly). Every piece is tagged and length-prefixed, so different structures never
    feed the same byte stream."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _piece(h: Any, tag: bytes, data: bytes) -> None:
    h.update(tag + len(data).to_bytes(8, "little") + data)


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # the element bytes, without a copy
        _piece(h, b"T", f"{t.dtype}|{tuple(t.shape)}|{raw.size}".encode())  # the size delimits the bytes below
        h.update(raw.data)
    elif isinstance(value, Mapping):
        _piece(h, b"D", str(len(value)).encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        _piece(h, b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
        for item in value:
            _feed(h, item)
    else:
        _piece(h, b"S", f"{type(value).__qualname__}|{value!r}".encode())


# --- declared architecture against the tensors --------------------------------------------------------------------

MAX_BLOCK_SIZE = 2**20  # TrainConfig's bound on --block_size: the RoPE tables are allocated for block_size


def _model_problem(ckpt: dict[str, Any]) -> str | None:
    """The architecture `model_config` declares against the tensors in `model`, checked before anything is
    allocated: a small file declaring a huge model would otherwise allocate that model (tens of GB) and only then
    fail in load_state_dict. Checkpoints without a model_config (not for inference) are left alone."""
    from unmask.model import ModelConfig  # here: model.py is heavy to import for `prepare`

    declared, state = ckpt.get("model_config"), ckpt["model"]
    if declared is None:
        return None
    if not isinstance(declared, dict) or not isinstance(state, dict):
        return "model_config or model is not a dict"
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "model holds values that are not tensors"
    try:
        cfg = ModelConfig(**declared)
    except (TypeError, ValueError) as exc:
        return f"model_config is invalid: {exc}"
    emb = state.get("tok_emb.weight")
    if emb is None or emb.dim() != 2:
        return "model has no tok_emb.weight matrix"
    if tuple(emb.shape) != (cfg.vocab_size, cfg.n_embd):
        return (
            f"model_config declares vocab_size={cfg.vocab_size}, n_embd={cfg.n_embd} but tok_emb.weight is "
            f"{emb.shape[0]} x {emb.shape[1]}"
        )
    layers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    if len(layers) != cfg.n_layer or layers != set(range(len(layers))):  # never build range(n_layer)
        return f"model_config declares n_layer={cfg.n_layer} but the file holds weights of {len(layers)} layer(s)"
    if cfg.block_size > MAX_BLOCK_SIZE:
        return f"model_config declares block_size={cfg.block_size}, beyond the limit of {MAX_BLOCK_SIZE:,}"
    saved = ckpt.get("config")
    if isinstance(saved, dict):
        # (model configs written before self_conditioning existed are plain models: the field's default)
        values = {**declared, "self_conditioning": cfg.self_conditioning}
        for key in ("n_layer", "n_head", "n_embd", "block_size", "bias", "self_conditioning"):
            if key in saved and saved[key] != values.get(key):
                return f"config {key}={saved[key]!r:.40} but model_config {key}={values.get(key)!r:.40}"
    expected = declared_shapes(cfg)
    found = {k: tuple(v.shape) for k, v in state.items()}
    diffs = [f"{k}: missing" for k in expected if k not in found]
    diffs += [f"{k}: not in the declared model" for k in found if k not in expected]
    diffs += [f"{k}: {found[k]} vs declared {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        return f"its tensors do not match the declared model_config: {'; '.join(diffs[:3])}{more}"
    return None


def declared_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `unmask.model.Transformer(cfg)`, computed without building it (a meta-device build
    costs seconds of one-time initialisation, a real one the memory a damaged file claims). A test compares it with
    the real module for every head and `bias`, so it cannot drift from model.py unnoticed."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (V, C)}
    linears = {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "mlp.fc": (4 * C, C), "mlp.proj": (C, 4 * C)}
    for i in range(cfg.n_layer):
        for name, shape in (("ln1", (C,)), *linears.items(), ("ln2", (C,))):
            shapes[f"blocks.{i}.{name}.weight"] = shape
            if cfg.bias:
                shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    shapes["ln_f.weight"] = (C,)
    if cfg.bias:
        shapes["ln_f.bias"] = (C,)
    if cfg.head == "lm":
        shapes["head.weight"] = (V, C)  # tied to tok_emb, but a state dict lists it under both names
    else:
        shapes["head.weight"], shapes["head.bias"] = (2, C), (2,)
    if getattr(cfg, "self_conditioning", False):
        shapes["self_cond_proj.weight"] = (C, C)
    return shapes
