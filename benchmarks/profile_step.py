"""Where the time of one training step goes, per objective, at nanoGPT's CPU shape (the side by side's).

Builds the same run as `benchmarks/nanogpt_side_by_side.py` (4 layers, 4 heads, 128 wide, block 64, batch 12,
float32, no compile, `--threads` torch threads) and replays the trainer's step phase by phase with a clock
around each: the learning rate, the batch (data and masks), the forward pass (the model call), the loss after it,
backward, gradient clipping, the finite check, the optimizer step, zero_grad, and the bookkeeping the trainer does
per step (the loss read back, the progress record). The phases are the trainer's own calls in the trainer's order
(`Trainer.train_step`), so their sum is its step; `--steps` steps after `--warmup`, the median of each phase.
`--clock=cpu` times with this process's CPU time instead of the wall clock: on a machine shared with other jobs
the wall clock counts the time slices they take, the CPU time far less (it still feels their cache pressure).

    python benchmarks/profile_step.py --data_dir=DATA_DIR [--objectives=autoregressive,mdlm,block_diffusion,unmasking]
        [--diffusion_block=4] [--steps=40] [--warmup=10] [--threads=1] [--clock=wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_side_by_side import unmask_flags  # noqa: E402

PHASES = ("lr", "batch", "forward", "loss", "backward", "clip", "finite", "optimizer", "zero_grad", "bookkeeping")


def profile_objective(objective: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of each phase over `args.steps` steps after `args.warmup`."""
    from unmask.commands.train import build_train_run
    from unmask.runtime import init_runtime
    from unmask.training.trainer import Trainer

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="unmask_profile_") as tmp:
        total = args.warmup + args.steps
        flags = unmask_flags(objective, args.data_dir, Path(tmp) / "run", total, args.diffusion_block)
        cfg = build_train_run(flags).cfg
        trainer = Trainer(cfg, init_runtime(cfg.device, cfg.dtype, cfg.backend))
        trainer.open_run()
        model = trainer.model
        forward_s: list[float] = []
        hooks = [
            model.register_forward_pre_hook(lambda *_: forward_s.append(clock())),
            model.register_forward_hook(lambda *_: forward_s.append(clock())),
        ]
        times: dict[str, list[float]] = defaultdict(list)
        try:
            for step in range(total):
                marks = [clock()]
                lr = trainer.current_lr()
                for group in trainer.optimizer.param_groups:
                    group["lr"] = lr
                marks.append(clock())
                batch = trainer.objective.batch(trainer.data_gen, trainer.mask_gen, True)
                marks.append(clock())
                forward_s.clear()
                loss = trainer.objective.loss(model, batch)
                end_loss = clock()
                marks += [forward_s[-1], end_loss]  # the forward ends where the model call returns
                total_loss = torch.zeros(()) + loss.detach()
                trainer.scaler.scale(loss).backward()
                marks.append(clock())
                grad_norm = trainer.clip_gradients()
                marks.append(clock())
                finite = trainer.step_is_finite(total_loss, grad_norm)
                marks.append(clock())
                if finite:
                    trainer.scaler.step(trainer.optimizer)
                    trainer.scaler.update()
                marks.append(clock())
                trainer.optimizer.zero_grad(set_to_none=True)
                marks.append(clock())
                trainer.iter_num += 1
                trainer.progress.add_step(marks[-1] - marks[0], marks[2] - marks[1])
                float(total_loss)
                marks.append(clock())
                if step >= args.warmup:
                    for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True):
                        times[name].append(1000 * (b - a))
                    times["step"].append(1000 * (marks[-1] - marks[0]))
        finally:
            for hook in hooks:
                hook.remove()
            trainer.lock.release()
            trainer.log.close()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="unmask data_dir with shakespeare_char prepared")
    p.add_argument("--objectives", default="autoregressive,mdlm,block_diffusion,unmasking")
    p.add_argument("--diffusion_block", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock or this process's CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for objective in [o for o in args.objectives.split(",") if o]:
        results[objective] = profile_objective(objective, args)
    names = list(results)
    print(
        f"median ms per phase over {args.steps} steps ({args.threads} thread, {args.clock} clock); "
        "share of the step in brackets"
    )
    print(f"{'phase':12}" + "".join(f"{n:>24}" for n in names))
    for phase in (*PHASES, "step"):
        cells = []
        for n in names:
            ms, step = results[n][phase], results[n]["step"]
            cells.append(f"{ms:8.2f} ({100 * ms / step:4.1f}%)" if phase != "step" else f"{ms:8.2f}        ")
        print(f"{phase:12}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
