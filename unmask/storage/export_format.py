"""The export format (`unmask export` writes it, `unmask.load` reads it): a self-describing model directory.

The directory holds `model.safetensors` (the weights only: no optimizer, RNG or curriculum state), `config.json`
(architecture, vocabulary, objective and its parameters, a training summary, versions) and a short `README.md`
model card. safetensors stores raw tensors with a JSON header, so loading runs no code at all. A tensor shared by
two names (the tied embedding / LM head, Press & Wolf 2017) is stored once under its first name; the other names
are listed in `config.json` under `tied_weights` and re-tied on load (`load_export`).

The export verifies itself (format 2): `config.json` records under `integrity` the size and sha256 of
`model.safetensors` and a sha256 of the model definition (`model_config`, `vocab`, `tied_weights`: what decides the
model's outputs), and `load_export` refuses a mismatch, naming the file. The descriptive fields (training summary,
train config, versions) are not covered, so they may be edited. Format 1 exports (before the digest) still load,
with a warning that nothing verified them. Before any model is built, config.json is checked field by field and the
architecture it declares against the tensor shapes in the safetensors header, so a config declaring a huge model
allocates nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeGuard

import torch

from unmask import __version__
from unmask.data.dataset import Vocab
from unmask.data.prepare import MASK_TOKEN
from unmask.errors import UserError
from unmask.model import ModelConfig, Transformer
from unmask.objectives import registry
from unmask.storage.atomic import describe_os_error
from unmask.storage.loading import Trained
from unmask.storage.run_dir import METRICS, read_records

_SHA256 = re.compile(r"[0-9a-f]{64}")

EXPORT_FORMAT = "unmask-export"


EXPORT_FORMAT_VERSION = 2  # 2: the `integrity` digests in config.json; 1: no digest (loads with a warning)


DIGEST_KEY = "integrity"


DIGEST_SCHEME = "unmask-export-sha256-1"


# The config.json fields that decide what the loaded model computes; their digest is recorded next to the weights'.
DEFINITION_KEYS = ("model_config", "vocab", "tied_weights")


# config.json fields that must be JSON objects when present (the API reads them as dicts).
OBJECT_FIELDS = ("special_tokens", "task", "objective_params", "training", "train_config", "versions")


_INT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "diffusion_block")


WEIGHTS_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


CARD_FILE = "README.md"


# Besides each objective's own parameters (`Objective.params`, from the registry), exported for every objective;
# only the keys a run's config actually has are exported.
COMMON_OBJECTIVE_PARAMS = ("block_length",)


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors with every shared tensor once, {dropped name: kept name}); names keep their state-dict order."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())
        if key in owner and tensor.numel() > 0:  # empty tensors may all report the same data pointer
            tied[name] = owner[key]
        else:
            owner[key] = name
            kept[name] = tensor.detach().cpu().contiguous()
    return kept, tied


def _run_evals(run_dir: Path, iter_num: int) -> list[dict[str, Any]]:
    """The run's eval records up to `iter_num` (metrics.jsonl next to the checkpoint; [] when absent)."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [r for r in read_records(path) if r.get("kind") == "eval" and (_iter(r) or 0) <= iter_num]


