"""The data-constrained crossover study: autoregressive vs masked diffusion over hundreds of epochs, at several
corpus sizes.

Prabhudesai et al. 2025 ("Diffusion beats autoregressive in data-constrained settings") report that when the same
data is repeated, an autoregressive model stops gaining after a few tens of epochs and then overfits, while masked
diffusion keeps improving for hundreds, and that diffusion's best validation loss ends below AR's. This script runs
that experiment at character level on a 2-core CPU: for each corpus size (a prefix of the training split of the
source; the validation split is always the source's whole validation split) it trains the autoregressive model at
several dropouts (the best one is the tuned baseline), MDLM and block diffusion (K = 4) with one model size and one
schedule, evaluating val_bpc on the same fixed uniform windows of the validation split at fixed epoch intervals.

    python benchmarks/crossover.py --out_dir=OUT [--source=FILE] [--corpus_chars=25000,100000,400000]
        [--epochs=500,40,10] [--ar_dropouts=0,0.1,0.2,0.3] [--objectives=mdlm,block_diffusion:4]
        [--evals=50] [--jobs=2] [--json=FILE] [--png=FILE]

Without --source the corpus is tiny Shakespeare, obtained as `unmask prepare` obtains it (offline with
UNMASK_DATA_MIRROR set). Its training split is the first 90 % of the characters and the validation split the
rest, as `unmask prepare` splits it. Each corpus size N gets a dataset OUT/data/cN (the first N training
characters + the whole validation split) and each run is a run directory OUT/cN/LABEL. The study resumes: a run
whose marker OUT/cN/LABEL.done exists is skipped, a run with a checkpoint continues from it
(`--init_from=resume`), any other starts afresh; so a killed study continues where it stopped when the same
command is run again. Progress and ETA go to the console every minute; the records (one per run: corpus_chars,
objective, dropout, epochs_trained, best_val_bpc, best_epoch, val_bpc_by_epoch, flags, commit) go to --json
(default OUT/crossover.json) and the val_bpc-vs-epochs figure, one panel per corpus size, to --png (default
OUT/crossover.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from unmask.commands.compare import eval_points
from unmask.data.dataset import load_dataset

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 12
BLOCK_SIZE = 64
MODEL_FLAGS = [
    "--device=cpu",
    "--compile=False",
    "--dtype=float32",
    "--threads=1",
    "--n_layer=2",
    "--n_head=4",
    "--n_embd=64",
    f"--block_size={BLOCK_SIZE}",
    f"--batch_size={BATCH_SIZE}",
    "--learning_rate=1e-3",
    "--min_lr=1e-4",
    "--warmup_iters=100",
    "--use_paragraph_boundaries=False",  # uniform windows: a short prefix has few paragraph starts
    "--eval_iters=25",  # 300 fixed windows of 64 characters drawn uniformly from the whole validation split
    "--keep_last=1",
    "--always_save_checkpoint=True",
    "--log_interval=200",
]
# Relative cost of an iteration (block diffusion runs its model over the doubled sequence [x_t ; x_0]).
COST = {"autoregressive": 1.0, "mdlm": 1.05, "unmasking": 1.05, "block_diffusion": 2.3}
ITER_LINE = re.compile(r"iter (\d+)/(\d+)")
RUNNING: set[subprocess.Popen[bytes]] = set()  # the training processes now running


@dataclass
class Run:
    corpus_chars: int
    label: str
    objective: str
    dropout: float
    extra: list[str]
    max_iters: int
    eval_interval: int
    dir: Path
    flags: list[str] = field(default_factory=list)

    @property
    def done_marker(self) -> Path:
        return self.dir.with_name(self.dir.name + ".done")

    @property
    def log(self) -> Path:
        return self.dir.with_name(self.dir.name + ".log")

    @property
    def cost(self) -> float:
        return self.max_iters * COST[self.objective]

    def progress(self) -> int:
        """Iterations done: max_iters when finished, else the last 'iter i/N' line of the log."""
        if self.done_marker.exists():
            return self.max_iters
        try:
            lines = ITER_LINE.findall(self.log.read_text(errors="replace")[-4000:])
        except OSError:
            return 0
        return int(lines[-1][0]) if lines else 0


def split_source(text: str) -> tuple[str, str]:
    """The source's training and validation splits, cut as `unmask prepare` cuts them (val_fraction 0.1)."""
    n_train = int(len(text) * 0.9)
    return text[:n_train], text[n_train:]


