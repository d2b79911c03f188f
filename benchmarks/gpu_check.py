"""One device check of training and sampling speed, mixed-precision parity and the attention path, per objective.

For each objective (autoregressive, mdlm, unmasking, block_diffusion with K = 4 and K = 16) the script builds a real
run of `unmask train` (`unmask.training.trainer.Trainer`, the objective's own batches, masks, loss and optimizer) and
takes optimizer steps with `Trainer.train_step`, twice from the same seed:

- mixed precision: `--dtype=bfloat16` (autocast) and, unless `--compile=False`, `--compile=True`: the speed run
  (`ms_per_iter`, `tokens_per_s`, `mfu` against the device's peak from `unmask.runtime.peak_flops` when known,
  `compile_s`, peak memory);
- float32, eager: the numerical reference. `loss_bf16` and `loss_fp32` are the losses of the same (last) step;
  parity passes when they differ by at most `--parity_tol` (relative).

Then sampling characters per second through the generation engine of `unmask sample` (`unmask.generation.engine`):
the autoregressive model with its KV cache and block diffusion (K = 16, block by block against the cache). Last,
block diffusion's attention path: the path `--attention=auto` takes on this device for the training layout
(2L - K positions), the cost of building its FlexAttention BlockMask, and a forward + backward step through SDPA
with the dense mask and through FlexAttention (where FlexAttention can train: CUDA, compute capability >= 8.0).

    python benchmarks/gpu_check.py [--tiny] [--json] [--out=FILE] [--compile=True|False] [--device=auto]
        [--batch_size=N] [--steps=10] [--warmup=3] [--budget_s=300] [--data_dir=DIR --dataset=NAME] [--threads=0]

Default size: 12 layers, 12 heads, 768 wide, block 1024, batch sized to fill about 40% of a GPU's free memory with
float32 activations (the reference run holds the most), at most 64 sequences. `--tiny` (2 layers, 32 wide, block 64,
batch 4, 3 steps, compile off unless asked for) runs the whole check on a CPU in seconds. Without CUDA the script
runs on the CPU and says so ("device": "cpu"); MFU is then null (no peak in the table). The text is a synthetic
corpus prepared in a temporary directory unless `--data_dir`/`--dataset` name a prepared dataset. Progress goes to
stderr; stdout gets one JSON document (`--json`) or a table; `--out=FILE` also writes the JSON, after every phase, so a
run cut short still leaves what it measured. A phase that would start after `--budget_s` seconds is skipped (and
listed); an error in one objective is recorded in its entry and the check goes on.

Time on a GPU (the check must fit one device call of under 8 minutes): compilation dominates, about a minute per
objective at the default size (a guess, not yet measured; inductor's cache makes repeated graphs cheaper), the
float32 steps take seconds each. The default budget (300 s) plus the longest phase (one objective, about two
minutes) stays under 8 minutes; the phases run in order of importance (training, sampling, attention), so a tight
budget drops the attention comparison first.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from unmask.config.train_config import TrainConfig
from unmask.data.prepare import prepare
from unmask.errors import EXIT_USER_ERROR, UserError
from unmask.generation.diffusion import SamplingConfig
from unmask.generation.engine import Engine, GenerationRequest
from unmask.likelihood.block import block_diffusion_loss, clean_context_length, training_attn_mask
from unmask.model import FLEX_MIN_LENGTH, HAVE_FLEX, Transformer, block_mask_from_bool, flex_supported
from unmask.runtime import environment_record, init_runtime, peak_flops, resolve_device, set_threads
from unmask.training.trainer import Trainer

SCHEMA = "unmask.gpu_check/1"
OBJECTIVES = (
    ("autoregressive", "autoregressive", 0),
    ("mdlm", "mdlm", 0),
    ("unmasking", "unmasking", 0),
    ("block_diffusion_k4", "block_diffusion", 4),
    ("block_diffusion_k16", "block_diffusion", 16),
)
FULL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, steps=10, warmup=3, sample_length=1024, samples=4)
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, steps=3, warmup=1, sample_length=128, samples=2)
TINY_BATCH = 4
MAX_BATCH = 64
MEMORY_SHARE = 0.4  # of the free GPU memory, for the float32 reference run's activations
PARITY_TOL = 0.03
WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "rome",
    "speak",
    "to",
    "their",
    "people",
    "in",
    "the",
    "hall",
    "while",
    "a",
    "fool",
    "sings",
    "of",
    "love",
    "war",
    "bread",
    "night",
    "what",
    "shall",
    "we",
    "do",
    "now",
    "my",
    "lord",
    "I",
    "pray",
    "you",
    "tell",
    "me",
    "why",
    "this",
    "is",
    "so",
    "come",
    "away",
    "good",
    "friend",
    "the",
    "day",
    "is",
    "done",
]


def log(start: float, message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def synthetic_corpus(chars: int, seed: int = 0) -> str:
    """Deterministic English-like text: sentences of the words above, speaker lines and blank-line paragraphs, about
    40 distinct characters. Only the cost of a step and the agreement of two precisions are measured, so the text
    needs the shape of a corpus (paragraph starts, a character vocabulary), not its content."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < chars:
        speaker = rng.choice(WORDS).upper() + ":\n"
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 11))]
            lines.append(" ".join(words).capitalize() + rng.choice((".", ",", "?", "!", ";")))
        paragraph = speaker + "\n".join(lines) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)


