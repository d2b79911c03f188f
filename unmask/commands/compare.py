"""`unmask compare`: several objectives, same data, same budget, val_bpc against epochs.

`--objectives=autoregressive,mdlm,block_diffusion:4` names the runs. Every run takes every `unmask train` flag
given (model size, batch, iterations, learning rate, ...); only the objective differs. The result is val_bpc
against epochs for each (the data-constrained comparison of Prabhudesai et al. 2025, "Diffusion beats
autoregressive in data-constrained settings", at small scale), printed as a table and written to
`OUT_DIR/compare.json`, `OUT_DIR/compare.csv` and (matplotlib, the `plot` extra) `OUT_DIR/compare.png`. The runs
live in `OUT_DIR/<label>/` as ordinary training runs (checkpoints, metrics.jsonl).

The objectives are those of `unmask.objectives.registry`. One with a length flag (`Objective.length_flag`: block
diffusion's block length) is named per run as `NAME:K` (so several K compare in one call, as `block_diffusion_kK`); a
plain `block_diffusion` takes `--diffusion_block=K`, which is given to the block-diffusion runs only (the other
objectives refuse the flag). The flags an objective lists in `Objective.run_only_flags` (`--mask_rate_window`
likewise) reach its runs only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unmask.config.flags import check_values, format_help, load_preset, parse_flags
from unmask.errors import UserError
from unmask.objectives import registry
from unmask.storage.checkpoint import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from unmask.config.train_config import TrainConfig
    from unmask.objectives.base import Objective

INSTALL_HINT = "--plot=True: compare.png needs matplotlib: pip install 'unmask[plot]' (or pass --plot=False)"


@dataclass
class CompareArgs:
    objectives: str = "autoregressive,mdlm"
    """Comma-separated objectives to train (the --objective values below), each in OUT_DIR/<label>;
    block_diffusion takes its block length from --diffusion_block, or per run as block_diffusion:K (label
    block_diffusion_kK; several K may be compared in one call)."""
    plot: bool = True
    """Also write OUT_DIR/compare.png (val_bpc against epochs, best point of each run marked); needs matplotlib,
    checked before any training starts."""
    diffusion_objective: str | None = None
    """Deprecated: --diffusion_objective=X means --objectives=autoregressive,X."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: its label (column and directory name), objective and block length (0: none)."""

    label: str
    objective: str
    diffusion_block: int = 0


def objective_classes() -> dict[str, type[Objective[Any]]]:
    """The registered `--objective` values and their classes (read for their class attributes only)."""
    from unmask.objectives.base import objective_class

    return {name: objective_class(name) for name in registry.names()}


def run_only_flags() -> tuple[str, ...]:
    """Train flags that only some objectives take (`Objective.run_only_flags`): given to those runs only."""
    return tuple(dict.fromkeys(f for cls in objective_classes().values() for f in cls.run_only_flags))


def diffusion_objectives() -> tuple[str, ...]:
    """The registered objectives that are not autoregressive (the values of the deprecated --diffusion_objective)."""
    return tuple(name for name, cls in objective_classes().items() if not getattr(cls, "causal", False))


