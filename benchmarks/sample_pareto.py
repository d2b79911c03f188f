"""Speed against quality of generation: autoregressive, MDLM and block diffusion, on the CPU.

Every setting generates `--num_samples` x `--length` characters from the prompt "\\n" (an autoregressive model has
no beginning-of-text token; nanoGPT's sample.py starts from a newline too) with models of the same shape, and is
measured three ways:

  whole-process s   wall clock of the command a user runs (`python -m unmask sample ... --json`, or this script's
                    `--uncached_ar` child for the uncached baseline): interpreter start, checkpoint load,
                    generation, metrics and the judge
  steady chars/s    generated characters per second of generation alone in a warm process (the same setting run
                    once before, untimed, so first-call allocations and thread start-up are excluded)
  NFE               model calls per sample (the sampler's count; block diffusion commits its finished blocks to the
                    cache inside these calls)
  judge NLL         nats per generated character under `--judge_ckpt` (an autoregressive checkpoint: exact
                    NLL), next to the judge NLL of real validation windows of the same length

The settings: AR without a KV cache (a nanoGPT-style loop, `model(x[:, -block_size:])` per character, run by this
script because the library's sampler always caches), AR with the cache (`unmask sample`), MDLM at 64 and 256 steps,
and block diffusion (Arriola et al. 2025) for each block-diffusion checkpoint with the cache at 1, 2 and K steps per
block and with Fast-dLLM's confidence threshold at each `--taus` value. The Pareto front (higher chars/s, lower
judge NLL) is drawn to `--plot`.

    python benchmarks/sample_pareto.py --ar_ckpt=AR_RUN --mdlm_ckpt=MDLM_RUN --bd_ckpts=BD_K4_RUN,BD_K16_RUN
        [--judge_ckpt=AR_RUN] [--num_samples=4] [--length=1024] [--threads=1] [--out_json=FILE] [--plot=FILE.png]
        [--only=NAME,...]

Timings on a shared machine move between runs; every command runs with `--threads=1` (spinning threads on busy
cores are many times slower).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.commands.sample import SampleArgs, Setup, build, evaluate, run_samples, sampling_config
from unmask.errors import UserError
from unmask.generation.cached import prefix_length
from unmask.generation.draws import Generators, model_probs, sample_categorical
from unmask.generation.engine import Generated as SampleRun

REPO = Path(__file__).resolve().parents[1]
PROMPT = "\n"


@dataclass
class Setting:
    name: str
    ckpt: str
    family: str  # "ar_uncached", "ar_cached", "mdlm", "block_diffusion"
    flags: dict[str, Any] = field(default_factory=dict)  # unmask sample flags beyond the common ones

    @property
    def diffusion(self) -> bool:
        return self.family in ("mdlm", "block_diffusion")


def diffusion_block_of(ckpt: str) -> int:
    """K of a block-diffusion checkpoint or run directory (its model_config.diffusion_block)."""
    from unmask.storage.loading import read_trained

    trained = read_trained(ckpt, None, "cpu")
    K = trained.model_config.diffusion_block
    if K <= 0:
        raise UserError(f"--bd_ckpts={ckpt}: not a block-diffusion checkpoint (no diffusion_block)")
    return K


def settings_for(args: argparse.Namespace) -> list[Setting]:
    rows = [
        Setting("AR, no cache", args.ar_ckpt, "ar_uncached"),
        Setting("AR, KV cache", args.ar_ckpt, "ar_cached"),
    ]
    for steps in (64, 256):
        rows.append(Setting(f"MDLM, {steps} steps", args.mdlm_ckpt, "mdlm", {"steps": steps}))
    for ckpt in [c for c in args.bd_ckpts.split(",") if c]:
        K = diffusion_block_of(ckpt)
        blocks = math.ceil(args.length / K)
        for per_block in sorted({1, 2, K}):
            rows.append(Setting(f"BD K={K}, {per_block}/block", ckpt, "block_diffusion", {"steps": blocks * per_block}))
        for tau in [float(t) for t in args.taus.split(",")]:
            rows.append(Setting(f"BD K={K}, tau={tau}", ckpt, "block_diffusion", {"confidence_threshold": tau}))
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        rows = [r for r in rows if r.name in wanted or r.family in wanted]
    return rows


# --- the uncached autoregressive baseline ---------------------------------------------------------------------


@torch.inference_mode()
def generate_uncached(
    model: torch.nn.Module,
    canvas: torch.Tensor,
    fixed: torch.Tensor,
    mask_id: int,
    block_size: int,
    temperature: float,
    generator: Generators,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """nanoGPT-style generation: every character is one full forward pass over the last `block_size` characters
    (no KV cache), its logits at the last position sampled as `unmask.generation.cached.generate_autoregressive` does
    (float64 Gumbel-max, special ids banned). Returns the canvas (B, L), the untempered log-probability of each
    generated character (B, L) and the number of forward passes."""
    B, L = canvas.shape
    P = prefix_length(fixed)
    x = canvas.clone()  # (B, L)
    logprobs = torch.zeros(B, L, dtype=torch.float64, device=generator.device)  # (B, L)
    banned: torch.Tensor | None = None
    for p in range(P, L):
        logits = model(x[:, max(0, p - block_size) : p])[:, -1]  # (B, V): the next character given the window
        if banned is None:
            banned = torch.arange(logits.shape[-1], device=generator.device) >= mask_id  # (V,)
        token = sample_categorical(logits, banned, temperature, 0, 1.0, generator)  # (B,)
        probs = model_probs(logits, banned, generator.device)  # (B, V)
        logprobs[:, p] = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
        x[:, p] = token.to(x.device)
    return x, logprobs, L - P


def run_uncached(setup: Setup) -> SampleRun:
    """The uncached baseline over all samples, timed and packaged like `unmask.commands.sample.run_samples`."""
    trained, args = setup.trained, setup.args
    canvas = setup.canvas.expand(args.num_samples, -1).clone()  # (N, L)
    fixed = setup.fixed.expand(args.num_samples, -1)  # (N, L)
    t0 = time.perf_counter()
    x, logprobs, passes = generate_uncached(
        trained.model,
        canvas,
        fixed,
        trained.vocab.mask_id,
        trained.model_config.block_size,
        args.temperature,
        setup.generator(),
    )
    seconds = time.perf_counter() - t0
    generated = ~fixed
    per_sample = ((logprobs * generated).sum(1) / generated.sum(1)).tolist()
    chars = int(generated.sum())
    return SampleRun(
        sampling_config(args, "random", setup.steps),
        [trained.vocab.decode(row) for row in x],
        per_sample,
        seconds,
        passes,
        chars,
        [passes] * args.num_samples,
    )


# --- measuring ------------------------------------------------------------------------------------------------


def sample_argv(setting: Setting, args: argparse.Namespace, judge: bool) -> list[str]:
    argv = [
        f"--ckpt={setting.ckpt}",
        f"--num_samples={args.num_samples}",
        f"--length={args.length}",
        f"--prompt={PROMPT}",
        f"--threads={args.threads}",
        f"--batch_size={args.num_samples}",
        "--device=cpu",
        f"--seed={args.seed}",
    ]
    if args.data_dir:
        argv.append(f"--data_dir={args.data_dir}")
    if judge:
        argv.append(f"--judge_ckpt={args.judge_ckpt}")
    return argv + [f"--{k}={v}" for k, v in setting.flags.items()]


def whole_process(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    """Run the setting as a fresh process, timed from the outside; its JSON document (speed, metrics)."""
    if setting.family == "ar_uncached":
        command = [sys.executable, __file__, "--uncached_ar", *sample_argv(setting, args, judge=True)]
    else:
        command = [sys.executable, "-m", "unmask", "sample", "--json", *sample_argv(setting, args, judge=True)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{setting.name}: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    document: dict[str, Any] = json.loads(done.stdout)
    document["whole_process_seconds"] = seconds
    return document


def steady_state(setting: Setting, args: argparse.Namespace) -> float:
    """Generated characters per second of generation alone in this (warm) process: one untimed run first."""
    sample_args = SampleArgs(**_sample_kwargs(sample_argv(setting, args, judge=False)), metrics=False)
    setup = build(sample_args)
    rates = []
    for _ in range(1 + args.repeats):
        run = _generate(setup, setting.family == "ar_uncached")
        rates.append(run.chars_per_second)
    return sorted(rates[1:])[len(rates[1:]) // 2]


def _generate(setup: Setup, uncached: bool) -> SampleRun:
    if uncached:
        return run_uncached(setup)
    args = setup.args
    return run_samples(setup, sampling_config(args, args.strategies[0], setup.steps))


def _sample_kwargs(argv: list[str]) -> dict[str, Any]:
    """`--name=value` flags as SampleArgs keyword arguments, typed like SampleArgs' fields."""
    types = {"num_samples": int, "length": int, "threads": int, "batch_size": int, "seed": int, "steps": int}
    kwargs: dict[str, Any] = {}
    for flag in argv:
        name, value = flag[2:].split("=", 1)
        kwargs[name] = float(value) if name == "confidence_threshold" else types.get(name, str)(value)
    return kwargs


