"""Threads: the default (--threads=0, the cores idle now) against explicit settings, for training, in the machine
states where the choice matters.

Cases (each round runs every case; inside a case every setting runs in its own process, torch picking its thread
pool at start):

- `after`: right after another job: one CPU-burning process per usable core for --burn_s seconds, then the runs
  start at once (the default first, the setting whose choice depends on the state). The 1-minute load average then
  still counts the finished job although the cores are idle: the old default took 1 thread here.
- `busy`: one other process spins a core during every run.
- `idle`: nothing added (what the machine does anyway).

Reports the median training ms/iter per case and setting (the trainer's own per-iteration time, first log interval
left out), the default's ratio to the best setting, the threads the default chose, and the 1-minute load average
seen at the start of the runs (other jobs on the machine show there). Goal: the default within 1.15x of the best
setting in `after` and `busy`.

    python benchmarks/bench_threads.py --data_dir=DATA_DIR [--dataset=shakespeare_char] [--rounds=2]
        [--cases=after,busy] [--settings=0,1,2] [--burn_s=60] [--train_iters=20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SPIN = "while True: pass"


@contextmanager
def spinners(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def load_average() -> float:
    return os.getloadavg()[0]


def train_ms_per_iter(cmd: list[str], out_dir: Path) -> tuple[float, int]:
    """(median ms/iter after the first log interval, the threads the run used) of one training run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([*cmd, f"--out_dir={out_dir}"], check=True, capture_output=True, text=True, env=env)
    threads = re.search(r"cpu float32 \((\d+) threads?\)", done.stdout)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["ms_per_iter"] for r in records if r["kind"] == "train"][1:]
    return statistics.median(times), int(threads.group(1)) if threads else -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="holds a prepared --dataset (unmask prepare)")
    p.add_argument("--dataset", default="shakespeare_char")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default="after,busy", help="comma list of after, busy, idle")
    p.add_argument("--settings", default="0,1,2", help="--threads values; 0 is the default")
    p.add_argument("--burn_s", type=float, default=60.0, help="seconds the `after` case burns every core first")
    p.add_argument("--train_iters", type=int, default=20)
    p.add_argument("--shape", default="4,4,128,64,12", help="n_layer,n_head,n_embd,block_size,batch_size")
    args = p.parse_args()
    settings = sorted(int(s) for s in args.settings.split(","))  # 0 (the default) first: right after the burn
    cases = args.cases.split(",")
    n_layer, n_head, n_embd, block_size, batch_size = (int(v) for v in args.shape.split(","))
    log_interval = max(1, args.train_iters // 6)
    train = [sys.executable, "-m", "unmask", "train", f"--data_dir={args.data_dir}", f"--dataset={args.dataset}",
             f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", f"--block_size={block_size}",
             f"--batch_size={batch_size}", "--device=cpu", f"--max_iters={args.train_iters}",
             f"--eval_interval={args.train_iters}", "--eval_iters=1", f"--log_interval={log_interval}",
             "--keep_last=1", "--overwrite=True"]  # fmt: skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    ms: dict[tuple[str, int], list[float]] = {}
    chosen: dict[str, list[int]] = {case: [] for case in cases}
    loads: dict[str, list[float]] = {case: [] for case in cases}
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for case in cases:
            if case == "after":
                with spinners(cores):
                    time.sleep(args.burn_s)
            loads[case].append(load_average())
            with spinners(1 if case == "busy" else 0):
                for threads in settings:
                    value, used = train_ms_per_iter([*train, f"--threads={threads}"], work / f"{case}{threads}")
                    ms.setdefault((case, threads), []).append(value)
                    if threads == 0:
                        chosen[case].append(used)
                    print(f"round {round_ + 1} {case}: threads={threads} ({used} used) {value:.1f} ms/iter", flush=True)
    print(
        f"{cores} usable cores; {args.rounds} rounds in {time.perf_counter() - started:.0f} s; training "
        f"{n_layer}x{n_embd}, block {block_size}, batch {batch_size}; median ms/iter"
    )
    for case in cases:
        medians = {t: statistics.median(ms[(case, t)]) for t in settings}
        best = min(medians.values())
        row = ", ".join(f"threads={t}{' (default)' if t == 0 else ''}: {m:.1f}" for t, m in medians.items())
        print(
            f"{case}: {row}; default / best = {medians.get(0, float('nan')) / best:.2f}; default chose "
            f"{chosen[case]} threads; load average at the start {', '.join(f'{v:.2f}' for v in loads[case])}"
        )


if __name__ == "__main__":
    main()
