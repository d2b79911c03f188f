"""`unmask export`: a checkpoint -> a self-describing model directory (weights, config, model card).

The directory holds `model.safetensors` (the weights only: no optimizer, RNG or curriculum state), `config.json`
(architecture, vocabulary, objective and its parameters, a training summary, versions) and a short `README.md`
model card. safetensors stores raw tensors with a JSON header, so loading runs no code at all. A tensor shared by
two names (the tied embedding / LM head, Press & Wolf 2017) is stored once under its first name; the other names
are listed in `config.json` under `tied_weights` and re-tied on load (`load_export`).

The directory is written next to its destination under a temporary name and renamed into place, so a reader sees
either no export or a complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unmask import __version__
from unmask.config.flags import format_help, parse_flags
from unmask.data.dataset import Vocab
from unmask.data.prepare import MASK_TOKEN
from unmask.errors import UserError
from unmask.model import ModelConfig, Transformer
from unmask.storage import checkpoint as ckpt_io
from unmask.storage.loading import Trained, load_trained, resolve_checkpoint

EXPORT_FORMAT = "unmask-export"
EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
# Training-config keys that parameterise an objective (how it was trained, hence how it should be scored and
# sampled); only the keys a run's config actually has are exported.
OBJECTIVE_PARAMS: dict[str, tuple[str, ...]] = {
    "unmasking": ("unmasking_stages", "validation_stages", "use_all_stages_for_training", "label_smoothing"),
    "mdlm": ("elbo_draws", "zero_masking", "mdlm_estimator"),
    "autoregressive": ("zero_masking",),
    "block_diffusion": ("diffusion_block", "mask_rate_window", "elbo_draws"),
}
COMMON_OBJECTIVE_PARAMS = ("block_length",)


@dataclass
class ExportArgs:
    ckpt: str | None = None
    """Checkpoint file to export, or a run directory for its newest checkpoint."""
    out: str | None = None
    """Directory to write (model.safetensors, config.json, README.md); must not exist or be empty."""
    overwrite: bool = False
    """Replace an existing non-empty --out directory."""


# --- the pieces -----------------------------------------------------------------------------------------------


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
    from unmask.commands.plot import read_records  # the tolerant metrics.jsonl reader

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_records(path) if r.get("kind") == "eval" and int(r.get("iter", 0)) <= iter_num]


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
    at_ckpt = [r for r in evals if int(r.get("iter", -1)) == trained.iter_num]
    if at_ckpt:
        summary["val_bpc"] = _finite(at_ckpt[-1].get("val_bpc"))
        summary["epochs"] = _finite(at_ckpt[-1].get("epochs"))
    return summary


def objective_of(trained: Trained) -> str:
    if trained.model_config.causal:
        return "autoregressive"
    return str(trained.task.get("objective") or trained.config.get("objective") or "unmasking")


def export_config(trained: Trained, ckpt: dict[str, Any], tied: dict[str, str]) -> dict[str, Any]:
    """The `config.json` document of an export."""
    objective = objective_of(trained)
    wanted = (*OBJECTIVE_PARAMS.get(objective, ()), *COMMON_OBJECTIVE_PARAMS)
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


def _fmt(value: Any, digits: int = 4) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def model_card(config: dict[str, Any], n_params: int) -> str:
    """A short README.md: what the model is, how it was trained, how to use it."""
    mc, training = config["model_config"], config["training"]
    kind = "autoregressive (causal)" if mc["causal"] else "masked-diffusion (bidirectional)"
    train_cfg = config["train_config"]
    dataset = train_cfg.get("dataset", "unknown")
    lines = [
        f"# unmask model: {config['objective']} on {dataset}",
        "",
        f"A character-level {kind} transformer trained with unmask "
        f"(objective `{config['objective']}`, head `{mc['head']}`).",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {n_params:,} |",
        f"| layers / heads / width | {mc['n_layer']} / {mc['n_head']} / {mc['n_embd']} |",
        f"| context (block_size) | {mc['block_size']} |",
        f"| vocabulary | {len(config['vocab'])} characters + `{MASK_TOKEN}` |",
        f"| iterations | {training['iterations']:,} |",
        f"| best validation loss | {_fmt(training['best_val_loss'])} |",
        f"| val_bpc at export | {_fmt(training['val_bpc'])} (best {_fmt(training['best_val_bpc'])}) |",
        f"| unmask / torch | {config['versions']['unmask']} / {config['versions']['torch']} |",
        "",
        "val_bpc is bits per character on the validation split: the negative ELBO (an upper bound on the NLL) for "
        "diffusion models, the exact NLL for autoregressive ones.",
        "",
        "```python",
        "import unmask",
        "",
        'm = unmask.load("THIS_DIRECTORY")',
        'print(m.generate(length=200, steps=64))  # prompt="..." for a fixed start',
        'print(m.score(["some text in the training vocabulary"]))  # bits per character',
        "```",
        "",
        f"Files: `{WEIGHTS_FILE}` (weights only), `{CONFIG_FILE}` (architecture, vocabulary, objective, training "
        "summary, the full training config).",
    ]
    return "\n".join(lines) + "\n"


# --- writing and reading --------------------------------------------------------------------------------------


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out={out}: directory exists and is not empty (give --overwrite=True to replace it)")


def export(ckpt_path: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the export directory of checkpoint `ckpt_path` at `out`; returns its config document."""
    from safetensors.torch import save_file

    _check_destination(out, overwrite)
    trained = load_trained(ckpt_path, "cpu")
    ckpt = ckpt_io.load_checkpoint(ckpt_path)
    tensors, tied = split_tied(trained.model.state_dict())
    config = export_config(trained, ckpt, tied)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": "pt", "unmask_export": str(EXPORT_FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(config, trained.model.num_params()), encoding="utf-8")
        umask = _umask()
        for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
            _fsync_file(tmp / name)
            os.chmod(tmp / name, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the directory private; give it the usual permissions
        old = None
        if out.exists():  # empty, or --overwrite: move it aside first, so `out` is never missing a file
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def load_export(path: Path, device: torch.device | str = "cpu") -> tuple[Transformer, Vocab, dict[str, Any]]:
    """(model in eval mode, vocabulary, config document) of an export directory; tied weights re-tied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if config.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, not {EXPORT_FORMAT!r}")
        if int(config["format_version"]) > EXPORT_FORMAT_VERSION:
            raise UserError(
                f"{path}: export format {config['format_version']} is newer than this unmask "
                f"({EXPORT_FORMAT_VERSION}); upgrade unmask"
            )
        model_config = ModelConfig(**config["model_config"])
        vocab = Vocab(tuple(config["vocab"]))
        tied: dict[str, str] = dict(config.get("tied_weights", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / CONFIG_FILE}: not a readable unmask export config ({exc})") from None
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{path / WEIGHTS_FILE}: cannot read weights ({exc})") from None
    model = Transformer(model_config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied name is missing from the file by design; the module ties it by construction, but re-tie
    # explicitly so an export is correct even for a tie the module does not make itself.
    for name, source in tied.items():
        _set_parameter(model, name, _get_parameter(model, source))
    problems = sorted(set(missing) - set(tied)) + sorted(unexpected)
    if problems:
        raise UserError(f"{path / WEIGHTS_FILE}: weights do not match the architecture in {CONFIG_FILE}: {problems}")
    model.to(device).eval()
    return model, vocab, config


def _get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr)
    if not isinstance(value, torch.nn.Parameter):
        raise UserError(f"tied weight {name}: not a parameter of the model")
    return value


def _set_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)


# --- the command ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                ExportArgs,
                "unmask export --ckpt=PATH --out=DIR [--overwrite=True]",
                "Write a checkpoint's weights (model.safetensors), config.json and a README.md model card to DIR; "
                "load it with unmask.load(DIR).",
            )
        )
        return 0
    _, flags = parse_flags(ExportArgs, argv, max_positional=0)
    args = ExportArgs(**flags)
    if args.ckpt is None:
        raise UserError("--ckpt=PATH: required (a checkpoint file or a run directory)")
    if args.out is None:
        raise UserError("--out=DIR: required (the directory to write)")
    path = resolve_checkpoint(args.ckpt, None)
    config = export(path, Path(args.out), args.overwrite)
    training = config["training"]
    print(
        f"exported {path} (iter {training['iterations']}, {config['objective']}) to {args.out}: "
        f"{WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE}"
    )
    return 0
