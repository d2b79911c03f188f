"""Training-step cost of block diffusion vs the autoregressive baseline: ms per forward + backward.

Times `unmask.likelihood.block.block_diffusion_loss` (one pass over the 2L-long [noisy ; clean] layout with the
block-diffusion attention mask) against `unmask.objectives.autoregressive.autoregressive_loss` (causal, L inputs) and
`unmask.likelihood.elbo.mdlm_training_loss` (bidirectional, L inputs) on the same architecture and batch. Random weights
and tokens: the cost of a step does not depend on what the model has learnt. The goal (Arriola et al. 2025 train
block diffusion at about twice an autoregressive step) is a ratio of at most 2.2.

    python benchmarks/bench_block_diffusion.py [--n_layer=4] [--n_embd=128] [--n_head=4] [--batch_size=12]
        [--block_size=64] [--diffusion_block=16] [--vocab_size=66] [--repeats=5] [--iters=10] [--threads=1]
        [--device=cpu] [--backend=auto|sdpa|flex] [--profile] [--json=FILE]

Each repeat times `iters` steps after 3 warm-up steps; the number reported is the median over repeats of the
mean step time, and the ratio is the median of the per-repeat ratios (wall and process CPU time).
`--profile` prints the torch.profiler table of block-diffusion steps (self time per operator).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unmask.likelihood.block import block_diffusion_loss
from unmask.likelihood.elbo import mdlm_training_loss
from unmask.model import ModelConfig, Transformer
from unmask.objectives.autoregressive import autoregressive_loss


def step_ms(
    model: Transformer, loss_fn: Callable[[], torch.Tensor], device: torch.device, iters: int
) -> tuple[float, float]:
    """(wall, process CPU) time in ms per step, mean of `iters` forward + backward steps (gradients zeroed).

    The CPU time of this process is what a loaded, shared machine perturbs least (other processes' time is not
    counted); on CUDA only the wall time means anything.
    """
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - t0) / iters, 1000 * (time.process_time() - c0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--block_size", type=int, default=64, help="L, characters per window")
    parser.add_argument("--diffusion_block", type=int, default=16, help="K, characters per diffusion block")
    parser.add_argument("--vocab_size", type=int, default=66)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "sdpa", "flex"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    L, K, B, V = args.block_size, args.diffusion_block, args.batch_size, args.vocab_size
    mask_id = V - 1
    base = dict(vocab_size=V, block_size=L, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(0)
    ar = Transformer(ModelConfig(**base, causal=True)).to(device).train()
    torch.manual_seed(0)
    mdlm = Transformer(ModelConfig(**base)).to(device).train()
    torch.manual_seed(0)
    bd = Transformer(ModelConfig(**base, diffusion_block=K)).to(device).train()
    bd.attention_backend = args.backend
    data = torch.Generator(device=device).manual_seed(1)
    windows = torch.randint(0, mask_id, (B, L + 1), generator=data, device=device)  # AR: L inputs + 1 target
    clean = windows[:, :L]
    gen = torch.Generator(device=device).manual_seed(2)

    cases: dict[str, tuple[Transformer, Callable[[], torch.Tensor]]] = {
        "autoregressive": (ar, lambda: autoregressive_loss(ar, windows)),
        "mdlm": (mdlm, lambda: mdlm_training_loss(mdlm, clean, mask_id, gen)),
        "block_diffusion": (bd, lambda: block_diffusion_loss(bd, clean, mask_id, K, gen)),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}  # wall ms per repeat
    cpu_runs: dict[str, list[float]] = {name: [] for name in cases}  # process CPU ms per repeat
    for _ in range(args.repeats):  # interleaved, so machine load drifts hit every case alike
        for name, (model, fn) in cases.items():
            wall, cpu = step_ms(model, fn, device, args.iters)
            runs[name].append(wall)
            cpu_runs[name].append(cpu)
    results = {name: statistics.median(runs[name]) for name in cases}
    cpu_results = {name: statistics.median(cpu_runs[name]) for name in cases}
    # Paired per repeat (the three cases ran back to back), then the median: robust to load that comes and goes.
    ratios = [b / a for a, b in zip(runs["autoregressive"], runs["block_diffusion"], strict=True)]
    cpu_ratios = [b / a for a, b in zip(cpu_runs["autoregressive"], cpu_runs["block_diffusion"], strict=True)]
    ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"{args.n_layer} layers x {args.n_embd}, batch {B}, L={L}, K={K}, V={V}, {args.device}, "
        f"{args.threads} thread(s), backend={args.backend}, torch {torch.__version__}, {platform.machine()}, {commit}"
    )
    for name in cases:
        spread = ", ".join(f"{x:.0f}" for x in runs[name])
        print(
            f"  {name:16s} {results[name]:7.1f} ms/step wall, {cpu_results[name]:7.1f} ms CPU "
            f"(fwd+bwd, median of {args.repeats}; wall: {spread})"
        )
    print(
        f"  block_diffusion / autoregressive: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
        "(median of paired repeats; goal <= 2.2x)"
    )
    print(f"  block_diffusion / mdlm:           {results['block_diffusion'] / results['mdlm']:.2f}x wall")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                bd.zero_grad(set_to_none=True)
                block_diffusion_loss(bd, clean, mask_id, K, gen).backward()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=18))

    if args.json is not None:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "ms": results,
            "cpu_ms": cpu_results,
            "runs": runs,
            "cpu_runs": cpu_runs,
            "ratio": ratio,
            "cpu_ratio": cpu_ratio,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
