"""`unmask plot`: training curves of one or more runs from their `metrics.jsonl`, as one PNG.

Three panels share the x axis (iterations or epochs): the training loss (the logged per-step loss, and the
evaluation's train loss), the validation loss, and val_bpc. Curriculum stage changes (where the `stage` field of
the eval records changes) are dotted vertical lines in each run's colour. Several runs are overlaid, labelled by
their directory names: this is how two finished runs are compared.

matplotlib is an optional extra (`pip install 'unmask[plot]'`), imported only when drawing, with the Agg backend
(no display needed). Reading the records (`read_records`, `run_curves`) needs nothing beyond the standard library.
Values beyond the float32 range are skipped with a warning (no float32 loss reaches them, and matplotlib cannot
scale an axis to them); titles and run names are drawn as plain text (a `$` never starts mathtext).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unmask.config.flags import format_help, parse_flags
from unmask.errors import UserError, file_in_the_way
from unmask.storage.run_dir import METRICS, read_records

# The largest finite float32: a loss computed in float32 (or lower) never exceeds it; matplotlib's axis arithmetic
# overflows on values near the float64 limit (1.7e308 raised LinAlgError while drawing).
PLOT_LIMIT = 3.4028234663852886e38
PLOTTED_KEYS = ("iter", "epochs", "train_loss_step", "train_loss", "val_loss", "val_bpc")
INSTALL_HINT = "unmask plot needs matplotlib: pip install 'unmask[plot]' (or pip install matplotlib)"
XAxis = Literal["iter", "epochs"]


@dataclass
class PlotArgs:
    out: str = "curves.png"
    """PNG file to write."""
    x: XAxis = "iter"
    """x axis: 'iter' (iterations) or 'epochs' (passes over the training split)."""
    title: str | None = None
    """Figure title (default: the run names)."""


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def _number(value: Any) -> float | None:
    """A finite float within +-PLOT_LIMIT, or None (metrics.jsonl writes inf/nan as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) and abs(number) <= PLOT_LIMIT else None


def _too_large(value: Any) -> bool:
    """A number that `_number` drops for its size (a finite float beyond +-PLOT_LIMIT, or an integer beyond the
    float range), as opposed to inf/nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return _number(value) is None and (isinstance(value, int) or math.isfinite(value))


@dataclass
class Curve:
    """Points of one quantity: x values in iterations and epochs, y values (None where unknown)."""

    iters: list[float] = field(default_factory=list)
    epochs: list[float | None] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def xs(self, x: XAxis) -> list[float | None]:
        return list(self.iters) if x == "iter" else list(self.epochs)


@dataclass
class RunCurves:
    name: str
    train_loss_step: Curve  # kind "train": the loss of the logged step
    train_loss: Curve  # kind "eval": the evaluation's mean train loss
    val_loss: Curve
    val_bpc: Curve
    stage_changes: list[tuple[float, float | None, int]]  # (iter, epochs, new stage) where the eval stage changes


def _append(curve: Curve, record: dict[str, Any], key: str) -> None:
    y, it = _number(record.get(key)), _number(record.get("iter"))
    if y is None or it is None:
        return
    curve.iters.append(it)
    curve.epochs.append(_number(record.get("epochs")))
    curve.values.append(y)


def stage_changes(evals: list[dict[str, Any]]) -> list[tuple[float, float | None, int]]:
    """(iter, epochs, stage) of every eval record whose `stage` differs from the previous record's."""
    changes: list[tuple[float, float | None, int]] = []
    previous: int | None = None
    for record in evals:
        stage, it = record.get("stage"), _number(record.get("iter"))
        if not isinstance(stage, int) or it is None:
            continue
        if previous is not None and stage != previous:
            changes.append((it, _number(record.get("epochs")), stage))
        previous = stage
    return changes


