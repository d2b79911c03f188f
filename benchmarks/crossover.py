"""A CPU-sized data-constrained crossover study: autoregressive vs masked diffusion over hundreds of epochs.

Prabhudesai et al. 2025 ("Diffusion beats autoregressive in data-constrained settings") find that when the same
small corpus is repeated for many epochs, an autoregressive model peaks early and then overfits while a masked
diffusion model keeps improving and eventually passes it. This script runs that experiment at CPU scale with
`unmask compare`: a ~0.8M-parameter model (4 layers, 128 wide, block 64, batch 12) on a prefix of tiny
Shakespeare, the autoregressive baseline at several dropouts (its best one is the baseline: dropout is the usual
remedy for overfitting, so the comparison is against a tuned AR), MDLM and block diffusion (Arriola et al. 2025)
with K=4, every run on the same data, schedule and evaluation set.

    python benchmarks/crossover.py --data_dir=DATA_DIR --dataset=NAME --out_dir=OUT [--epochs=200]
        [--ar_dropouts=0.0,0.1,0.2] [--diffusion_dropout=0.0] [--objectives=mdlm,block_diffusion:4] [--jobs=2]
        [--eval_every_epochs=4] [--png=FILE] [--overwrite]

The dataset is prepared first (`unmask prepare --input=FILE --name=NAME --data_dir=DATA_DIR`). Each AR dropout is
one `unmask compare --objectives=autoregressive` in OUT/ar_dropout_D, each diffusion objective one `unmask compare`
in OUT/LABEL; `--jobs=2` runs two of those commands at a time (one thread each). The merged table (val_bpc per
evaluation, a column per run), each run's best point and OUT/crossover.json are printed and written at the end, and
the val_bpc-vs-epochs PNG (every run, best points starred) to --png (default OUT/crossover.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from unmask.commands.compare import (
    best_points,
    comparison_rows,
    eval_points,
    format_table,
    parse_objectives,
    plot_comparison,
)
from unmask.data.dataset import load_dataset

MODEL_FLAGS = [
    "--device=cpu",
    "--compile=False",
    "--dtype=float32",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--block_size=64",
    "--batch_size=12",
    "--learning_rate=1e-3",
    "--min_lr=1e-4",
    "--warmup_iters=100",
    "--use_paragraph_boundaries=False",  # a short prefix has few paragraph starts: windows anywhere
    "--eval_iters=10",
    "--keep_last=1",
    "--log_interval=100",
]


def _run(cmd: list[str], log: Path) -> tuple[list[str], float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc:
        sys.exit(f"{' '.join(cmd)} exited {rc}; see {log}")
    return cmd, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--epochs", type=float, default=200.0)
    parser.add_argument("--eval_every_epochs", type=float, default=4.0)
    parser.add_argument("--ar_dropouts", default="0.0,0.1,0.2")
    parser.add_argument("--diffusion_dropout", type=float, default=0.0)
    parser.add_argument("--objectives", default="mdlm,block_diffusion:4", help="the diffusion runs (compare syntax)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--png", default=None)
    parser.add_argument("--overwrite", action="store_true")
    a = parser.parse_args()

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_train = len(load_dataset(Path(a.data_dir) / a.dataset).train)
    chars_per_iter = 12 * 64
    eval_interval = max(1, round(a.eval_every_epochs * n_train / chars_per_iter))
    # max_iters: the first evaluation at or past --epochs, so the last point is evaluated (and the cosine ends there)
    max_iters = eval_interval * math.ceil(a.epochs * n_train / chars_per_iter / eval_interval)
    shared = [
        f"--data_dir={a.data_dir}",
        f"--dataset={a.dataset}",
        *MODEL_FLAGS,
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}",
        f"--eval_interval={eval_interval}",
        *(["--overwrite=True"] if a.overwrite else []),
    ]
    unmask = [sys.executable, "-m", "unmask", "compare"]
    groups: dict[str, list[str]] = {}
    specs = parse_objectives(a.objectives)
    for spec in specs:  # one command per diffusion run, so --jobs spreads them over the workers
        objective = spec.objective if spec.objective != "block_diffusion" else f"block_diffusion:{spec.diffusion_block}"
        groups[spec.label] = [f"--objectives={objective}", f"--dropout={a.diffusion_dropout}"]
    dropouts = [float(d) for d in a.ar_dropouts.split(",") if d.strip()]
    for d in dropouts:
        groups[f"ar_dropout_{d:g}"] = ["--objectives=autoregressive", f"--dropout={d}"]
    order = list(groups)  # diffusion first: its iterations and evaluations cost more, so the jobs end together
    print(
        f"{a.dataset}: {n_train:,} train characters, {chars_per_iter} per iteration: {max_iters} iterations = "
        f"{max_iters * chars_per_iter / n_train:.1f} epochs, evaluated every {eval_interval} "
        f"({eval_interval * chars_per_iter / n_train:.2f} epochs)",
        flush=True,
    )
    commands = {g: [*unmask, *shared, *groups[g], "--plot=False", f"--out_dir={out / g}"] for g in order}
    for g in order:
        print("$ python " + " ".join(commands[g][1:]), flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for cmd, seconds in pool.map(lambda g: _run(commands[g], out / f"{g}.log"), order):
            print(f"done in {seconds / 60:.1f} min: {cmd[-1]}", flush=True)
    wall = time.perf_counter() - t0

    points: dict[str, list[tuple[int, float | None, float]]] = {}
    for d in dropouts:
        points[f"autoregressive_dropout{d:g}"] = eval_points(out / f"ar_dropout_{d:g}" / "autoregressive")
    for spec in specs:
        points[spec.label] = eval_points(out / spec.label / spec.label)
    best = best_points(points)
    rows = comparison_rows(points)
    labels = list(points)
    print("\n" + format_table(rows, labels))
    ar_labels = [label for label in labels if label.startswith("autoregressive")]
    best_ar = min(ar_labels, key=lambda label: best[label]["val_bpc"])
    print()
    for label in labels:
        b = best[label]
        mark = "  <- best AR" if label == best_ar else ""
        print(f"best {label}: val_bpc {b['val_bpc']:.4f} at {b['epochs']:.1f} epochs (iter {b['iter']}){mark}")
    for label in labels:
        if label in ar_labels:
            continue
        gap = best[label]["val_bpc"] - best[best_ar]["val_bpc"]
        col = f"{label}_val_bpc"
        passes = [r["epochs"] for r in rows if r[col] is not None and r[col] < best[best_ar]["val_bpc"]]
        verdict = f"passes the best AR from {passes[0]:.1f} epochs" if passes else "never passes the best AR"
        print(f"{label}: best minus best AR = {gap:+.4f} bpc; {verdict}")
    png = Path(a.png) if a.png else out / "crossover.png"
    plot_comparison(points, png, title=f"{a.dataset}: val_bpc against epochs (best starred)")
    summary = {
        "dataset": a.dataset,
        "n_train": n_train,
        "max_iters": max_iters,
        "eval_interval": eval_interval,
        "commands": {g: commands[g][1:] for g in order},
        "rows": rows,
        "best": best,
        "best_ar": best_ar,
        "wall_s": wall,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    (out / "crossover.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'crossover.json'} and {png}; wall {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