def _iter(record: dict[str, Any]) -> float | None:
    """The record's iteration (None when it is not a finite number: a hand-edited or foreign metrics line)."""
    value = record.get("iter")
    return None if isinstance(value, bool) else _finite(value)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def training_summary(trained: Trained, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Iterations, characters seen, best val loss and val_bpc (from metrics.jsonl when the run has one)."""
    summary: dict[str, Any] = {
        "source_checkpoint": trained.path.name,
        "iterations": trained.iter_num,
        "train_chars_seen": ckpt.get("train_chars_seen"),
        "best_val_loss": _finite(ckpt.get("best_val_loss")),
        "val_bpc": None,
        "best_val_bpc": None,
        "epochs": None,
        "curriculum_stage": (ckpt.get("curriculum") or {}).get("stage"),
    }
    evals = _run_evals(trained.path.parent, trained.iter_num)
    bpcs = [v for r in evals if (v := _finite(r.get("val_bpc"))) is not None]
    if bpcs:
        summary["best_val_bpc"] = min(bpcs)
    at_ckpt = [r for r in evals if _iter(r) == trained.iter_num]
    if at_ckpt:
        summary["val_bpc"] = _finite(at_ckpt[-1].get("val_bpc"))
        summary["epochs"] = _finite(at_ckpt[-1].get("epochs"))
    return summary


def objective_of(trained: Trained) -> str:
    if trained.model_config.causal:
        return "autoregressive"
    return str(trained.task.get("objective") or trained.config.get("objective") or "unmasking")


def objective_params(objective: str) -> tuple[str, ...]:
    """The training-config keys that parameterise `objective` (how it was trained, hence how it should be scored
    and sampled), as its registered class declares them; none for a name the registry does not know."""
    from unmask.objectives.base import objective_class

    if objective not in registry.ENTRIES:
        return ()
    return objective_class(objective).params


def export_config(trained: Trained, ckpt: dict[str, Any], tied: dict[str, str]) -> dict[str, Any]:
    """The `config.json` document of an export."""
    objective = objective_of(trained)
    wanted = (*objective_params(objective), *COMMON_OBJECTIVE_PARAMS)
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model_config": asdict(trained.model_config),
        "vocab": list(trained.vocab.itos),
        "special_tokens": {MASK_TOKEN: trained.vocab.mask_id},
        "task": trained.task or {"head": trained.head, "objective": objective},
        "objective": objective,
        "objective_params": {k: trained.config[k] for k in wanted if k in trained.config},
        "training": training_summary(trained, ckpt),
        "train_config": trained.config,
        "tied_weights": tied,
        "versions": {"unmask": __version__, "torch": torch.__version__},
    }


def definition_digest(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of the fields that define the model."""
    fields = {key: config.get(key) for key in DEFINITION_KEYS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (a model file need not fit in memory twice)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def integrity_record(weights: bytes, config: dict[str, Any]) -> dict[str, Any]:
    """The `integrity` field of config.json: the weights file's size and sha256, and the definition digest."""
    return {
        "scheme": DIGEST_SCHEME,
        "weights_bytes": len(weights),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "definition_sha256": definition_digest(config),
    }


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def export_dir_problem(path: Path) -> str | None:
    """What an incomplete export directory lacks (None when `path` is a complete export or no export at all).

    A directory holding model.safetensors, or a config.json written by `unmask export`, is taken for an export; a
    training run directory also holds a config.json, but not one whose `format` is an export's."""
    if not path.is_dir():
        return None
    weights, config = path / WEIGHTS_FILE, path / CONFIG_FILE
    if weights.exists() and not weights.is_file():
        return f"{weights}: not a file"
    if config.exists() and not config.is_file():
        return f"{config}: not a file"
    if weights.is_file() and not config.is_file():
        return f"{path}: has {WEIGHTS_FILE} but no {CONFIG_FILE}; an unmask export needs both"
    if config.is_file() and not weights.is_file() and _declares_export(config):
        return f"{path}: an unmask export ({CONFIG_FILE}) without its {WEIGHTS_FILE}"
    return None


def _declares_export(config: Path) -> bool:
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("format") == EXPORT_FORMAT


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def load_export(
    path: Path, device: torch.device | str = "cpu", warn: Callable[[str], None] = _stderr
) -> tuple[Transformer, Vocab, dict[str, Any]]:
    """(model in eval mode, vocabulary, config document) of an export directory; tied weights re-tied.

    Checked in this order, each failure one UserError naming the file (and field): config.json (fields and
    types), the digests of format 2 (definition, then the weights file's size and sha256; format 1 has none and
    loads with a `warn` line), the declared architecture against the tensor shapes in the safetensors header;
    only then is the model built and the tensors read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = _read_config(config_path)
    model_config, vocab, tied = _parse_config(config, config_path)
    try:
        if config["format_version"] >= 2:
            _verify_digests(config, config_path, weights_path)
        else:
            warn(
                f"warning: {config_path}: export format 1 carries no digest, so {WEIGHTS_FILE} is loaded "
                "unverified (exports written by this unmask verify themselves)"
            )
        problem = _shape_problem(weights_path, model_config, tied)
        if problem is not None:
            raise UserError(f"{weights_path}: does not match {CONFIG_FILE}: {problem}")
        tensors = load_file(str(weights_path))
    except OSError as exc:
        raise UserError(f"{weights_path}: cannot read weights ({describe_os_error(exc)})") from None
    except SafetensorError as exc:
        raise UserError(f"{weights_path}: not a readable safetensors file ({_first_line(exc)})") from None
    model = Transformer(model_config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied name is missing from the file by design; the module ties it by construction, but re-tie
    # explicitly so an export is correct even for a tie the module does not make itself.
    for name, source in tied.items():
        _set_parameter(model, name, _get_parameter(model, source))
    problems = sorted(set(missing) - set(tied)) + sorted(unexpected)
    if problems:
        raise UserError(f"{weights_path}: weights do not match the architecture in {CONFIG_FILE}: {problems}")
    model.to(device).eval()
    return model, vocab, config


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{config_path}: cannot read ({describe_os_error(exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{config_path}: not UTF-8 text") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(f"{config_path}: not JSON ({reason})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not an unmask export config (a JSON {type(config).__name__}, not an object)")
    return config


def _parse_config(config: dict[str, Any], config_path: Path) -> tuple[ModelConfig, Vocab, dict[str, str]]:
    """The model config, vocabulary and tied names of a config.json document, every field type-checked."""

    def bad(field: str, what: str) -> UserError:
        return UserError(f"{config_path}: field {field!r} {what}")

    if config.get("format") != EXPORT_FORMAT:
        raise UserError(f"{config_path}: not an unmask export config (format is {config.get('format')!r:.60})")
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad("format_version", f"must be a positive integer, not {version!r:.40}")
    if version > EXPORT_FORMAT_VERSION:
        raise UserError(
            f"{config_path}: export format {version} is newer than this unmask ({EXPORT_FORMAT_VERSION}); "
            "upgrade unmask"
        )
    for field in OBJECT_FIELDS:
        if field in config and not isinstance(config[field], dict):
            raise bad(field, f"must be a JSON object, not {_json_type(config[field])}")
    if not isinstance(config.get("objective"), str):
        raise bad("objective", f"must be a string, not {_json_type(config.get('objective'))}")
    iterations = config.get("training", {}).get("iterations", 0)
    if not _is_int(iterations) or iterations < 0:
        raise bad("training.iterations", f"must be an integer >= 0, not {iterations!r:.40}")
    declared = config.get("model_config")
    if not isinstance(declared, dict):
        raise bad("model_config", f"must be a JSON object, not {_json_type(declared)}")
    for key in _INT_FIELDS:
        if key in declared and not _is_int(declared[key]):
            raise bad(f"model_config.{key}", f"must be an integer, not {declared[key]!r:.40}")
    for key in ("bias", "causal", "self_conditioning"):
        if key in declared and not isinstance(declared[key], bool):
            raise bad(f"model_config.{key}", f"must be true or false, not {declared[key]!r:.40}")
    for key in ("dropout", "rope_base"):
        value = declared.get(key, 0.0)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise bad(f"model_config.{key}", f"must be a finite number, not {value!r:.40}")
    try:
        model_config = ModelConfig(**declared)
    except (TypeError, ValueError) as exc:
        raise bad("model_config", f"is invalid: {exc}") from None
    chars = config.get("vocab")
    if not isinstance(chars, list) or not all(isinstance(ch, str) for ch in chars):
        raise bad("vocab", "must be a list of single characters")
    try:
        vocab = Vocab(tuple(chars))
    except ValueError as exc:
        raise bad("vocab", str(exc)) from None
    if vocab.size != model_config.vocab_size:
        raise bad(
            "vocab",
            f"has {vocab.n_chars} characters (+ {MASK_TOKEN} = {vocab.size} ids), but model_config.vocab_size is "
            f"{model_config.vocab_size}",
        )
    tied = config.get("tied_weights", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise bad("tied_weights", "must be an object of tensor names")
    return model_config, vocab, dict(tied)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _verify_digests(config: dict[str, Any], config_path: Path, weights_path: Path) -> None:
    record = config.get(DIGEST_KEY)
    if not (
        isinstance(record, dict)
        and record.get("scheme") == DIGEST_SCHEME
        and _is_int(record.get("weights_bytes"))
        and all(
            isinstance(record.get(k), str) and _SHA256.fullmatch(record[k])
            for k in ("weights_sha256", "definition_sha256")
        )
    ):
        raise UserError(
            f"{config_path}: field {DIGEST_KEY!r} is missing or malformed (format {config['format_version']} "
            "records the digests of the weights and the model definition there)"
        )
    if definition_digest(config) != record["definition_sha256"]:
        raise UserError(
            f"{config_path}: the model definition ({', '.join(DEFINITION_KEYS)}) differs from the digest recorded "
            "with it (edited or damaged)"
        )
    size = weights_path.stat().st_size
    if size != record["weights_bytes"]:
        raise UserError(f"{weights_path}: damaged: {size:,} bytes, {CONFIG_FILE} records {record['weights_bytes']:,}")
    if file_sha256(weights_path) != record["weights_sha256"]:
        raise UserError(f"{weights_path}: damaged: its sha256 differs from the one {CONFIG_FILE} records")


def _shape_problem(weights_path: Path, model_config: ModelConfig, tied: dict[str, str]) -> str | None:
    """The declared architecture against the tensor shapes in the safetensors header (nothing allocated): the
    checkpoints' own check, run on meta tensors, which have a shape and no storage. safetensors checks on opening
    that the header's shapes fit the file's size, so a header cannot claim more than the file holds."""
    from safetensors import safe_open

    from unmask.storage.checkpoint import _model_problem

    with safe_open(str(weights_path), framework="pt") as f:
        names = f.keys()  # noqa: SIM118 - a safe_open handle is not iterable
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    for name, source in tied.items():
        if name in shapes:
            return f"tied weight {name} is stored in the file, but {CONFIG_FILE} says it shares {source}"
        if source not in shapes:
            return f"tied weight {name}: its source {source} is not in the file"
        shapes[name] = shapes[source]
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return _model_problem({"model_config": asdict(model_config), "model": state})


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr)
    if not isinstance(value, torch.nn.Parameter):
        raise UserError(f"tied weight {name}: not a parameter of the model")
    return value


def _set_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)