def make_dataset(data_dir: Path, name: str, train: str, val: str) -> None:
    """A prepared dataset whose train.bin is exactly `train` and val.bin exactly `val`."""
    from unmask.data.prepare import prepare

    if (data_dir / name / "meta.json").exists():
        return
    tmp = data_dir / f"{name}.txt"
    tmp.write_text(train + val, encoding="utf-8")
    # prepare keeps int(n * (1 - f)) characters for training: half a character of slack makes that exactly len(train)
    fraction = (len(val) - 0.5) / (len(train) + len(val))
    prepare(None, tmp, name, data_dir, val_fraction=fraction, log=lambda _: None)
    tmp.unlink()
    ds = load_dataset(data_dir / name)
    if (len(ds.train), len(ds.val)) != (len(train), len(val)):
        sys.exit(f"{name}: prepared {len(ds.train)}/{len(ds.val)} characters, wanted {len(train)}/{len(val)}")


def source_text(source: str | None) -> str:
    if source:
        return Path(source).read_text(encoding="utf-8")
    from unmask.data.sources import fetch_tiny_shakespeare

    corpus = fetch_tiny_shakespeare(lambda line: print(line, flush=True))
    with corpus.open() as f:
        return f.read().decode("utf-8")


def plan_runs(a: argparse.Namespace, out: Path) -> list[Run]:
    sizes = [int(s) for s in a.corpus_chars.split(",")]
    epochs = [float(e) for e in a.epochs.split(",")]
    if len(epochs) != len(sizes):
        sys.exit(f"--epochs: {len(epochs)} values for {len(sizes)} corpus sizes")
    runs: list[Run] = []
    specs: list[tuple[str, str, float, list[str]]] = [
        (f"ar_dropout{d:g}", "autoregressive", d, []) for d in (float(x) for x in a.ar_dropouts.split(","))
    ]
    for spec in a.objectives.split(","):
        name, _, k = spec.partition(":")
        extra = [f"--diffusion_block={k}"] if k else []
        label = f"{name}_k{k}" if k else name
        specs.append((label, name, a.diffusion_dropout, extra + a.diffusion_flags.split()))
    chars_per_iter = BATCH_SIZE * BLOCK_SIZE
    for n, ep in zip(sizes, epochs, strict=True):
        # max_iters is a whole number of evaluation intervals, so the last point is evaluated where the cosine ends
        eval_interval = max(1, math.ceil(ep * n / chars_per_iter / a.evals))
        max_iters = eval_interval * a.evals
        for label, objective, dropout, extra in specs:
            runs.append(Run(n, label, objective, dropout, extra, max_iters, eval_interval, out / f"c{n}" / label))
    return runs


def run_flags(run: Run, data_dir: Path) -> list[str]:
    return [
        f"--data_dir={data_dir}",
        f"--dataset=c{run.corpus_chars}",
        f"--objective={run.objective}",
        *MODEL_FLAGS,
        f"--dropout={run.dropout:g}",
        *run.extra,
        f"--max_iters={run.max_iters}",
        f"--lr_decay_iters={run.max_iters}",
        f"--eval_interval={run.eval_interval}",
        f"--out_dir={run.dir}",
    ]