def run_curves(run_dir: Path, warn: Callable[[str], None] = _warn) -> RunCurves:
    """The curves of one run directory (its metrics.jsonl), sorted by iteration; a resumed run's records for an
    iteration seen twice keep the later one."""
    path = run_dir / METRICS
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS} there (not a training run directory?)")
    records = read_records(path, warn)
    huge = [(record, key) for record in records for key in PLOTTED_KEYS if _too_large(record.get(key))]
    if huge:
        record, key = huge[0]
        warn(
            f"warning: {path}: skipping {len(huge)} value(s) beyond +-{PLOT_LIMIT:.2g}, too large to plot "
            f"(first: {key}={record[key]!r:.40} at iter {record.get('iter')!r:.40})"
        )
    by_kind: dict[str, dict[float, dict[str, Any]]] = {"train": {}, "eval": {}}
    for record in records:
        kind, it = record.get("kind"), _number(record.get("iter"))
        if kind in by_kind and it is not None:
            by_kind[kind][it] = record
    train = [by_kind["train"][k] for k in sorted(by_kind["train"])]
    evals = [by_kind["eval"][k] for k in sorted(by_kind["eval"])]
    if not train and not evals:
        raise UserError(f"{path}: no train or eval records")
    curves = RunCurves(run_dir.resolve().name, Curve(), Curve(), Curve(), Curve(), stage_changes(evals))
    for record in train:
        _append(curves.train_loss_step, record, "train_loss_step")
    for record in evals:
        _append(curves.train_loss, record, "train_loss")
        _append(curves.val_loss, record, "val_loss")
        _append(curves.val_bpc, record, "val_bpc")
    return curves


def _pairs(curve: Curve, x: XAxis) -> tuple[list[float], list[float]]:
    points = [(a, b) for a, b in zip(curve.xs(x), curve.values, strict=True) if a is not None]
    return [a for a, _ in points], [b for _, b in points]


def plain_text(text: str) -> str:
    """`text` for a matplotlib label, drawn as written: each `$` escaped, so no user text starts mathtext (a run
    named `$x^$` raised a parse error)."""
    return text.replace("$", r"\$")


def _unique_names(runs: list[RunCurves]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name} ({count + 1})"


def plot_runs(runs: list[RunCurves], out: Path, x: XAxis = "iter", title: str | None = None) -> Path:
    """Draw the runs' curves into the PNG `out` (Agg backend); returns `out`."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _unique_names(runs)
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    panels = [("training loss", "loss"), ("validation loss", "loss"), ("val_bpc", "bits per character")]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour, name = colours[i % len(colours)], plain_text(run.name)
        xs, ys = _pairs(run.train_loss_step, x)
        axes[0].plot(xs, ys, color=colour, alpha=0.35, linewidth=1, label=f"{name} (step)")
        xs, ys = _pairs(run.train_loss, x)
        axes[0].plot(xs, ys, color=colour, marker=".", label=f"{name} (eval)")
        for ax, curve in ((axes[1], run.val_loss), (axes[2], run.val_bpc)):
            xs, ys = _pairs(curve, x)
            ax.plot(xs, ys, color=colour, marker=".", label=name)
        for it, epochs, stage in run.stage_changes:
            where = it if x == "iter" else epochs
            if where is None:
                continue
            for ax in axes:
                ax.axvline(where, color=colour, linestyle=":", linewidth=1)
            axes[1].annotate(
                f"stage {stage}",
                (where, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=colour,
            )
    for ax, (label, unit) in zip(axes, panels, strict=True):
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("iteration" if x == "iter" else "epochs")
    fig.suptitle(plain_text(title or ", ".join(run.name for run in runs)))
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=100, format="png")
        tmp.replace(out)
    except OSError as exc:  # disk full, read-only, --out a directory, a file where a directory should be
        blocker = file_in_the_way(out)
        reason = f"{blocker} is not a directory" if blocker else exc.strerror or exc
        raise UserError(f"--out={out}: cannot write: {reason}") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                PlotArgs,
                "unmask plot RUN_DIR [RUN_DIR ...] [--out=FILE.png] [--x=iter|epochs]",
                "Training and validation loss and val_bpc of one or more runs (their metrics.jsonl), stage changes "
                "marked, runs overlaid.",
            )
        )
        return 0
    positional, flags = parse_flags(PlotArgs, argv, max_positional=sys.maxsize)
    args = PlotArgs(**flags)
    if not positional:
        raise UserError("unmask plot: name at least one run directory (holding metrics.jsonl)")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out={args.out}: must be a .png file")
    try:
        import matplotlib  # noqa: F401 - checked before reading the runs, so the hint comes first
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    runs = [run_curves(Path(p)) for p in positional]
    out = plot_runs(runs, Path(args.out), args.x, args.title)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}, x = {args.x})")
    return 0
