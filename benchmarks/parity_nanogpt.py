"""Parity with a published anchor: nanoGPT's CPU shakespeare_char run, with each unmask objective.

nanoGPT's README reports val loss 1.88 nats/char for its CPU configuration (4 layers, 4 heads, 128 wide, block 64,
batch 12, 2000 iterations, lr 1e-3 decayed over 2000 to 1e-4, dropout 0; its config file adds warmup 100,
beta2 0.99, weight decay 0.1, grad clip 1). `--objective=autoregressive` must reach <= 1.90 with the same settings.
The diffusion objectives run at the same config and budget; their val_bpc is an upper bound (ELBO).

    python benchmarks/parity_nanogpt.py [--data_dir=data] [--objectives=autoregressive,mdlm,unmasking] [--out=DIR]

Windows start at uniform offsets (no paragraph alignment), as in nanoGPT. The validation numbers are over the
fixed validation set (eval_iters x batch_size windows, seed 42): the same windows for every objective.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

from unmask.runtime import init_runtime
from unmask.train import build_train_run
from unmask.trainer import Trainer

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
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    for objective in args.objectives.split(","):
        flags = [*NANOGPT_CPU, f"--data_dir={args.data_dir}", f"--objective={objective}",
                 f"--out_dir={args.out}/{objective}", f"--eval_iters={args.eval_iters}"]  # fmt: skip
        cfg = build_train_run(flags).cfg
        start = time.perf_counter()
        final = Trainer(cfg, init_runtime(cfg.device, cfg.dtype, cfg.backend)).run()
        minutes = (time.perf_counter() - start) / 60
        row = {
            "objective": objective,
            "val_bpc": final["val_bpc"],
            "val_nats_per_char": final["val_bpc"] * math.log(2),
            "val_masked_ce": None if objective == "autoregressive" else final["val_loss"],
            "minutes": minutes,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ncommit {commit}; nanoGPT CPU config, 2000 iterations")
    print(f"{'objective':<15} {'val nats/char':>14} {'val bpc':>8} {'masked CE':>10} {'minutes':>8}")
    for r in results:
        ce = "-" if r["val_masked_ce"] is None else f"{r['val_masked_ce']:.4f}"
        print(
            f"{r['objective']:<15} {r['val_nats_per_char']:>14.4f} {r['val_bpc']:>8.4f} {ce:>10} {r['minutes']:>8.1f}"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "parity.json").write_text(json.dumps({"commit": commit, "results": results}, indent=2))


if __name__ == "__main__":
    main()
