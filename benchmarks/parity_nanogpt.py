"""Parity with a published anchor: nanoGPT's CPU shakespeare_char run, with each unmask objective.

nanoGPT's README reports val loss 1.88 nats/char for its CPU configuration (4 layers, 4 heads, 128 wide, block 64,
batch 12, 2000 iterations, lr 1e-3 decayed over 2000 to 1e-4, dropout 0; its config file adds warmup 100,
beta2 0.99, weight decay 0.1, grad clip 1). `--objective=autoregressive` must reach <= 1.90 with the same settings.
The diffusion objectives run at the same config and budget; their val_bpc is an upper bound (ELBO).

    python benchmarks/parity_nanogpt.py [--data_dir=data] [--objectives=autoregressive,mdlm,unmasking] [--out=DIR]
        [--max_iters=2000] [--seeds=1337,1338,1339] [--tag=NAME] [-- extra unmask train flags]

Extra flags after `--` go to every run (e.g. `-- --zero_masking=False --mdlm_estimator=exact_k`); `--tag` names
the variant in the output directory and the table. With several seeds the table gives each run and the mean.

Windows start at uniform offsets (no paragraph alignment), as in nanoGPT. The validation numbers are over the
fixed validation set (eval_iters x batch_size windows, seed 42): the same windows for every objective.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

from unmask.commands.train import build_train_run
from unmask.runtime import init_runtime
from unmask.training.trainer import Trainer

NANOGPT_CPU = [
    "--device=cpu", "--compile=False", "--dtype=float32", "--n_layer=4", "--n_head=4", "--n_embd=128",
    "--block_size=64", "--batch_size=12", "--max_iters=2000", "--lr_decay_iters=2000", "--learning_rate=1e-3",
    "--min_lr=1e-4", "--warmup_iters=100", "--beta2=0.99", "--weight_decay=0.1", "--grad_clip=1.0",
    "--dropout=0.0", "--use_paragraph_boundaries=False", "--eval_interval=250", "--eval_iters=20",
    "--log_interval=250", "--keep_last=1",
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--objectives", default="autoregressive,mdlm,unmasking")
    p.add_argument("--out", default="out/parity")
    p.add_argument("--eval_iters", type=int, default=50, help="validation batches (x12 windows of 64)")
    p.add_argument("--max_iters", type=int, default=2000, help="iterations (the cosine decays over the same number)")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds, one run per objective and seed")
    p.add_argument("--tag", default="", help="variant name for the output directory and the table")
    p.add_argument("extra", nargs="*", help="unmask train flags added to every run (after --)")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    runs = [(o, int(seed)) for o in args.objectives.split(",") for seed in args.seeds.split(",")]
    for objective, seed in runs:
        name = f"{objective}{'_' + args.tag if args.tag else ''}_s{seed}"
        flags = [*NANOGPT_CPU, f"--data_dir={args.data_dir}", f"--objective={objective}",
                 f"--out_dir={args.out}/{name}", f"--eval_iters={args.eval_iters}", f"--seed={seed}",
                 f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}", *args.extra]  # fmt: skip
        cfg = build_train_run(flags).cfg
        start = time.perf_counter()
        final = Trainer(cfg, init_runtime(cfg.device, cfg.dtype, cfg.backend)).run()
        minutes = (time.perf_counter() - start) / 60
        row = {
            "objective": objective,
            "tag": args.tag,
            "seed": seed,
            "flags": args.extra,
            "val_bpc": final["val_bpc"],
            "val_nats_per_char": final["val_bpc"] * math.log(2),
            "val_masked_ce": None if objective == "autoregressive" else final["val_loss"],
            "minutes": minutes,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ncommit {commit}; nanoGPT CPU config, {args.max_iters} iterations; flags {' '.join(args.extra) or '-'}")
    print(f"{'objective':<15} {'seed':>5} {'val nats/char':>14} {'val bpc':>8} {'masked CE':>10} {'minutes':>8}")
    for r in results:
        ce = "-" if r["val_masked_ce"] is None else f"{r['val_masked_ce']:.4f}"
        print(
            f"{r['objective']:<15} {r['seed']:>5} {r['val_nats_per_char']:>14.4f} {r['val_bpc']:>8.4f} {ce:>10} "
            f"{r['minutes']:>8.1f}"
        )
    for objective in dict.fromkeys(r["objective"] for r in results):
        nats = [r["val_nats_per_char"] for r in results if r["objective"] == objective]
        spread = f" ± {statistics.stdev(nats):.4f}" if len(nats) > 1 else ""
        print(f"{objective:<15} {'mean':>5} {statistics.mean(nats):>14.4f}{spread}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"parity{'_' + args.tag if args.tag else ''}.json"
    (Path(args.out) / name).write_text(json.dumps({"commit": commit, "results": results}, indent=2))


if __name__ == "__main__":
    main()