def parse_objectives(text: str, given: dict[str, Any] | None = None) -> list[RunSpec]:
    """`--objectives` as run specs. `given`: the run-only train flags given (`run_only_flags`); a plain NAME whose
    objective has a length flag (`Objective.length_flag`, block diffusion's --diffusion_block) takes K from there."""
    given = given or {}
    classes = objective_classes()
    with_length = [name for name, cls in classes.items() if cls.length_flag]
    specs: list[RunSpec] = []
    used: set[str] = set()  # length flags a plain NAME took its K from
    for item in (part.strip() for part in text.split(",")):
        name, colon, k_text = item.partition(":")
        if name not in classes:
            raise UserError(f"--objectives={text}: unknown objective {item!r} (expected {', '.join(classes)})")
        flag = classes[name].length_flag
        if flag is None:
            if colon:
                raise UserError(
                    f"--objectives={text}: {item!r}: only {' and '.join(with_length)} takes a block length (:K)"
                )
            specs.append(RunSpec(name, name))
            continue
        if colon:
            # ASCII digits only: str.isdigit accepts '²' (int() then raises) and '٣' (int() reads 3); at most 9 of
            # them, far beyond any block_size, so int() never meets its 4300-digit limit.
            if not re.fullmatch(r"[0-9]{1,9}", k_text) or int(k_text) < 1:
                raise UserError(
                    f"--objectives={text}: {item!r}: K must be an integer >= 1 in ASCII digits, at most 9 of them "
                    f"({name}:4)"
                )
            k = int(k_text)
        elif given.get(flag):
            k = int(given[flag])
            used.add(flag)
        else:
            raise UserError(f"--objectives={text}: {name} needs a block length: write {name}:K or give --{flag}=K")
        specs.append(RunSpec(f"{name}_k{k}", name, k))
    labels = [s.label for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--objectives={text}: {', '.join(repeated)} named twice")
    for flag in dict.fromkeys(cls.length_flag for cls in classes.values() if cls.length_flag):
        if given.get(flag) and flag not in used:
            takers = " or ".join(name for name, cls in classes.items() if cls.length_flag == flag)
            raise UserError(
                f"--{flag}={given[flag]}: applies to a plain {takers} in --objectives, and --objectives={text} has none"
            )
    return specs


def run_configs(
    base: dict[str, Any], specs: list[RunSpec], out: Path, block_values: dict[str, Any] | None = None
) -> list[TrainConfig]:
    """One TrainConfig per spec: the shared train flags, the spec's objective, OUT_DIR/<label>, and the
    `block_values` (run-only flags given, such as --mask_rate_window) the spec's objective takes, with the spec's K
    for its length flag. Built (so validated) before any run trains: a K that does not divide block_size fails in
    one line, not after the first run has trained."""
    from unmask.config.train_config import TrainConfig

    classes = objective_classes()
    shared = {k: v for k, v in base.items() if k not in run_only_flags()}
    configs = []
    for spec in specs:
        values = {**shared, "objective": spec.objective, "out_dir": str(out / spec.label)}
        cls = classes[spec.objective]
        values.update({k: v for k, v in (block_values or {}).items() if k in cls.run_only_flags})
        if cls.length_flag:
            values[cls.length_flag] = spec.diffusion_block
        try:
            configs.append(TrainConfig.from_dict(values))
        except UserError as exc:
            raise UserError(f"{exc} (run {spec.label})") from None
    return configs


def eval_points(run_dir: Path) -> list[tuple[int, float | None, float]]:
    """(iter, epochs, val_bpc) of a run's evaluations with a finite val_bpc, in iteration order."""
    from unmask.commands.plot import run_curves

    curve = run_curves(run_dir).val_bpc
    return [(int(i), e, v) for i, e, v in zip(curve.iters, curve.epochs, curve.values, strict=True)]


def comparison_rows(points: dict[str, list[tuple[int, float | None, float]]]) -> list[dict[str, Any]]:
    """One row per evaluation iteration of any run: iter, epochs and `<label>_val_bpc` per run (None where a run
    has no finite value there). Epochs come from the first run evaluated at that iteration: the runs share the
    data and batch shape, so they agree."""
    rows: dict[int, dict[str, Any]] = {}
    for label, run in points.items():
        for it, epochs, bpc in run:
            row = rows.setdefault(it, {"iter": it, "epochs": epochs, **{f"{name}_val_bpc": None for name in points}})
            if row["epochs"] is None:
                row["epochs"] = epochs
            row[f"{label}_val_bpc"] = bpc
    return [rows[it] for it in sorted(rows)]


def best_points(points: dict[str, list[tuple[int, float | None, float]]]) -> dict[str, dict[str, Any]]:
    """Per run: the evaluation with the lowest val_bpc (the earliest on ties), or None for a run without one."""
    best: dict[str, dict[str, Any]] = {}
    for label, run in points.items():
        if run:
            it, epochs, bpc = min(run, key=lambda p: (p[2], p[0]))
            best[label] = {"iter": it, "epochs": epochs, "val_bpc": bpc}
    return best


def format_table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    width = {label: max(len(label) + 8, 11) for label in labels}
    lines = [f"{'iter':>7} {'epochs':>8} " + " ".join(f"{label + ' val_bpc':>{width[label]}}" for label in labels)]
    for row in rows:
        epochs = "" if row["epochs"] is None else f"{row['epochs']:.3f}"
        cells = []
        for label in labels:
            value = row[f"{label}_val_bpc"]
            cells.append(f"{'-' if value is None else f'{value:.4f}':>{width[label]}}")
        lines.append(f"{row['iter']:>7} {epochs:>8} " + " ".join(cells))
    return "\n".join(lines)


def plot_comparison(
    points: dict[str, list[tuple[int, float | None, float]]], out: Path, title: str | None = None
) -> Path:
    """compare.png: val_bpc against epochs, one line per run, its best point starred (and given in the legend). Written
    atomically (rendered to memory, then one atomic file write)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for label, run in points.items():
            pairs = [(e, v) for _, e, v in run if e is not None]
            if not pairs:
                continue
            epochs, bpc = min(pairs, key=lambda p: p[1])
            label_best = f"{label} (best {bpc:.3f} at {epochs:.0f} epochs)"
            (line,) = ax.plot([e for e, _ in pairs], [v for _, v in pairs], marker=".", label=label_best)
            ax.plot([epochs], [bpc], marker="*", markersize=14, color=line.get_color(), linestyle="none")
        ax.set_xlabel("epochs")
        ax.set_ylabel("val_bpc (AR: exact NLL; diffusion: ELBO bound)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
        ax.set_title(title or "val_bpc against epochs (best point starred)", fontsize=10)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=100, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """compare's own flags (CompareArgs fields, `--key=value` or `--key value`) and the rest (train flags)."""
    own_keys = {f.name: f.type for f in dataclasses.fields(CompareArgs)}
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, _ = arg[2:].partition("=")
        key = key.replace("-", "_")
        if arg.startswith("--") and key in own_keys:
            own.append(arg)
            takes_next = not eq and own_keys[key] not in ("bool", bool)
            if takes_next and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                own.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return own, rest


def _help() -> str:
    from unmask.config.train_config import TrainConfig

    own = format_help(
        CompareArgs,
        "unmask compare [PRESET] [--objectives=autoregressive,mdlm,block_diffusion:4] [--plot=False] [train flags ...]",
        "Train each objective with the same train flags (OUT_DIR/<label>/ per run) and report val_bpc against "
        "epochs: a table, OUT_DIR/compare.json, compare.csv and compare.png.",
    )
    train = format_help(TrainConfig, "", "")
    train_flags = train[train.index("\nflags:\n") + len("\nflags:\n") :]
    return (
        f"{own}\n\ntrain flags (every unmask train flag, shared by every run; --objective and --init_from are "
        f"refused: compare picks the objectives and starts from scratch):\n{train_flags}"
    )


def main(argv: list[str]) -> int:
    from unmask.config.train_config import TrainConfig
    from unmask.runtime import init_runtime, set_threads
    from unmask.storage.run_dir import check_new_run
    from unmask.training.trainer import Trainer

    if "--help" in argv or "-h" in argv:
        print(_help())
        return 0
    own, rest = _split_argv(argv)
    _, flags = parse_flags(CompareArgs, own, max_positional=0)
    args = CompareArgs(**flags)
    if args.diffusion_objective is not None:
        if "objectives" in flags:
            raise UserError("--diffusion_objective: deprecated; give --objectives alone")
        if args.diffusion_objective not in diffusion_objectives():
            raise UserError(
                f"--diffusion_objective={args.diffusion_objective}: expected one of {', '.join(diffusion_objectives())}"
            )
        print(
            f"unmask compare: warning: --diffusion_objective is deprecated; write "
            f"--objectives=autoregressive,{args.diffusion_objective}",
            file=sys.stderr,
        )
        args.objectives = f"autoregressive,{args.diffusion_objective}"
    if any(a.startswith(("--objective=", "--init_from=")) or a in ("--objective", "--init_from") for a in rest):
        raise UserError(
            "--objective/--init_from: compare chooses the objectives (--objectives) and always starts from scratch"
        )
    positional, train_flags = parse_flags(TrainConfig, rest, max_positional=1)
    values = {**(load_preset(positional[0], TrainConfig) if positional else {}), **train_flags}
    block_values = {k: values.pop(k) for k in run_only_flags() if k in values}
    check_values(TrainConfig, block_values)  # used before a TrainConfig checks them
    base = TrainConfig.from_dict(values)
    specs = parse_objectives(args.objectives, block_values)
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - checked before training, so a missing extra costs no compute
        except ImportError:
            raise UserError(INSTALL_HINT) from None
    out = Path(base.out_dir)
    configs = run_configs(base.to_dict(), specs, out, block_values)
    for cfg in configs:  # the trainer checks each again when it starts; this refuses before the first run trains
        check_new_run(Path(cfg.out_dir), cfg.overwrite)
    set_threads(base.threads)
    runtime = init_runtime(base.device, base.dtype, base.backend)
    points: dict[str, list[tuple[int, float | None, float]]] = {}
    try:
        for spec, cfg in zip(specs, configs, strict=True):
            if runtime.is_master:
                print(f"=== {spec.label} -> {cfg.out_dir} ===", flush=True)
            Trainer(cfg, runtime).run()
            points[spec.label] = eval_points(Path(cfg.out_dir)) if runtime.is_master else []
    finally:
        runtime.shutdown()
    if not runtime.is_master:
        return 0
    labels = [s.label for s in specs]
    rows = comparison_rows(points)
    best = best_points(points)
    print("\n" + format_table(rows, labels))
    for label in labels:
        if label in best:
            b = best[label]
            epochs = "?" if b["epochs"] is None else f"{b['epochs']:.2f}"
            print(f"best {label}: val_bpc {b['val_bpc']:.4f} at iter {b['iter']} ({epochs} epochs)")
    summary = {
        "objectives": [dataclasses.asdict(s) for s in specs],
        "config": base.to_dict(),
        "rows": rows,
        "best": best,
    }
    atomic_write_json(out / "compare.json", summary)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["iter", "epochs", *(f"{label}_val_bpc" for label in labels)])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "compare.csv", table.getvalue().encode())
    written = [out / "compare.json", out / "compare.csv"]
    if args.plot:
        written.append(plot_comparison(points, out / "compare.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
