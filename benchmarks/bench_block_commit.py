"""Block-diffusion sampling with the finished blocks committed inside the next block's first pass, against a pass
of their own: forward passes, characters per second, and whether the samples are identical.

Calls `unmask.generation.cached.generate_block_diffusion` with `merge_commit=True` and `False` on an empty canvas of
a block-diffusion checkpoint, the same per-sample generators for both, interleaved, `--repeats` times each; reports
the median time of each.

    python benchmarks/bench_block_commit.py --ckpt=PATH [--length=256] [--num_samples=8]
        [--remasking=low_confidence] [--settings=steps=32,steps=256,entropy_budget=8] [--repeats=5] [--threads=1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unmask.generation.cached import generate_block_diffusion
from unmask.generation.diffusion import SamplingConfig
from unmask.generation.draws import RowGenerators
from unmask.storage.loading import read_trained


def parse_setting(text: str, remasking: str) -> SamplingConfig:
    """`steps=N`, `entropy_budget=G` or `confidence_threshold=TAU` -> a SamplingConfig."""
    name, _, value = text.partition("=")
    if name == "steps":
        return SamplingConfig(steps=int(value), remasking=remasking)
    if name in ("entropy_budget", "confidence_threshold"):
        return SamplingConfig(remasking=remasking, **{name: float(value)})
    raise SystemExit(f"--settings: {text!r} is not steps=N, entropy_budget=G or confidence_threshold=TAU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--remasking", default="low_confidence")
    parser.add_argument("--settings", default="steps=32,steps=256,entropy_budget=8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = read_trained(args.ckpt, None, torch.device("cpu"))
    mc, mask_id = trained.model_config, trained.vocab.mask_id
    if mc.diffusion_block <= 0:
        raise SystemExit(f"--ckpt={args.ckpt}: not a block-diffusion checkpoint")
    B, L = args.num_samples, args.length
    canvas, fixed = torch.full((B, L), mask_id), torch.zeros(B, L, dtype=torch.bool)
    for text in args.settings.split(","):
        config = parse_setting(text, args.remasking)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        outputs = {}
        for _ in range(args.repeats):
            for merge in (False, True):
                t0 = time.perf_counter()
                outputs[merge] = generate_block_diffusion(
                    trained.model, canvas.clone(), fixed, mask_id, mc.block_size, mc.diffusion_block, config,
                    RowGenerators.for_samples(args.seed, 0, B), merge_commit=merge,
                )  # fmt: skip
                seconds[merge].append(time.perf_counter() - t0)
        same = torch.equal(outputs[True].tokens, outputs[False].tokens)
        for merge in (False, True):
            t = statistics.median(seconds[merge])
            print(
                f"{text:24} {'merged' if merge else 'separate':9} forward passes {outputs[merge].forward_passes:5d}  "
                f"mean NFE {outputs[merge].nfe.double().mean():7.2f}  {B * L / t:9,.0f} chars/s  "
                f"identical samples: {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
