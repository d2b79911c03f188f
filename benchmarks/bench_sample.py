"""Sampling throughput: characters per second and model forward passes of `unmask sample`.

Runs the command's own code (`unmask.commands.sample.build` + `run_samples`, metrics off) for 4 samples x 1024
characters at 64 steps by default. With the quickstart model (block_size 256) a 1024-character canvas is generated in
blocks of 128 inside 256-character windows, so each of the 64 steps is one forward pass over a (4, 256) batch.
Also times that forward pass alone, and the sampler alone (the model replaced by a lookup of fixed logits), to
show how much of a step is the model and how much the sampling maths.

    python benchmarks/bench_sample.py [--out_dir=out/quickstart | --ckpt=PATH] [--device=cpu] [--repeats=3]
        [--num_samples=4] [--length=1024] [--steps=64] [--remasking=random] [--threads=N] [--json=FILE]

Prints one line per strategy; record results with machine, date and commit in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from unmask.commands.sample import SampleArgs, Setup, build, run_samples, sampling_config
from unmask.generation.diffusion import SamplingConfig, generate


def forward_ms(setup_model: torch.nn.Module, batch: int, width: int, mask_id: int, device: torch.device) -> float:
    x = torch.full((batch, width), mask_id, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(12):
            t0 = time.perf_counter()
            setup_model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


class FixedLogits(torch.nn.Module):
    """Stands in for the model: returns precomputed logits, so only the sampler's own work is timed."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits  # (B, W, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[: idx.shape[0], : idx.shape[1]]


def sampler_only_ms(setup: Setup, config: SamplingConfig, logits: torch.Tensor) -> float:
    """Median wall time of one whole generation with the model replaced by FixedLogits."""
    rows = logits.shape[0]
    canvas = setup.canvas.to(logits.device).expand(rows, -1).clone()
    fixed = setup.fixed.to(logits.device).expand(rows, -1)
    fake = FixedLogits(logits)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        mask_id, block_size = setup.trained.vocab.mask_id, setup.trained.model_config.block_size
        generate(fake, canvas, fixed, mask_id, block_size, config, setup.generator(0, rows))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/quickstart")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--remasking", default="random", help="comma list of strategies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    a = parser.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    args = SampleArgs(
        out_dir=a.out_dir,
        ckpt=a.ckpt,
        device=a.device,
        num_samples=a.num_samples,
        batch_size=a.num_samples,
        length=a.length,
        steps=a.steps,
        metrics=False,
    )
    setup = build(args)
    cfg = setup.trained.model_config
    width = min(a.length, cfg.block_size)
    model_ms = forward_ms(setup.trained.model, a.num_samples, width, setup.trained.vocab.mask_id, setup.device)
    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    commit = git.stdout.strip() or "?"
    print(
        f"{setup.trained.path} ({setup.trained.model.num_params() / 1e6:.2f}M parameters, block_size "
        f"{cfg.block_size}); {a.num_samples} x {a.length} characters, {a.steps} steps; {setup.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}, commit {commit}"
    )
    print(f"one forward pass ({a.num_samples}, {width}): {model_ms:.1f} ms")
    with torch.inference_mode():
        x = torch.full((a.num_samples, width), setup.trained.vocab.mask_id, device=setup.device)
        logits = setup.trained.model(x)  # (B, W, V)
    results = []
    for remasking in a.remasking.split(","):
        config = sampling_config(args, remasking, a.steps)
        sampler_ms = sampler_only_ms(setup, config, logits)
        run_samples(setup, config)  # warm-up
        runs = [run_samples(setup, config) for _ in range(a.repeats)]
        seconds = statistics.median(r.seconds for r in runs)
        chars = runs[0].generated_chars
        passes = runs[0].forward_passes
        model_share = passes * model_ms / 1000 / seconds
        results.append(
            {
                "remasking": remasking,
                "chars_per_second": chars / seconds,
                "seconds": seconds,
                "forward_passes": passes,
                "forward_ms": model_ms,
                "model_share": model_share,
                "sampler_only_ms": sampler_ms,
            }
        )
        print(
            f"{remasking:16} {chars / seconds:8,.0f} chars/s  {seconds:6.2f} s  {passes} forward passes  "
            f"(forward passes alone {100 * min(model_share, 1.0):.0f}% of the time; sampler alone {sampler_ms:.0f} ms)"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
