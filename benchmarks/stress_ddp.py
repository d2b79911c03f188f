"""Stress the two-process DDP run (gloo, CPU) end to end: how often does a run that trained fine still fail?

Repeats the run of tests/e2e/test_ddp.py (a tiny model, --max_iters=8, two workers under the torchrun launcher) --runs
times on a tiny synthetic corpus, and counts a run as failed when the launcher exits non-zero, when any process
printed "terminate called" (a worker aborted at exit), or when the run's summary line is missing. One line per
failure (its logs are kept), then the count and the wall time. --stops=K adds K graceful stops through
`python -m unmask.launch` (alternately SIGTERM and SIGINT to the launcher once training runs), which must exit
143 / 130 with the stop's checkpoint written. Not run in CI: 100 runs take about 15 minutes on two cores.

    python benchmarks/stress_ddp.py --runs=100 [--stops=10] [--launcher=torchrun] [--work=DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run"],  # what tests/e2e/test_ddp.py runs
    "unmask.launch": ["-m", "unmask.launch"],  # torchrun with exit codes that keep the workers' meaning
}
WORDS = ["the", "king", "and", "queen", "of", "rome", "speak", "to", "their", "people", "in", "the", "hall", "while",
         "a", "fool", "sings", "of", "love", "and", "war"]  # fmt: skip


def prepare_data(root: Path) -> Path:
    """A prepared ~60k-character corpus of random words (like tests/conftest.py's) in `root`."""
    sys.path.insert(0, str(REPO))  # this checkout's unmask, as the workers import it (PYTHONPATH)
    from unmask.data.prepare import prepare

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(1200)]
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "tiny.txt"
    corpus.write_text("\n".join(lines) + "\n")
    prepare(None, corpus, "tiny", root, 0.1, log=lambda _: None)
    return root


def train_flags(data: Path, out: Path, max_iters: int, threads: int) -> list[str]:
    """tests/conftest.py's tiny model (a few thousand parameters)."""
    return [
        f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=1", "--n_head=2",
        "--n_embd=16", "--block_size=32", "--batch_size=4", "--dropout=0.1", "--eval_interval=4", "--eval_iters=3",
        "--log_interval=2", "--learning_rate=3e-2", "--warmup_iters=2", "--lr_decay_iters=40",
        f"--max_iters={max_iters}", "--keep_last=0", f"--threads={threads}",
    ]  # fmt: skip


def command(launcher: str, flags: list[str]) -> list[str]:
    return [sys.executable, *LAUNCHERS[launcher], "--standalone", "--nproc_per_node=2", "-m", "unmask", "train", *flags]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def failure(code: int | None, out: str, err: str, expected: int, summary: str) -> str | None:
    """Why a finished launch counts as failed, or None."""
    if code is None:
        return "timed out"
    if "terminate called" in out + err:
        return f"exit {code}, a process printed 'terminate called'"
    if code != expected:
        last = err.strip().splitlines()[-1:] or ["(no stderr)"]
        return f"exit {code} (expected {expected}); last stderr line: {last[0][:200]}"
    if summary not in out + err:
        return f"exit {code} but no {summary!r} line"
    return None


def keep_logs(run_dir: Path, out: str, err: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.txt").write_text(out)
    (run_dir / "stderr.txt").write_text(err)


def train_once(args: argparse.Namespace, data: Path, run_dir: Path) -> str | None:
    run_dir.mkdir(parents=True)
    cmd = command(args.launcher, train_flags(data, run_dir / "out", args.iters, args.threads))
    try:
        done = subprocess.run(cmd, cwd=run_dir, env=environment(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        keep_logs(run_dir, str(exc.stdout or ""), str(exc.stderr or ""))
        return "timed out after 300 s"
    why = failure(done.returncode, done.stdout, done.stderr, 0, f"done: {args.iters} iterations")
    if why is not None:
        keep_logs(run_dir, done.stdout, done.stderr)
    return why


def stop_once(args: argparse.Namespace, data: Path, run_dir: Path, sig: signal.Signals) -> str | None:
    """Train until the first log line, signal the launcher, expect 128 + the signal and the stop's checkpoint."""
    run_dir.mkdir(parents=True)
    cmd = command(args.stop_launcher, train_flags(data, run_dir / "out", 1_000_000, args.threads))
    proc = subprocess.Popen(cmd, cwd=run_dir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first: list[str] = []
    for raw in proc.stdout:  # rank 0 logs "iter 2/...": training is under way
        first.append(raw.decode(errors="replace"))
        if first[-1].startswith("iter "):
            break
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        keep_logs(run_dir, "".join(first) + out.decode(errors="replace"), err.decode(errors="replace"))
        return f"{sig.name}: timed out"
    text_out, text_err = "".join(first) + out.decode(errors="replace"), err.decode(errors="replace")
    why = failure(proc.returncode, text_out, text_err, 128 + sig, f"received {sig.name}: stopped after iteration")
    if why is not None:
        keep_logs(run_dir, text_out, text_err)
        return f"{sig.name}: {why}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="training runs to completion")
    p.add_argument("--stops", type=int, default=0, help="graceful stops (alternately SIGTERM and SIGINT)")
    p.add_argument("--iters", type=int, default=8, help="--max_iters of each training run")
    p.add_argument("--threads", type=int, default=1, help="--threads of each worker")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun", help="launcher of the training runs")
    p.add_argument("--stop_launcher", choices=sorted(LAUNCHERS), default="unmask.launch")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (failed runs' logs always stay)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stress_ddp_"))
    data = prepare_data(work / "data")
    started = time.perf_counter()
    failed = {"train": 0, "stop": 0}
    for i in range(args.runs):
        run_dir = work / f"run{i}"
        why = train_once(args, data, run_dir)
        if why is not None:
            failed["train"] += 1
            print(f"run {i}: {why} (logs in {run_dir})", flush=True)
        elif not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    for i in range(args.stops):
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        run_dir = work / f"stop{i}"
        why = stop_once(args, data, run_dir, sig)
        if why is not None:
            failed["stop"] += 1
            print(f"stop {i}: {why} (logs in {run_dir})", flush=True)
        elif not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    launches = args.runs + args.stops
    print(
        f"stress_ddp: {failed['train']} of {args.runs} training runs failed ({args.launcher})"
        + (f", {failed['stop']} of {args.stops} graceful stops failed ({args.stop_launcher})" if args.stops else "")
        + f"; wall {wall:.0f} s ({wall / max(1, launches):.1f} s per launch); load average {os.getloadavg()[0]:.2f}"
    )
    if not args.keep and not any(failed.values()):
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if any(failed.values()) else 0)


if __name__ == "__main__":
    main()
