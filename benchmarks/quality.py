"""An honest quality table: every objective, the samplers that matter, likelihood and samples side by side.

For each objective (autoregressive, mdlm, unmasking, block_diffusion with K=4) this script trains a checkpoint at
one configuration (or takes existing run directories with --ckpt_dir) and reports, through the CLI users run
(`python -m unmask train / eval / sample --json` in subprocesses):

- eval nats/char: `unmask eval` on the validation split (exact NLL for autoregressive, the negative ELBO, an
  upper bound, for the diffusion objectives);
- judge NLL: --samples samples of --length characters, each generated after a "\\n" prompt, scored per character
  under an autoregressive judge trained by this script with another seed (a separate model, so the AR row is not
  scored by the very model that drew it), next to the same judge's NLL of real validation text;
- char entropy (bits) of the samples and of real validation text: a low judge NLL bought with a collapsed entropy
  is not quality;
- chars/s and NFE (forward passes per sample) of the sampler.

Samplers: autoregressive at temperature 1 (KV cache); every diffusion run (block diffusion through its KV cache)
in random order one character per step (--steps = --length), low_confidence one character per step, threshold
decoding (--remasking=low_confidence --confidence_threshold=0.7) and entropy-bounded decoding
(--remasking=low_confidence --entropy_budget=G for G in 1, 2, 4 and 8 nats).

Runs: the four objectives by default; the ablations of the quality levers (mdlm_sc, unmasking_sc,
block_diffusion4_sc: --self_conditioning=True; mdlm_window, block_diffusion4_window: --mask_rate_window=auto) are
added with --objectives.

    python benchmarks/quality.py --out=OUT [--data_dir=DIR --dataset=shakespeare_char] [--ckpt_dir=DIR]
        [--n_layer=4 --n_embd=128 --max_iters=2000 --samples=8 --length=256 --threads=1]
        [--objectives=autoregressive,mdlm,unmasking,block_diffusion4,mdlm_sc,...]

Defaults are the issue's configuration (4 layers, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3, tiny
Shakespeare); the flags shrink it. Every run is a run directory OUT/NAME (NAME: judge, autoregressive, mdlm,
unmasking, block_diffusion4); every step's result is a file under OUT/results, and a step whose file exists is
skipped, so an interrupted invocation resumes where it stopped (OUT/config.json records the flags: an invocation
with other values, --objectives excepted, is refused). The markdown table is printed and written to
OUT/quality.md, the JSON document to OUT/quality.json. Without --data_dir the dataset is prepared into OUT/data by
`unmask prepare shakespeare_char` (offline with UNMASK_DATA_MIRROR set).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.7
# (run name, training flags); the judge is an autoregressive run with its own seed
RUNS: dict[str, list[str]] = {
    "judge": ["--objective=autoregressive"],
    "autoregressive": ["--objective=autoregressive"],
    "mdlm": ["--objective=mdlm"],
    "unmasking": ["--objective=unmasking"],
    "block_diffusion4": ["--objective=block_diffusion", "--diffusion_block=4"],
    # the ablations of the quality levers: self-conditioning and the searched mask-rate window
    "mdlm_sc": ["--objective=mdlm", "--self_conditioning=True"],
    # the window search runs at the first evaluation after iteration 0 and whenever the iteration has doubled:
    # evaluations every 200 iterations make it search at 200, 400, 800 and 1600 (train on its choice from 200)
    "mdlm_window": ["--objective=mdlm", "--mask_rate_window=auto", "--eval_interval=200"],
    "unmasking_sc": ["--objective=unmasking", "--self_conditioning=True"],
    "block_diffusion4_sc": ["--objective=block_diffusion", "--diffusion_block=4", "--self_conditioning=True"],
    "block_diffusion4_window": [
        "--objective=block_diffusion",
        "--diffusion_block=4",
        "--mdlm_estimator=antithetic_t",  # the window clips the rate t; exact_k draws counts
        "--mask_rate_window=auto",
        "--eval_interval=200",
    ],
}
TABLE_RUNS = [name for name in RUNS if name != "judge"]
DEFAULT_RUNS = ["autoregressive", "mdlm", "unmasking", "block_diffusion4"]
ENTROPY_BUDGETS = (1.0, 2.0, 4.0, 8.0)  # nats per step: the EB-sampler budget (a character costs about 1-3 nats)
COLUMNS = [
    ("run", "run"),
    ("sampler", "sampler"),
    ("eval_nats_per_char", "eval nats/char"),
    ("judge_nll", "judge NLL (nats/char)"),
    ("char_entropy_bits", "char entropy (bits)"),
    ("chars_per_second", "chars/s"),
    ("mean_nfe", "NFE/sample"),
]


def samplers(name: str, length: int) -> dict[str, list[str]]:
    """The sampler flags of `unmask sample` that matter for run `name`, by label."""
    one_per_step = f"--steps={length}"  # the canvas holds --length characters to fill: one per forward pass
    threshold = ["--remasking=low_confidence", f"--confidence_threshold={THRESHOLD}"]
    if name == "autoregressive":
        return {"temperature 1, KV cache": ["--temperature=1"]}
    budgets = {
        f"entropy budget {g:g}": ["--remasking=low_confidence", f"--entropy_budget={g:g}"] for g in ENTROPY_BUDGETS
    }
    return {
        "random, 1 char/step": ["--remasking=random", one_per_step],
        "low_confidence, 1 char/step": ["--remasking=low_confidence", one_per_step],
        f"threshold {THRESHOLD}": threshold,
        **budgets,
    }


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_cli(args: list[str], log: Path, threads: int) -> tuple[str, float]:
    """Run `python -m unmask ARGS`; its stdout is returned, its stderr goes to `log`. A failure stops the script."""
    cmd = [sys.executable, "-m", "unmask", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"quality.py: `unmask {' '.join(args)}` exited {proc.returncode}; see {log}")
    return proc.stdout, time.perf_counter() - t0


def step(path: Path, make: Any) -> dict[str, Any]:
    """The result stored at `path`, or make it (a callable returning a JSON-able dict) and store it."""
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = make()
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    digits = {"eval_nats_per_char": 4, "judge_nll": 4, "char_entropy_bits": 3, "chars_per_second": 0, "mean_nfe": 1}
    lines = [
        "| " + " | ".join(label for _, label in COLUMNS) + " |",
        "|" + "|".join("---" if key in ("run", "sampler") else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [str(row[key]) if key in ("run", "sampler") else fmt(row[key], digits[key]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory of the run directories, results, table and JSON")
    p.add_argument("--data_dir", default=None, help="prepared data directory (default: OUT/data, prepared here)")
    p.add_argument("--dataset", default="shakespeare_char")
    p.add_argument("--ckpt_dir", default=None, help="take the runs from CKPT_DIR/NAME instead of training them")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1337, help="training seed of the runs (the judge takes seed + 1)")
    p.add_argument("--samples", type=int, default=8, help="samples per sampler")
    p.add_argument("--length", type=int, default=256, help="characters generated per sample (after the prompt)")
    p.add_argument("--sample_seed", type=int, default=0)
    p.add_argument("--eval_max_windows", type=int, default=None, help="unmask eval --max_windows (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--objectives", default=",".join(DEFAULT_RUNS), help=f"comma list from {', '.join(TABLE_RUNS)}")
    a = p.parse_args(argv)
    a.objectives = [s.strip() for s in a.objectives.split(",") if s.strip()]
    unknown = [s for s in a.objectives if s not in TABLE_RUNS]
    if unknown or not a.objectives:
        p.error(f"--objectives={','.join(a.objectives)}: expected names from {', '.join(TABLE_RUNS)}")
    for flag in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "samples", "length"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag}={getattr(a, flag)}: must be at least 1")
    if a.threads < 1:
        p.error(f"--threads={a.threads}: must be at least 1")
    if a.ckpt_dir is not None:
        needed = ["judge", *a.objectives]
        missing = [name for name in needed if not (Path(a.ckpt_dir) / name).is_dir()]
        if missing:
            p.error(f"--ckpt_dir={a.ckpt_dir}: no run directory {missing[0]} (needs {', '.join(needed)})")
    return a


def check_same_config(a: argparse.Namespace, path: Path) -> None:
    """Results under OUT are reused, so OUT must hold one configuration: the first invocation records it, a later one
    with another value of a flag (--objectives excepted: it picks runs) is refused before anything runs."""
    config = {k: v for k, v in vars(a).items() if k != "objectives"}
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in config if recorded.get(k) != config[k]]
        if changed:
            k = changed[0]
            sys.stderr.write(
                f"quality.py: --{k}={config[k]}: {path.parent} holds results made with --{k}={recorded.get(k)}; "
                "give another --out\n"
            )
            raise SystemExit(2)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    commit = git_commit()  # at the start: the code that measured, even if the checkout moves on meanwhile
    out = Path(a.out)
    results, logs = out / "results", out / "logs"
    check_same_config(a, out / "config.json")
    results.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    threads = [f"--threads={a.threads}", "--device=cpu"]

    data_dir = Path(a.data_dir) if a.data_dir is not None else out / "data"
    if not (data_dir / a.dataset).is_dir():
        if a.data_dir is not None:
            sys.exit(f"quality.py: --data_dir={a.data_dir}: no prepared dataset {a.dataset} (run unmask prepare)")
        print(f"preparing {a.dataset} in {data_dir}", flush=True)
        run_cli(["prepare", a.dataset, f"--data_dir={data_dir}"], logs / "prepare.log", a.threads)

    model_flags = [
        f"--data_dir={data_dir}",
        f"--dataset={a.dataset}",
        "--compile=False",
        "--dtype=float32",
        f"--n_layer={a.n_layer}",
        f"--n_head={a.n_head}",
        f"--n_embd={a.n_embd}",
        f"--block_size={a.block_size}",
        f"--batch_size={a.batch_size}",
        f"--dropout={a.dropout}",
        f"--learning_rate={a.learning_rate}",
        f"--min_lr={a.learning_rate / 10}",
        f"--warmup_iters={min(100, a.max_iters // 10)}",
        f"--max_iters={a.max_iters}",
        f"--lr_decay_iters={a.max_iters}",
        f"--eval_interval={a.max_iters}",
        "--eval_iters=10",
        f"--log_interval={max(1, a.max_iters // 10)}",
        "--keep_last=1",
        "--overwrite=True",
        *threads,
    ]
    commands: dict[str, list[str]] = {}
    run_dirs: dict[str, Path] = {}
    train_seconds: dict[str, float | None] = {}
    for name in ["judge", *a.objectives]:
        flags = RUNS[name]
        if a.ckpt_dir is not None:
            run_dirs[name], train_seconds[name] = Path(a.ckpt_dir) / name, None
            continue
        run_dirs[name] = out / name
        seed = a.seed + 1 if name == "judge" else a.seed
        overridden = {flag.split("=")[0] for flag in flags}  # a run's own value of a shared flag wins
        shared = [flag for flag in model_flags if flag.split("=")[0] not in overridden]
        cmd = ["train", *shared, *flags, f"--seed={seed}", f"--out_dir={run_dirs[name]}"]
        commands[f"train {name}"] = cmd
        marker = results / f"{name}.train.json"
        if not marker.exists():
            for stale in results.glob(f"{name}.*.json"):  # results of an earlier checkpoint of this run
                stale.unlink()
            print(f"training {name} ...", flush=True)
        done = step(
            marker, lambda cmd=cmd, name=name: {"seconds": run_cli(cmd, logs / f"{name}.train.log", a.threads)[1]}
        )
        train_seconds[name] = done["seconds"]

    judge = run_dirs["judge"]
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    evals: dict[str, Any] = {}
    for name in a.objectives:
        run = run_dirs[name]
        cmd = ["eval", f"--ckpt={run}", f"--data_dir={data_dir}", "--json", *threads]
        if a.eval_max_windows is not None:
            cmd.append(f"--max_windows={a.eval_max_windows}")
        commands[f"eval {name}"] = cmd
        print(f"eval {name} ...", flush=True)
        ev = step(results / f"{name}.eval.json", lambda cmd=cmd, name=name: json.loads(
            run_cli(cmd, logs / f"{name}.eval.log", a.threads)[0]
        ))  # fmt: skip
        evals[name] = {
            k: ev.get(k) for k in ("nats_per_char", "bpc", "bpc_stderr", "bound", "estimator", "windows", "iter")
        }
        for label, flags in samplers(name, a.length).items():
            cmd = [
                "sample",
                f"--ckpt={run}",
                f"--data_dir={data_dir}",
                f"--judge_ckpt={judge}",
                "--json",
                "--prompt=\n",
                f"--length={a.length + 1}",  # the prompt counts towards --length
                f"--num_samples={a.samples}",
                f"--batch_size={a.samples}",
                f"--seed={a.sample_seed}",
                *flags,
                *threads,
            ]
            commands[f"sample {name} {label}"] = cmd
            print(f"sample {name}: {label} ...", flush=True)
            doc = step(results / f"{name}.sample_{slug(label)}.json", lambda cmd=cmd, name=name, label=label: (
                json.loads(run_cli(cmd, logs / f"{name}.sample_{slug(label)}.log", a.threads)[0])
            ))  # fmt: skip
            metrics = doc["metrics"]
            reference = reference or metrics["reference"]
            rows.append(
                {
                    "run": name,
                    "sampler": label,
                    "kind": doc["kind"],
                    "iter": doc["iter_num"],
                    "eval_nats_per_char": ev["nats_per_char"],
                    "eval_bound": ev["bound"],
                    "judge_nll": metrics["samples"].get("judge_nll"),
                    "char_entropy_bits": metrics["samples"]["char_entropy_bits"],
                    "chars_per_second": doc["speed"]["chars_per_second"],
                    "mean_nfe": doc["speed"]["mean_nfe"],
                    # all forward passes of the run, the KV-cache passes over finished blocks included
                    "forward_passes": doc["speed"]["forward_passes"],
                    "samples": [s["generated"] for s in doc["samples"]],
                }
            )
    real = {
        "run": "real validation text",
        "sampler": "-",
        "eval_nats_per_char": None,
        "judge_nll": (reference or {}).get("judge_nll"),
        "char_entropy_bits": (reference or {}).get("char_entropy_bits"),
        "chars_per_second": None,
        "mean_nfe": None,
    }
    table = markdown_table([*rows, real])
    wall = time.perf_counter() - t_start
    document = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),  # not imported: the CLI runs it
            "cpu_count": os.cpu_count(),
            "threads": a.threads,
        },
        "config": {k: v for k, v in vars(a).items()},
        "judge": str(judge),
        "train_seconds": train_seconds,
        "wall_seconds_this_invocation": round(wall, 1),
        "eval": evals,
        "rows": rows,
        "reference": real,
        "commands": {
            k: "python -m unmask " + " ".join(json.dumps(x) if "\n" in x else x for x in v) for k, v in commands.items()
        },  # fmt: skip
        "columns": [key for key, _ in COLUMNS],
        "table_markdown": table,
    }
    write_atomic(out / "quality.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "quality.md", table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
