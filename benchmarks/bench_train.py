"""Training-step throughput and the share of step time spent making batches and masks.

Runs the real `Trainer.train_step` (same code as `unmask train`) on a prepared dataset for two configurations of
the core issue: the README's reduced CPU model (4 layers, 4 heads, 128 wide, block 256, batch 8) and nanoGPT's
CPU shape (block 64, batch 12). All three default stages are mixed into every batch
(`use_all_stages_for_training=True`), so sticky masking at 0.2, 0.4 and 0.6 is all paid for in every step.

    python benchmarks/bench_train.py [--device=cpu|cuda] [--iters=40] [--data_dir=data] [--json=FILE]

Prints one line per configuration; record results with machine, date and commit in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from unmask.config.train_config import TrainConfig
from unmask.curriculum.stages import ORIGINAL_STAGES
from unmask.runtime import init_runtime
from unmask.training.trainer import Trainer

CONFIGS = {
    "reduced_cpu_b8_t256": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8),
    "nanogpt_cpu_b12_t64": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
}


def mask_only_ms(device: torch.device, batch: int, T: int, repeats: int = 200) -> dict[str, float]:
    """Median time of one stage's masking call alone, per default stage."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.zeros(batch, T, dtype=torch.long, device=device)
    out = {}
    for i, stage in enumerate(ORIGINAL_STAGES):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stage.apply(x, 65, 65, gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"stage{i}"] = 1000 * statistics.median(times)
    return out


def bench(name: str, shape: dict, args: argparse.Namespace) -> dict:
    cfg = TrainConfig(
        data_dir=args.data_dir,
        dataset=args.dataset,
        out_dir=str(Path(tempfile.gettempdir()) / "unmask-bench"),
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        dropout=0.0,
        use_all_stages_for_training=True,
        eval_iters=1,
        max_iters=10**6,
        **shape,
    )
    runtime = init_runtime(cfg.device, cfg.dtype, cfg.backend)
    trainer = Trainer(cfg, runtime)
    for _ in range(args.warmup):
        trainer.train_step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    trainer.progress.step_times.clear()
    trainer.progress.batch_times.clear()
    for _ in range(args.iters):
        trainer.train_step()
    step = statistics.median(trainer.progress.step_times)
    share = sum(trainer.progress.batch_times) / sum(trainer.progress.step_times)
    tokens = cfg.batch_size * cfg.block_size
    result = {
        "config": name,
        **shape,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype),
        "iters": args.iters,
        "params": trainer.raw_model.num_params(),
        "ms_per_iter": 1000 * step,
        "tokens_per_s": tokens / step,
        "batch_mask_share": share,
        "mask_only_ms": mask_only_ms(runtime.device, cfg.batch_size, cfg.block_size),
    }
    print(
        f"{name}: {1000 * step:.1f} ms/iter, {tokens / step:,.0f} tokens/s, batches+masks "
        f"{100 * share:.2f}% of step time; masking alone per stage (ms): "
        + ", ".join(f"{v:.3f}" for v in result["mask_only_ms"].values()),
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--dataset", default="shakespeare_char")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, commit {commit}"
    )
    results = [bench(name, shape, args) for name, shape in CONFIGS.items()]
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "results": results}, indent=2))


if __name__ == "__main__":
    main()