def uncached_child(argv: list[str]) -> None:
    """`--uncached_ar FLAGS`: the uncached baseline as one process, printing the document `unmask sample --json`
    would (speed and metrics), so its whole-process time compares with the other settings'."""
    setup = build(SampleArgs(**_sample_kwargs(argv)))
    run = run_uncached(setup)
    metrics = evaluate(setup, run)
    speed = {"chars_per_second": run.chars_per_second, "forward_passes": run.forward_passes, "mean_nfe": run.mean_nfe}
    print(json.dumps({"kind": "autoregressive_uncached", "metrics": metrics, "speed": speed, "texts": run.texts}))


# --- the front and the goals ----------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (chars/s, NLL) no other point dominates (at least as fast and at least as good, and
    strictly better in one), sorted by speed."""
    front = []
    for i, (speed, nll) in enumerate(points):
        dominated = any(s >= speed and n <= nll and (s > speed or n < nll) for j, (s, n) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def goals(rows: list[dict[str, Any]], front: list[int]) -> dict[str, Any]:
    """The issue's two goals: (1) some diffusion setting faster than AR with the cache, its judge NLL within 10 %
    of AR's samples; (2) every diffusion setting on the front at least 10x the uncached AR's chars/s."""
    by_family = {r["family"]: r for r in rows if r["family"] in ("ar_cached", "ar_uncached")}
    result: dict[str, Any] = {}
    ar = by_family.get("ar_cached")
    if ar is not None:
        winners = [
            r["name"]
            for r in rows
            if r["diffusion"]
            and r["steady_chars_per_second"] > ar["steady_chars_per_second"]
            and r["judge_nll"] <= 1.1 * ar["judge_nll"]
        ]
        result["faster_than_ar_cache_within_10pct_nll"] = winners
    slow = by_family.get("ar_uncached")
    if slow is not None:
        on_front = [rows[i] for i in front if rows[i]["diffusion"]]
        result["front_diffusion_speedup_over_uncached_ar"] = {
            r["name"]: r["steady_chars_per_second"] / slow["steady_chars_per_second"] for r in on_front
        }
        result["every_front_diffusion_setting_10x_uncached"] = all(
            v >= 10 for v in result["front_diffusion_speedup_over_uncached_ar"].values()
        )
    return result


def plot(rows: list[dict[str, Any]], front: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ar_uncached": "tab:gray", "ar_cached": "tab:red", "mdlm": "tab:blue", "block_diffusion": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for family, colour in colours.items():
        chosen = [r for r in rows if r["family"] == family]
        if chosen:
            xs = [r["steady_chars_per_second"] for r in chosen]
            ax.scatter(xs, [r["judge_nll"] for r in chosen], color=colour, label=family.replace("_", " "), zorder=3)
    for i, r in enumerate(sorted(rows, key=lambda r: r["judge_nll"])):
        offset = (5, 3) if i % 2 == 0 else (5, -9)  # alternate above / below: neighbours in NLL overlap less
        ax.annotate(r["name"], (r["steady_chars_per_second"], r["judge_nll"]), fontsize=7, xytext=offset,
                    textcoords="offset points")  # fmt: skip
    ordered = [rows[i] for i in front]
    ax.plot([r["steady_chars_per_second"] for r in ordered], [r["judge_nll"] for r in ordered], "k--", lw=1,
            label="Pareto front", zorder=2)  # fmt: skip
    reference = next((r["reference_judge_nll"] for r in rows if r["reference_judge_nll"] is not None), None)
    if reference is not None:
        ax.axhline(reference, color="tab:purple", lw=1, ls=":", label="real validation text")
    ax.set_xscale("log")
    ax.set_xlabel("steady-state chars/s (CPU, 1 thread, log scale)")
    ax.set_ylabel("judge NLL of the samples (nats/char, lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG


def write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--uncached_ar":
        uncached_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar_ckpt", required=True, help="autoregressive checkpoint or run directory")
    p.add_argument("--mdlm_ckpt", required=True, help="MDLM checkpoint or run directory")
    p.add_argument("--bd_ckpts", default="", help="comma list of block-diffusion checkpoints or run directories")
    p.add_argument("--judge_ckpt", default=None, help="the judge (default: --ar_ckpt)")
    p.add_argument("--data_dir", default=None, help="where the checkpoints' dataset lives (default: theirs)")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="characters per sample, the prompt's newline included")
    p.add_argument("--taus", default="0.7,0.9", help="confidence thresholds for block diffusion")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--repeats", type=int, default=1, help="timed steady-state runs after the warm-up (median)")
    p.add_argument("--only", default="", help="comma list of setting names or families to run")
    p.add_argument("--out_json", default=None, help="write every row here")
    p.add_argument(
        "--extend_json",
        default=None,
        help="an earlier --out_json: keep its rows, measure only the settings it lacks",
    )
    p.add_argument("--plot", default=None, help="draw chars/s against judge NLL with the Pareto front (PNG)")
    args = p.parse_args()
    args.judge_ckpt = args.judge_ckpt or args.ar_ckpt
    torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    rows: list[dict[str, Any]] = []
    if args.extend_json:
        rows = json.loads(Path(args.extend_json).read_text())["rows"]
    measured = {r["name"] for r in rows}
    header = f"{'setting':24}{'whole s':>9}{'chars/s':>10}{'NFE':>8}{'judge NLL':>11}{'real NLL':>10}"
    print(f"{args.num_samples} x {args.length} characters from {PROMPT!r}, {args.threads} thread(s), commit {commit}")
    print(header, flush=True)
    for setting in settings_for(args):
        if setting.name in measured:
            continue
        document = whole_process(setting, args)
        speed = steady_state(setting, args)
        metrics = document["metrics"]
        reference = metrics.get("reference") or {}
        row = {
            "name": setting.name,
            "family": setting.family,
            "diffusion": setting.diffusion,
            "ckpt": setting.ckpt,
            "flags": setting.flags,
            "commit": commit,
            "whole_process_seconds": document["whole_process_seconds"],
            "cold_chars_per_second": document["speed"]["chars_per_second"],
            "steady_chars_per_second": speed,
            "mean_nfe": document["speed"]["mean_nfe"],
            "forward_passes": document["speed"]["forward_passes"],
            "judge_nll": metrics["samples"]["judge_nll"],
            "reference_judge_nll": reference.get("judge_nll"),
            "repeated_4gram_rate": metrics["samples"]["repeated_4gram_rate"],
            "word_hit_rate": metrics["samples"].get("word_hit_rate"),
        }
        rows.append(row)
        print(
            f"{row['name']:24}{row['whole_process_seconds']:>9.2f}{speed:>10,.0f}{row['mean_nfe']:>8.0f}"
            f"{row['judge_nll']:>11.4f}{row['reference_judge_nll'] or math.nan:>10.4f}",
            flush=True,
        )
    front = pareto_front([(r["steady_chars_per_second"], r["judge_nll"]) for r in rows])
    result = goals(rows, front)
    print("Pareto front (by chars/s, slow to fast): " + ", ".join(rows[i]["name"] for i in front))
    print(json.dumps(result, indent=2))
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.plot:
        title = f"{args.num_samples} x {args.length} chars, CPU {args.threads} thread; {machine}; {date}, {commit}"
        plot(rows, front, Path(args.plot), title)
        print(f"wrote {args.plot}")
    if args.out_json:
        document = {"commit": commit, "date": date, "machine": machine, "args": vars(args), "rows": rows}
        write_json(Path(args.out_json), {**document, "front": [rows[i]["name"] for i in front], "goals": result})
        print(f"wrote {args.out_json}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