def fill_batch(device: torch.device, cfg: dict[str, Any], diffusion_block: int) -> int:
    """Sequences per step that fill about MEMORY_SHARE of the free GPU memory, a power of two in [1, MAX_BATCH].

    Activation memory per sequence, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", §4.1): 34 bytes per layer, position and channel in 16-bit, without their attention-score
    term (SDPA's and FlexAttention's fused kernels keep no (T, T) scores); doubled for the float32 run, which uses
    the same batch. Block diffusion's forward pass covers 2L - K positions."""
    T = cfg["block_size"] + (clean_context_length(cfg["block_size"], diffusion_block) if diffusion_block else 0)
    per_sequence = 2 * 34 * cfg["n_layer"] * T * cfg["n_embd"]
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(MEMORY_SHARE * free // per_sequence)
    return max(1, min(MAX_BATCH, 2 ** int(math.log2(max(fits, 1)))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what they are): CUDA's peak allocation since the last reset, or this process's peak resident set
    on the CPU (the largest so far, not per run; Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    if sys.platform.startswith("linux"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_process_peak_rss"
    return None, "unknown"


@contextlib.contextmanager
def fresh_memory(device: torch.device) -> Iterator[None]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield


def train_run(
    base: dict[str, Any], dtype: str, compile_model: bool, steps: int | None, args: argparse.Namespace, started: float
) -> tuple[Trainer, dict[str, Any]]:
    """Warm-up steps, then timed steps of a fresh run (the same seed every time). `steps` None: up to --steps timed
    steps, fewer when they would take over --run_s seconds (at least 2). Returns the trainer and the run's numbers."""
    cfg = TrainConfig(**base, dtype=dtype, compile=compile_model)
    runtime = init_runtime(cfg.device, cfg.dtype, cfg.backend)
    device = runtime.device
    if compile_model:
        torch._dynamo.reset()  # each objective compiles afresh, never against another's cache-size limit
    with fresh_memory(device):
        trainer = Trainer(cfg, runtime)
        losses: list[float] = []
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            losses.append(trainer.train_step())
        warmup_s = time.perf_counter() - t0
        trainer.progress.step_times.clear()
        limit = args.steps if steps is None else steps
        while len(trainer.progress.step_times) < limit:
            losses.append(trainer.train_step())
            if (
                steps is None
                and len(trainer.progress.step_times) >= 2
                and sum(trainer.progress.step_times) > args.run_s
            ):
                break
        sync(device)
        memory, memory_kind = peak_memory(device)
    step_s = statistics.median(trainer.progress.step_times)
    mfu = trainer.mfu(step_s)
    numbers = {
        "dtype": dtype,
        "compile": compile_model,
        "warmup_steps": args.warmup,
        "timed_steps": len(trainer.progress.step_times),
        "ms_per_iter": 1000 * step_s,
        "tokens_per_s": trainer.chars_per_iter / step_s,
        "mfu": mfu,
        "compile_s": max(0.0, warmup_s - args.warmup * step_s) if compile_model else None,
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
        "losses": losses,
    }
    log(
        started,
        f"  {dtype}{' compiled' if compile_model else ''}: {1000 * step_s:.1f} ms/iter, "
        f"{numbers['tokens_per_s']:,.0f} tokens/s, loss {losses[-1]:.4f} at step {len(losses)}",
    )
    return trainer, numbers


def check_objective(entry: dict[str, Any], common: dict[str, Any], args: argparse.Namespace, started: float) -> Trainer:
    """The bf16 (compiled) run and the float32 reference of one objective, filled into `entry` as they finish (an
    error keeps what came before it); returns the bf16 trainer, kept for sampling."""
    name, objective, K = entry["name"], entry["objective"], entry["diffusion_block"]
    device = resolve_device(common["device"])
    if args.batch_size:
        batch = args.batch_size
    elif args.tiny or device.type != "cuda":
        batch = TINY_BATCH
    else:
        batch = fill_batch(device, args.size, K)
    base = {**common, "objective": objective, "diffusion_block": K, "batch_size": batch}
    base["out_dir"] = str(Path(common["out_dir"]) / name)
    entry["batch_size"] = batch
    entry["tokens_per_iter"] = batch * args.size["block_size"]
    log(started, f"{name}: batch {batch} x {args.size['block_size']}")
    fast, fast_numbers = train_run(base, "bfloat16", args.compile, None, args, started)
    entry["bf16"] = fast_numbers
    entry |= {k: fast_numbers[k] for k in ("ms_per_iter", "tokens_per_s", "mfu", "peak_memory_bytes")}
    total_steps = len(fast_numbers["losses"])
    base["out_dir"] = str(Path(common["out_dir"]) / f"{name}_fp32")
    reference, ref_numbers = train_run(base, "float32", False, total_steps - args.warmup, args, started)
    del reference
    entry["fp32"] = ref_numbers
    loss_bf16, loss_fp32 = fast_numbers["losses"][-1], ref_numbers["losses"][-1]
    rel = abs(loss_bf16 - loss_fp32) / abs(loss_fp32)
    first = abs(fast_numbers["losses"][0] - ref_numbers["losses"][0]) / abs(ref_numbers["losses"][0])
    entry |= {
        "loss_step": total_steps,
        "loss_bf16": loss_bf16,
        "loss_fp32": loss_fp32,
        "parity": {
            "rel_diff": rel,
            "rel_diff_first_step": first,
            "tolerance": args.parity_tol,
            "pass": bool(math.isfinite(rel) and rel <= args.parity_tol),
        },
    }
    return fast


def sampling_speed(name: str, trainer: Trainer, args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Characters per second of the generation engine of `unmask sample` (float32, as the command runs), after one
    untimed short run; block diffusion takes 4 steps per block of K."""
    model = trainer.raw_model.eval()
    config = trainer.model_config
    device = trainer.rt.device
    vocab = trainer.vocab
    engine = Engine(model, vocab, config, device)
    newline = vocab.itos.index("\n") if "\n" in vocab.itos else 0

    def request(length: int, samples: int) -> GenerationRequest:
        canvas = torch.full((length,), vocab.mask_id, dtype=torch.long)
        canvas[0] = newline
        fixed = torch.arange(length) == 0
        K = config.diffusion_block
        steps = 4 * (-(-length // K)) if K else length
        return GenerationRequest(canvas, fixed, SamplingConfig(steps=steps), samples, samples, seed=1337)

    engine.run(request(min(args.size["sample_length"], 2 * max(config.diffusion_block, 8)), 1))  # warm-up
    length, samples = args.size["sample_length"], args.size["samples"]
    result = engine.run(request(length, samples))
    entry = {
        "name": name,
        "method": "kv_cache" if config.causal else f"block_diffusion_kv_cache_k{config.diffusion_block}",
        "samples": samples,
        "length": length,
        "forward_passes": result.forward_passes,
        "seconds": result.seconds,
        "chars_per_s": result.chars_per_second,
        "dtype": "float32",
    }
    log(started, f"sampling {name}: {result.chars_per_second:,.0f} chars/s ({samples} x {length})")
    model.train()
    return entry


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and, for flex on CUDA, its one compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def attention_check(name: str, trainer: Trainer, args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Block diffusion's attention path on this device: the automatic choice for the training layout, the
    BlockMask's construction cost, and SDPA (dense bool mask) against FlexAttention, eager, under autocast."""
    model: Transformer = trainer.raw_model.train()
    device, K = trainer.rt.device, trainer.model_config.diffusion_block
    L = args.size["block_size"]
    seq_len = L + clean_context_length(L, K)
    mask = training_attn_mask(L, K, device)
    entry: dict[str, Any] = {
        "name": name,
        "seq_len": seq_len,
        "flex_available": HAVE_FLEX,
        "flex_trains_here": flex_supported(device),
        "flex_min_length": FLEX_MIN_LENGTH,
        "auto_choice": model.attention_path(seq_len, device),
    }
    if HAVE_FLEX:
        entry["block_mask_ms"] = _time_ms(lambda: block_mask_from_bool(mask), device, 3)
        entry["mask_density"] = float(mask.float().mean())
    # At most 8 rows: the comparison needs the same work on both paths, not a full step (time for flex's compilation).
    clean = torch.randint(0, trainer.vocab.mask_id, (min(trainer.cfg.batch_size, 8), L), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    pos = torch.cat((torch.arange(L, device=device), torch.arange(seq_len - L, device=device)))
    idx = torch.cat((clean, clean[:, : seq_len - L]), dim=1)
    previous = model.attention_backend

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with trainer.rt.autocast():
            loss = block_diffusion_loss(model, clean, trainer.vocab.mask_id, K, gen, estimator="exact_k")
        loss.backward()

    def forward() -> torch.Tensor:
        with torch.no_grad(), trainer.rt.autocast():
            return model(idx, attn_mask=mask, pos=pos)

    paths = ("sdpa", "flex") if HAVE_FLEX else ("sdpa",)
    outputs = {}
    for path in paths:
        model.attention_backend = path
        entry[f"{path}_forward_ms"] = _time_ms(forward, device, 3)
        outputs[path] = forward().float()
        trains = path == "sdpa" or flex_supported(device)  # FlexAttention has no backward off CUDA
        entry[f"{path}_train_step_ms"] = _time_ms(step, device, 3) if trains else None
    model.attention_backend = previous
    model.zero_grad(set_to_none=True)
    if "flex" in outputs:
        entry["flex_vs_sdpa_max_abs_logit_diff"] = float((outputs["flex"] - outputs["sdpa"]).abs().max())
    log(
        started,
        f"attention {name}: auto -> {entry['auto_choice']} at {seq_len} positions; "
        + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k.endswith("_ms") and v is not None),
    )
    return entry


def error_line(exc: BaseException) -> str:
    """An exception as one line for the report (the check goes on; the traceback goes to stderr)."""
    import traceback

    traceback.print_exception(exc, file=sys.stderr)
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text.splitlines() or [type(exc).__name__])[0][:500]


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a reader (or a run cut short) sees the previous phase's report or this one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def table(report: dict[str, Any]) -> str:
    """The report as text: one line per objective, sampling and attention path."""

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    env = report["environment"]
    lines = [
        f"gpu_check on {report['device']} ({env['device_name']}), torch {env['torch']}, commit {env['git_commit']}, "
        f"{report['date']}; {report['size']['n_layer']} layers x {report['size']['n_embd']}, block "
        f"{report['size']['block_size']}, compile {report['compile']}, wall {report['wall_s']:.1f} s",
        "",
        f"{'objective':20s} {'batch':>5s} {'ms/iter':>9s} {'tokens/s':>11s} {'mfu':>6s} {'fp32 ms':>9s} "
        f"{'loss bf16':>9s} {'loss fp32':>9s} {'parity':>13s} {'peak MiB':>9s}",
    ]
    for e in report["objectives"]:
        if "parity" not in e:
            lines.append(f"{e['name']:20s} error: {e.get('error')}")
            continue
        parity = f"{'pass' if e['parity']['pass'] else 'FAIL'} {100 * e['parity']['rel_diff']:.3f}%"
        memory = e["peak_memory_bytes"]
        lines.append(
            f"{e['name']:20s} {e['batch_size']:5d} {e['ms_per_iter']:9.1f} {e['tokens_per_s']:11,.0f} "
            f"{num(None if e['mfu'] is None else 100 * e['mfu'], '5.1f'):>6s} {e['fp32']['ms_per_iter']:9.1f} "
            f"{e['loss_bf16']:9.4f} {e['loss_fp32']:9.4f} {parity:>13s} "
            f"{num(None if memory is None else memory / 2**20, '9,.0f'):>9s}"
        )
    lines.append("")
    for s in report["sampling"]:
        if "error" in s:
            lines.append(f"sampling {s['name']:20s} error: {s['error']}")
            continue
        lines.append(f"sampling {s['name']:20s} {s['method']:32s} {s['chars_per_s']:10,.0f} chars/s")
    for a in report["attention"]:
        if "error" in a:
            lines.append(f"attention {a['name']}: error: {a['error']}")
            continue
        timings = ", ".join(f"{k} {v:.2f}" for k, v in a.items() if k.endswith("_ms") and v is not None)
        lines.append(f"attention {a['name']}: {a['seq_len']} positions, auto -> {a['auto_choice']}; {timings}")
    for s in report["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a CPU-sized check (seconds)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here (after every phase)")
    p.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the bf16 runs (default: True, "
                   "False with --tiny)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per step (0: sized to the device)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10, --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, --tiny 1)")
    p.add_argument("--run_s", type=float, default=20.0, help="stop timing a run's steps after this many seconds")
    p.add_argument("--budget_s", type=float, default=300.0, help="start no phase after this many seconds")
    p.add_argument("--parity_tol", type=float, default=PARITY_TOL, help="relative bf16/fp32 loss tolerance")
    p.add_argument("--data_dir", default=None, help="a prepared dataset instead of the synthetic corpus")
    p.add_argument("--dataset", default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores)")
    p.add_argument("--only", default=None, help="comma-separated objective names to check (default: all)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    size = dict(TINY if args.tiny else FULL)
    args.size = size
    args.compile = (not args.tiny) if args.compile is None else args.compile
    args.steps = size["steps"] if args.steps is None else args.steps
    args.warmup = size["warmup"] if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 0:
        p.error("--steps must be >= 1, --warmup and --batch_size >= 0")
    if (args.data_dir is None) != (args.dataset is None):
        p.error("--data_dir and --dataset go together")
    names = [name for name, _, _ in OBJECTIVES]
    only = names if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"--only: unknown objective(s) {', '.join(unknown)}; expected names from {', '.join(names)}")
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    env = environment_record()["versions"]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": str(device),
        "tiny": args.tiny,
        "compile": args.compile,
        "size": {k: size[k] for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "parity_tolerance": args.parity_tol,
        "peak_flops_bf16": peak_flops(device, torch.bfloat16),
        "environment": {
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": env["torch"],
            "unmask": env["unmask"],
            "git_commit": env["git_commit"],
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
        },
        "objectives": [],
        "sampling": [],
        "attention": [],
        "skipped": [],
        "wall_s": 0.0,
    }
    log(started, f"device {device} ({report['environment']['device_name']}), compile {args.compile}")

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        if args.out is not None:
            write_json(args.out, report)

    def in_budget(what: str) -> bool:
        if time.perf_counter() - started <= args.budget_s:
            return True
        report["skipped"].append(f"{what}: the {args.budget_s:.0f} s budget was spent")
        log(started, f"skipped {what}: budget spent")
        return False

    with tempfile.TemporaryDirectory(prefix="unmask-gpu-check-") as tmp:
        data_dir, dataset = args.data_dir, args.dataset
        if data_dir is None:
            corpus = Path(tmp) / "synthetic.txt"
            corpus.write_text(synthetic_corpus(max(200_000, 400 * size["block_size"])))
            prepare(None, corpus, "synthetic", Path(tmp), 0.1, log=lambda _: None)
            data_dir, dataset = tmp, "synthetic"
        common = {
            "data_dir": str(data_dir),
            "dataset": dataset,
            "out_dir": str(Path(tmp) / "runs"),
            "device": str(device),
            "n_layer": size["n_layer"],
            "n_head": size["n_head"],
            "n_embd": size["n_embd"],
            "block_size": size["block_size"],
            "dropout": 0.0,
            "eval_iters": 1,
            "max_iters": 10**6,
            "warmup_iters": 5,
            "threads": threads,
        }
        kept: dict[str, Trainer] = {}
        for name, objective, K in OBJECTIVES:
            if name not in only or not in_budget(name):
                continue
            entry: dict[str, Any] = {"name": name, "objective": objective, "diffusion_block": K}
            report["objectives"].append(entry)
            trainer: Trainer | None = None
            try:
                trainer = check_objective(entry, common, args, started)
            except Exception as exc:  # noqa: BLE001 - one objective's failure is a result; the others still run
                entry["error"] = error_line(exc)
                log(started, f"{name}: error {entry['error']}")
            if trainer is not None and name in ("autoregressive", "block_diffusion_k4", "block_diffusion_k16"):
                kept[name] = trainer
            del trainer
            save()
        for name in ("autoregressive", "block_diffusion_k16"):
            if name in kept and in_budget(f"sampling {name}"):
                try:
                    report["sampling"].append(sampling_speed(name, kept[name], args, started))
                except Exception as exc:  # noqa: BLE001 - recorded, as above
                    report["sampling"].append({"name": name, "error": error_line(exc)})
                save()
        for name in ("block_diffusion_k4", "block_diffusion_k16"):
            if name in kept and in_budget(f"attention {name}"):
                try:
                    report["attention"].append(attention_check(name, kept[name], args, started))
                except Exception as exc:  # noqa: BLE001 - recorded, as above
                    report["attention"].append({"name": name, "error": error_line(exc)})
                save()
        kept.clear()
    save()
    print(json.dumps(report, indent=2) if args.json else table(report))
    log(started, "done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # a device name the machine does not have, a dataset that is not there
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
