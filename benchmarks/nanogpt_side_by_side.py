"""Training cost side by side with nanoGPT: ms per iteration at nanoGPT's CPU shakespeare_char shape.

nanoGPT is not vendored: clone it yourself (`git clone https://github.com/karpathy/nanoGPT NANOGPT_DIR`) and pass
`--nanogpt_dir`. Both run on the CPU with the shape of nanoGPT's README CPU run (4 layers, 4 heads, 128 wide,
block 64, batch 12, dropout 0, no compile, float32), one thread each (OMP_NUM_THREADS), in `--rounds` interleaved
rounds (nanoGPT, then every unmask objective, then again), so a change in the machine's load hits all of them.
Each run is `--iters` iterations; the first `--warmup` are dropped and the median of the rest is its ms/iter.
The table gives each system's median over the rounds and the median over rounds of unmask / nanoGPT.

What is timed: nanoGPT prints `iter N: loss X, time Yms` per iteration (`--log_interval=1`), the wall clock
between consecutive iterations (forward, backward, optimizer, its next `get_batch`, the loss `.item()` and the
print); unmask's `metrics.jsonl` train records carry `ms_per_iter` with `--log_interval=1`, the step itself
(batch + corruption, forward, backward, optimizer). Evaluation is kept out of both: nanoGPT evaluates only at
iteration 0 (`--eval_interval` above `--iters`, one eval batch), unmask only at the end.

nanoGPT's data: `--nanogpt_data=DIR` holding its prepared train.bin, val.bin and meta.pkl, or
`--tinyshakespeare=FILE`: a local copy of tiny Shakespeare, which nanoGPT's own
data/shakespeare_char/prepare.py encodes (it reads `input.txt` next to itself and downloads only when that file
is missing, so the script runs a copy of it beside a copy of FILE, offline). unmask's data: `--data_dir` with
`shakespeare_char` prepared (`unmask prepare`).

    python benchmarks/nanogpt_side_by_side.py --nanogpt_dir=NANOGPT_DIR (--nanogpt_data=DIR | --tinyshakespeare=FILE)
        [--data_dir=DATA_DIR] [--objectives=autoregressive,mdlm,block_diffusion,unmasking] [--diffusion_block=4]
        [--iters=60] [--warmup=10] [--rounds=3] [--out_json=FILE]

`--profile=OBJECTIVE` instead profiles one unmask training step of that objective (torch.profiler, after
`--warmup` steps) and prints the operators by CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12, "dropout": 0.0}
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [-\d.naninf]+, time ([\d.]+)ms", re.MULTILINE)
# nanoGPT's prepare.py imports requests at the top even when input.txt is present; where requests is not
# installed this stand-in lets it run offline (it only downloads when input.txt is missing).
OFFLINE_REQUESTS = (
    "def get(url, *args, **kwargs):\n"
    "    raise RuntimeError(f'offline: not downloading {url}; put input.txt next to prepare.py')\n"
)


def nanogpt_iter_times(log: str) -> dict[int, float]:
    """{iteration: ms} from nanoGPT train.py's `iter N: loss X, time Yms, mfu Z%` lines."""
    return {int(m.group(1)): float(m.group(2)) for m in NANOGPT_ITER.finditer(log)}


def steady_median(times: dict[int, float], warmup: int) -> float:
    """Median ms of the iterations numbered `warmup` and later (the first ones pay for allocation and warm-up)."""
    kept = [ms for it, ms in times.items() if it >= warmup]
    if not kept:
        raise SystemExit(f"no iterations after the first {warmup} to time: raise --iters")
    return statistics.median(kept)


def prepare_nanogpt_data(nanogpt_dir: Path, text: Path, work: Path) -> Path:
    """Run nanoGPT's own prepare.py on a local copy of tiny Shakespeare; the directory with its outputs."""
    target = work / "shakespeare_char"
    target.mkdir(parents=True)
    shutil.copy(nanogpt_dir / "data" / "shakespeare_char" / "prepare.py", target / "prepare.py")
    shutil.copy(text, target / "input.txt")  # prepare.py reads input.txt beside itself
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import requests"], capture_output=True, check=False)
    if probe.returncode != 0:
        stub = work / "offline"
        stub.mkdir()
        (stub / "requests.py").write_text(OFFLINE_REQUESTS)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "prepare.py"], cwd=target, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nanoGPT's prepare.py failed:\n{done.stderr[-2000:]}")
    return target


def nanogpt_workdir(nanogpt_dir: Path, data: Path, work: Path) -> Path:
    """A directory laid out as train.py expects (it opens configurator.py, config/ and data/<dataset>/ relative to
    the working directory), linking the user's checkout and data, so nothing is written into either."""
    run = work / "nanogpt_run"
    (run / "data").mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (run / name).symlink_to((nanogpt_dir / name).resolve())
    (run / "data" / "shakespeare_char").symlink_to(data.resolve())
    return run


def run_nanogpt(run_dir: Path, iters: int, threads: int) -> dict[int, float]:
    flags = [f"--{k}={v}" for k, v in SHAPE.items()] + [
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        f"--eval_interval={10 * iters}",  # iteration 0 only (nanoGPT always evaluates there)
        "--eval_iters=1",
        "--log_interval=1",
        f"--out_dir={run_dir / 'out'}",
    ]
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"nanoGPT train.py failed:\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}")
    return nanogpt_iter_times(done.stdout)


