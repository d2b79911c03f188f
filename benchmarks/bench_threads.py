"""Threads: the default (--threads=0, the idle cores) against every explicit setting, for sampling and training.

Runs each setting in its own process (torch picks its thread pool at start), interleaved over --rounds, and prints
the median wall seconds per setting and the default's ratio to the best. Measure once on an idle machine and once
with a second job loading the cores (for example another training run): the goal is a default within 1.3x of the
best setting in both cases.

    python benchmarks/bench_threads.py --ckpt=OUT_DIR [--rounds=3] [--settings=0,1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run directory or checkpoint to sample from and to train like")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", default="0,1,2", help="--threads values; 0 is the default")
    p.add_argument("--train_iters", type=int, default=20)
    args = p.parse_args()
    settings = [int(s) for s in args.settings.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    sample = [sys.executable, "-m", "unmask", "sample", f"--ckpt={args.ckpt}", "--num_samples=4", "--length=256",
              "--steps=64", "--metrics=False"]  # fmt: skip
    from unmask.storage.loading import read_trained

    cfg = read_trained(args.ckpt, None).config
    train = [sys.executable, "-m", "unmask", "train", f"--data_dir={cfg['data_dir']}", f"--dataset={cfg['dataset']}",
             f"--n_layer={cfg['n_layer']}", f"--n_head={cfg['n_head']}", f"--n_embd={cfg['n_embd']}",
             f"--block_size={cfg['block_size']}", f"--batch_size={cfg['batch_size']}", "--device=cpu",
             f"--max_iters={args.train_iters}", f"--eval_interval={args.train_iters}", "--eval_iters=1",
             "--keep_last=1", "--overwrite=True"]  # fmt: skip
    times: dict[tuple[str, int], list[float]] = {}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for threads in settings:
            times.setdefault(("sample", threads), []).append(timed([*sample, f"--threads={threads}"]))
            out = f"--out_dir={work / f'train{threads}'}"
            times.setdefault(("train", threads), []).append(timed([*train, out, f"--threads={threads}"]))
    print(f"load average at start {load:.2f} on {os.cpu_count()} cores; median wall s over {args.rounds} rounds")
    for task in ("sample", "train"):
        medians = {t: statistics.median(times[(task, t)]) for t in settings}
        best = min(medians.values())
        row = ", ".join(f"threads={t}{' (default)' if t == 0 else ''}: {m:.2f}s" for t, m in medians.items())
        print(f"{task}: {row}; default / best = {medians.get(0, float('nan')) / best:.2f}")


if __name__ == "__main__":
    main()