def train(run: Run, data_dir: Path, failed: threading.Event) -> None:
    if run.done_marker.exists() or failed.is_set():  # after a failure no new run starts: the study stops
        return
    resume = any(run.dir.glob("*.pt"))
    cmd = [sys.executable, "-m", "unmask", "train", *run.flags, "--init_from=resume" if resume else "--overwrite=True"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with run.log.open("a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        f.flush()
        # cwd: `python -m` puts it first on sys.path, so a stray module where the study was started cannot shadow one
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=run.dir.parent, check=False
        ).returncode
    seconds = time.perf_counter() - t0
    if rc:
        failed.set()
        raise RuntimeError(f"c{run.corpus_chars}/{run.label} exited {rc}; see {run.log}")
    run.done_marker.write_text(json.dumps({"seconds": seconds}))


def report_progress(runs: list[Run], t0: float, done0: float, stop: threading.Event, every: float) -> None:
    total = sum(r.cost for r in runs)
    while not stop.wait(every):
        done = sum(r.cost * r.progress() / r.max_iters for r in runs)
        rate = (done - done0) / (time.perf_counter() - t0)
        eta = (total - done) / rate if rate > 0 else math.inf
        running = [
            f"c{r.corpus_chars}/{r.label} {i}/{r.max_iters}" for r in runs if 0 < (i := r.progress()) < r.max_iters
        ]
        eta_text = f"{eta / 60:.0f} min" if math.isfinite(eta) else "?"
        now = time.strftime("%H:%M:%S")
        print(f"[{now}] {100 * done / total:.1f}% done, ETA {eta_text}; " + "; ".join(running), flush=True)


def record(run: Run, commit: str, n_val: int) -> dict[str, Any]:
    points = eval_points(run.dir)
    chars_per_iter = BATCH_SIZE * BLOCK_SIZE
    curve = [[round(it * chars_per_iter / run.corpus_chars, 3), round(bpc, 5)] for it, _, bpc in points]
    best_epoch, best = min(curve, key=lambda p: (p[1], p[0]))
    epochs_trained = curve[-1][0]
    marker = json.loads(run.done_marker.read_text())
    return {
        "corpus_chars": run.corpus_chars,
        "val_chars": n_val,
        "label": run.label,
        "objective": run.objective,
        "dropout": run.dropout,
        "epochs_trained": epochs_trained,
        "best_val_bpc": best,
        "best_epoch": best_epoch,
        # the stopping rule of the study: validation has not improved for the last 30 % of the epochs
        "plateaued": best_epoch <= 0.7 * epochs_trained,
        "val_bpc_by_epoch": curve,
        "flags": run.flags,
        "commit": commit,
        "train_seconds_last_invocation": round(marker["seconds"], 1),
    }


def plot(records: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["corpus_chars"] for r in records})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for r in (r for r in records if r["corpus_chars"] == n):
            xs, ys = zip(*r["val_bpc_by_epoch"], strict=True)
            ar = r["objective"] == "autoregressive"
            label = f"AR dropout {r['dropout']:g}" if ar else r["label"].replace("_k", " K=")
            (line,) = ax.plot(xs, ys, "--" if ar else "-", lw=1.3, label=label)
            ax.plot([r["best_epoch"]], [r["best_val_bpc"]], "*", ms=10, color=line.get_color())
        ax.set_title(f"{n:,} training characters")
        ax.set_xlabel("epochs")
        ax.set_ylabel("val bpc (diffusion: upper bound)")
        lo = min(r["best_val_bpc"] for r in records if r["corpus_chars"] == n)
        ax.set_ylim(lo - 0.1, lo + 1.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def summarise(records: list[dict[str, Any]]) -> None:
    for n in sorted({r["corpus_chars"] for r in records}):
        rs = [r for r in records if r["corpus_chars"] == n]
        ar = min((r for r in rs if r["objective"] == "autoregressive"), key=lambda r: r["best_val_bpc"])
        best = f"{ar['best_val_bpc']:.4f} at {ar['best_epoch']:g}"
        print(f"\n{n:,} characters: best AR dropout {ar['dropout']:g}: {best}")
        for r in rs:
            line = f"  {r['label']:<18} best {r['best_val_bpc']:.4f} at epoch {r['best_epoch']:g}"
            line += f" of {r['epochs_trained']:g}"
            if r["objective"] != "autoregressive":
                below = [e for e, v in r["val_bpc_by_epoch"] if v < ar["best_val_bpc"]]
                line += f"; {r['best_val_bpc'] - ar['best_val_bpc']:+.4f} vs best AR; " + (
                    f"below it from epoch {below[0]:g}" if below else "never below it"
                )
            print(line + ("" if r["plateaued"] else " (still improving)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--source", default=None, help="a UTF-8 text file (default: tiny Shakespeare)")
    parser.add_argument("--corpus_chars", default="25000,100000,400000")
    parser.add_argument("--epochs", default="500,40,10", help="epochs per corpus size")
    parser.add_argument("--ar_dropouts", default="0,0.1,0.2,0.3")
    parser.add_argument("--objectives", default="mdlm,block_diffusion:4", help="diffusion runs: NAME or NAME:K")
    parser.add_argument("--diffusion_dropout", type=float, default=0.0)
    parser.add_argument("--diffusion_flags", default="", help="extra train flags of every diffusion run")
    parser.add_argument("--evals", type=int, default=50, help="evaluations per run, evenly spaced")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--progress_every", type=float, default=60.0, help="seconds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    a = parser.parse_args()

    out = Path(a.out_dir)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(a, out)
    sizes = sorted({r.corpus_chars for r in runs})
    train_text, val_text = split_source(source_text(a.source))
    if sizes[-1] > len(train_text):
        sys.exit(f"--corpus_chars={sizes[-1]}: the source's training split has {len(train_text):,} characters")
    for n in sizes:
        make_dataset(data_dir, f"c{n}", train_text[:n], val_text)
        (out / f"c{n}").mkdir(exist_ok=True)
    for r in runs:
        r.flags = run_flags(r, data_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    todo = [r for r in runs if not r.done_marker.exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished; validation: {len(val_text):,} characters")
    for r in runs:
        print(
            f"  c{r.corpus_chars}/{r.label}: {r.max_iters} iterations = "
            f"{r.max_iters * BATCH_SIZE * BLOCK_SIZE / r.corpus_chars:.1f} epochs, eval every {r.eval_interval}"
        )
    t0 = time.perf_counter()
    done0 = sum(r.cost * r.progress() / r.max_iters for r in runs)
    stop = threading.Event()
    reporter = threading.Thread(target=report_progress, args=(runs, t0, done0, stop, a.progress_every), daemon=True)
    reporter.start()
    # the expensive runs first, so the two workers end together
    todo.sort(key=lambda r: -r.cost)
    failed = threading.Event()
    # SIGINT or SIGTERM stop the study (a background job's shell would otherwise have it ignore SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pool = ThreadPoolExecutor(max_workers=a.jobs)
    try:
        for r, _ in zip(todo, pool.map(lambda r: train(r, data_dir, failed), todo), strict=True):
            print(f"[{time.strftime('%H:%M:%S')}] finished c{r.corpus_chars}/{r.label}", flush=True)
    except KeyboardInterrupt:
        # a SIGINT or SIGTERM sent to this process alone: pass it on, so every running run saves a checkpoint and
        # stops, and start no other; the same command continues the study
        failed.set()
        for proc in list(RUNNING):
            proc.send_signal(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        sys.exit("interrupted: run the same command again to continue")
    pool.shutdown()
    stop.set()
    wall = time.perf_counter() - t0

    records = [record(r, commit.strip(), len(val_text)) for r in runs]
    document = {
        "command": "python benchmarks/crossover.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "wall_s_last_invocation": round(wall, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": records,
    }
    json_path = Path(a.json) if a.json else out / "crossover.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    png = Path(a.png) if a.png else out / "crossover.png"
    plot(records, png)
    summarise(records)
    print(f"\nwrote {json_path} and {png}; wall {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