def unmask_flags(objective: str, data_dir: str, out_dir: Path, iters: int, diffusion_block: int) -> list[str]:
    flags = [f"--{k}={v}" for k, v in SHAPE.items()] + [
        f"--data_dir={data_dir}",
        "--dataset=shakespeare_char",
        f"--objective={objective}",
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        "--learning_rate=1e-3",
        "--min_lr=1e-4",
        "--warmup_iters=100",
        "--beta2=0.99",
        "--eval_interval=1000000",
        "--eval_iters=1",
        "--log_interval=1",
        "--use_paragraph_boundaries=False",
        "--keep_last=1",
    ]
    if objective == "block_diffusion":
        flags.append(f"--diffusion_block={diffusion_block}")
    return flags


def run_unmask(objective: str, args: argparse.Namespace, out_dir: Path) -> dict[int, float]:
    flags = unmask_flags(objective, args.data_dir, out_dir, args.iters, args.diffusion_block)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "unmask", "train", *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"unmask train --objective={objective} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # unmask counts iterations from 1 (the record after the first step is iter 1); nanoGPT's first is iter 0.
    return {r["iter"] - 1: r["ms_per_iter"] for r in records if r["kind"] == "train"}


def profile_step(objective: str, args: argparse.Namespace) -> None:
    """torch.profiler over one training step after the warm-up: where the time of a step goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="unmask_profile_") as tmp:
        steps = args.warmup + 1
        flags = unmask_flags(objective, args.data_dir, Path(tmp) / "run", steps, args.diffusion_block)
        cfg = build_train_run(flags).cfg
        trainer = Trainer(cfg, init_runtime(cfg.device, cfg.dtype, cfg.backend))
        original = trainer.train_step
        calls = {"n": 0}

        def step(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] != steps:
                return original(*a, **k)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                out = original(*a, **k)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
            return out

        trainer.train_step = step  # type: ignore[method-assign]
        trainer.run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt_dir", help="a clone of https://github.com/karpathy/nanoGPT")
    p.add_argument("--nanogpt_data", default=None, help="nanoGPT's prepared shakespeare_char (train.bin, meta.pkl)")
    p.add_argument("--tinyshakespeare", default=None, help="a local tiny Shakespeare text for nanoGPT's prepare.py")
    p.add_argument("--data_dir", default="data", help="unmask data_dir with shakespeare_char prepared")
    p.add_argument("--objectives", default="autoregressive,mdlm,block_diffusion,unmasking")
    p.add_argument("--diffusion_block", type=int, default=4)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out_json", default=None)
    p.add_argument("--profile", default=None, help="profile one unmask step of this objective instead")
    args = p.parse_args()
    if args.profile:
        profile_step(args.profile, args)
        return
    if args.nanogpt_dir is None or not (Path(args.nanogpt_dir) / "train.py").is_file():
        raise SystemExit(
            f"--nanogpt_dir={args.nanogpt_dir}: no nanoGPT train.py there; clone it first: "
            "git clone https://github.com/karpathy/nanoGPT NANOGPT_DIR"
        )
    if (args.nanogpt_data is None) == (args.tinyshakespeare is None):
        raise SystemExit("give one of --nanogpt_data=DIR (prepared by nanoGPT) or --tinyshakespeare=FILE")
    nanogpt_dir = Path(args.nanogpt_dir)
    objectives = [o for o in args.objectives.split(",") if o]
    times: dict[str, list[float]] = {"nanoGPT": [], **{o: [] for o in objectives}}
    with tempfile.TemporaryDirectory(prefix="nanogpt_side_by_side_") as tmp:
        work = Path(tmp)
        if args.nanogpt_data is not None:
            data = Path(args.nanogpt_data)
        else:
            data = prepare_nanogpt_data(nanogpt_dir, Path(args.tinyshakespeare), work)
        run_dir = nanogpt_workdir(nanogpt_dir, data, work)
        for round_index in range(args.rounds):
            ms = steady_median(run_nanogpt(run_dir, args.iters, args.threads), args.warmup)
            times["nanoGPT"].append(ms)
            print(f"round {round_index + 1}: nanoGPT {ms:.2f} ms/iter", flush=True)
            for objective in objectives:
                out_dir = work / f"unmask_{objective}_{round_index}"
                ms = steady_median(run_unmask(objective, args, out_dir), args.warmup)
                times[objective].append(ms)
                print(f"round {round_index + 1}: unmask {objective} {ms:.2f} ms/iter", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    nanogpt_commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=nanogpt_dir, check=False
    ).stdout.strip()
    nanogpt_label = nanogpt_commit or "(not a git checkout)"
    print(f"\nunmask {commit}, nanoGPT {nanogpt_label}; {platform.machine()}, {args.threads} thread")
    print(f"{'system':22}{'ms/iter (rounds)':>28}{'median':>9}{'x nanoGPT':>11}")
    rows = []
    for name, values in times.items():
        ratios = [v / n for v, n in zip(values, times["nanoGPT"], strict=True)]
        row = {"system": name, "ms_per_iter": values, "median_ms": statistics.median(values)}
        row["median_ratio_to_nanogpt"] = statistics.median(ratios)
        rows.append(row)
        label = name if name == "nanoGPT" else f"unmask {name}"
        rounds = " ".join(f"{v:.1f}" for v in values)
        print(f"{label:22}{rounds:>28}{row['median_ms']:>9.2f}{row['median_ratio_to_nanogpt']:>10.2f}x")
    if args.out_json:
        document = {"commit": commit, "nanogpt_commit": nanogpt_commit, "args": vars(args), "rows": rows}
        Path(args.out_json).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
