"""`unmask sample`: generate text from a language-model checkpoint, with prompts, infilling, metrics and a sweep.

Diffusion checkpoints (unmasking, mdlm) fill a canvas by iterative unmasking; autoregressive ones continue a
prompt one character per forward pass with a KV cache; block-diffusion ones (`diffusion_block = K`) fill blocks of
K left to right, each by iterative unmasking against a KV cache of the finished blocks.

Parse (`SampleArgs`) -> build (`build`: checkpoint, canvas, reference data, judge) -> run (`run_samples`, then
`report` or `sweep`). The maths lives in `unmask.generation.diffusion`, the metrics in `unmask.generation.metrics`; see
docs/sampling.md for the strategies, defaults and a measured steps sweep.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import torch

from unmask.config.command import parse_command
from unmask.config.flags import MAX_SEED, Range, bounded, check_ranges
from unmask.errors import UserError
from unmask.generation.animate import Recorder, animation_html, readable, write_animation
from unmask.generation.canvas import Canvas, build_canvas
from unmask.generation.diffusion import SamplingConfig, StepEvent
from unmask.generation.engine import (
    DEFAULT_STEPS,
    GUIDE_PRESET,
    GUIDE_STEPS,
    Engine,
    Generated,
    GenerationRequest,
    StepHook,
)
from unmask.generation.quality import Judge, Reference, evaluate_samples, load_reference
from unmask.generation.remasking import REMASKING
from unmask.likelihood.policy import Policy
from unmask.runtime import MAX_THREADS, resolve_device, set_threads
from unmask.storage.loading import Trained, read_trained

# Longest canvas: 10^6 characters keep the (B, L) canvas, fixed mask and float64 log-probabilities at about 17 MB
# per sample; far longer canvases would allocate gigabytes before the first forward pass.
MAX_LENGTH = 1_000_000
MAX_SAMPLES = 1_000_000
MAX_STEPS = MAX_LENGTH  # more steps than characters to fill are skipped: they would only cost planning
STEPS_RANGE = Range(1, MAX_STEPS)
# Largest --entropy_budget: far above any block's summed entropy (2^20 positions x ln(65,536) is about 1.2e7 nats),
# so every useful value fits and a typo of many digits is refused.
MAX_ENTROPY_BUDGET = 1e9


@dataclass
class SampleArgs:
    out_dir: str | None = None
    """Sample from the newest checkpoint in this directory (or give --ckpt)."""
    ckpt: str | None = None
    """Checkpoint file to sample from, or a run directory for its newest (wins over --out_dir)."""
    num_samples: int = bounded(4, 1, MAX_SAMPLES)
    """Number of samples."""
    length: int | None = bounded(None, 1, MAX_LENGTH)
    """Characters per sample, prompt included (default: the model's block_size; with --infill: the template's
    length). Longer than block_size: generated block by block, each block in a window of block_size characters
    holding as much text to its left as fits. At most 1,000,000."""
    steps: int | None = bounded(None, 1, MAX_STEPS)
    """Model calls to fill the canvas, split across its blocks (steps without anything to commit are skipped).
    Default: 64 (25 with --preset=guide) for up to block_size characters to generate, as many per character
    beyond (at most one per character), and at least one per block, so it works for every checkpoint and length.
    A value given here is used as it is (refused when fewer than the blocks to generate)."""
    temperature: float = bounded(1.0, 0.0, 1000.0)
    """Sampling temperature; 0 is greedy (argmax)."""
    top_k: int = bounded(0, 0, 2**20)
    """Sample among the k most likely characters only (0: off)."""
    top_p: float = bounded(1.0, 0.0, 1.0, lo_open=True)
    """Nucleus sampling: the smallest set of characters holding this probability (1: off)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """How many positions are committed per step: 'linear' (equal counts) or 'cosine' (MaskGIT: few first)."""
    remasking: str = "random"
    """Which positions are committed: random (MDLM ancestral order: with temperature 1, samples of the model's own
    distribution), low_confidence (most probable first, LLaDA), margin (top-1 minus top-2), entropy (lowest
    entropy first), remask (the original sampler: fill everything, re-mask down the schedule by entropy mixed
    with chance) or critic (remask scored by --critic_ckpt's P(wrong)). A comma list with --sweep_steps."""
    randomness_strength: float = bounded(0.4, 0.0, 1.0)
    """remask and critic: share of chance in choosing positions to re-mask (1: random, 0: by entropy / critic)."""
    critic_ckpt: str | None = None
    """--remasking=critic: a per-character classifier checkpoint (--binary_task=replaced_token) whose P(wrong)
    chooses the characters to re-mask."""
    confidence_threshold: float | None = bounded(None, 0.0, 1000.0)
    """Parallel decoding (Fast-dLLM): every step commits each masked position of the current block whose drawn
    character has model probability >= this (untempered, as LLaDA's and Fast-dLLM's confidence), and at least
    one (the one --remasking ranks first); forward passes then adapt to the model's certainty and --steps and
    --schedule are unused. 0 fills a block per step; above 1, one position per step. Not with remask/critic."""
    entropy_budget: float | None = bounded(None, 0.0, MAX_ENTROPY_BUDGET)
    """Entropy-bounded parallel decoding (EB-sampler), in nats, from 0 to 1e9: every step commits masked positions of
    the current block in --remasking's order while the summed entropy of the model's (untempered) distributions at
    them stays within this budget, and at least one; forward passes then adapt to the model's certainty and
    --steps and --schedule are unused. 0: one position per step; a budget above the block's summed entropy (at
    most block length x ln(characters)) fills it in one step. Not with --confidence_threshold or remask/critic."""
    block_length: int | None = bounded(None, 1, 2**20)
    """Semi-autoregressive blocks of this many positions, left to right, steps split across them (default: one
    block, or block_size / 2 when --length exceeds the model's block_size). A block-diffusion checkpoint always
    uses its own block length; an autoregressive one has no blocks."""
    prompt: str | None = None
    """Fixed text the samples start with (counts towards --length)."""
    prompt_file: str | None = None
    """Read the prompt from this UTF-8 file (used verbatim, final newline included)."""
    infill: str | None = None
    """Template whose runs of --placeholder are filled ("To be, or ______ to be" asks for 6 characters); the
    template sets the length. Not for autoregressive checkpoints; for block-diffusion ones, fixed text after the
    first hole must lie in that hole's block."""
    placeholder: str = "_"
    """The character marking positions to fill in --infill."""
    preset: Literal["guide"] | None = None
    """'guide': the parameter guide's generation values (temperature 0.6, top_k 20, top_p 0.85, 25 steps, scaled
    with the length like the --steps default); flags given explicitly still win."""
    seed: int = bounded(1337, 0, MAX_SEED)
    """Seed of the sampling generators: sample i draws from its own generator, seeded from (seed, i), so a sample
    depends on the seed and its index, not on --batch_size."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    batch_size: int = bounded(16, 1, 2**20)
    """Samples generated together in one batch."""
    threads: int = bounded(0, 0, MAX_THREADS)
    """CPU threads for torch. 0 (default): as many as the cores that are idle now (measured over 0.15 s from
    /proc/stat, at least 1): on cores that other jobs keep busy, threads waiting for each other spin."""
    json: bool = False
    """Print one JSON document (samples, settings, metrics) instead of the text report."""
    show_steps: bool = False
    """Print the canvas after every step, one line per sample: masks as a block glyph, newlines as ⏎."""
    trace: str | None = None
    """Write every step (changed positions, canvas) to this file, one JSON object per line."""
    animate: str | None = None
    """Write a self-contained HTML page (FILE.html, no network needed) replaying the canvas filling step by step:
    play/pause, a step slider, masks, prompt, earlier commits and this step's commits in different colours."""
    metrics: bool = True
    """Compute sample metrics and the real-text reference (reads the training dataset)."""
    data_dir: str | None = None
    """Where the checkpoint's dataset lives, for metrics (default: the training run's data_dir)."""
    judge_ckpt: str | None = None
    """Score the samples and real validation text under this checkpoint or run directory (NLL per character)."""
    judge_draws: int = bounded(4, 1, 10**4)
    """Monte-Carlo draws of the ELBO when the judge is a diffusion (non-causal) model."""
    sweep_steps: str | None = None
    """Comma list of step counts (8,16,32,64,128): metrics and speed for every strategy in --remasking and every
    step count, printed as a table and written to --sweep_out."""
    sweep_out: str | None = None
    """JSON file the sweep writes; it must not exist (default: sweep_steps.json in the checkpoint's run directory,
    or sweep_steps_2.json, _3, ... when taken: an earlier sweep is never overwritten)."""
    policy: Policy | None = None
    """Generate in a deterministic unmasking order instead: left_to_right, low_confidence, margin or entropy (the
    order depends only on the model's predictions; characters are drawn from its own distribution, each sample
    from its own generator), so `unmask eval --estimator=policy` is the exact likelihood of what it draws."""
    per_step: int = bounded(1, 1, MAX_LENGTH)
    """--policy: characters committed per step (the last step takes the rest); --steps is then unused."""

    strategies: tuple[str, ...] = field(default=(), init=False, repr=False)
    step_counts: tuple[int, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        check_ranges(self)  # every numeric flag's declared range, before any value is used
        if self.infill is not None and len(self.infill) > MAX_LENGTH:
            raise UserError(f"--infill: a template of {len(self.infill):,} characters; at most {MAX_LENGTH:,}")
        tau, budget = self.confidence_threshold, self.entropy_budget
        if len(self.placeholder) != 1:
            raise UserError(f"--placeholder={self.placeholder}: must be a single character")
        self.strategies = tuple(s.strip() for s in self.remasking.split(","))
        unknown = [s for s in self.strategies if s not in (*REMASKING, "critic")]
        if unknown or len(set(self.strategies)) != len(self.strategies):
            names = ", ".join((*REMASKING, "critic"))
            raise UserError(f"--remasking={self.remasking}: expected distinct names from {names}")
        if ("critic" in self.strategies) != (self.critic_ckpt is not None):
            raise UserError(f"--remasking={self.remasking}: critic and --critic_ckpt=PATH go together")
        if self.sweep_steps is not None:
            try:
                self.step_counts = tuple(int(s) for s in self.sweep_steps.split(","))
            except ValueError:
                raise UserError(f"--sweep_steps={self.sweep_steps}: expected a comma list of integers") from None
            if not all(STEPS_RANGE.admits(n) for n in self.step_counts):
                raise UserError(f"--sweep_steps={self.sweep_steps}: step counts must be in {STEPS_RANGE}")
            for flag in ("show_steps", "trace", "animate", "json"):
                if getattr(self, flag):
                    raise UserError(f"--{flag}: not available with --sweep_steps (the sweep writes --sweep_out)")
        elif len(self.strategies) > 1:
            raise UserError(f"--remasking={self.remasking}: several strategies need --sweep_steps")
        if budget is not None:
            if tau is not None:
                raise UserError(f"--entropy_budget={budget}: not with --confidence_threshold (give one adaptive rule)")
            if self.sweep_steps is not None:
                raise UserError(f"--entropy_budget={budget}: not with --sweep_steps (the steps are adaptive)")
            refill = [s for s in self.strategies if s in ("remask", "critic")]
            if refill:
                raise UserError(
                    f"--entropy_budget={budget}: not with --remasking={refill[0]} (it re-masks down the schedule's "
                    "counts; entropy-bounded decoding needs a strategy that commits)"
                )
        if tau is not None:
            if self.sweep_steps is not None:
                raise UserError(f"--confidence_threshold={tau}: not with --sweep_steps (the steps are adaptive)")
            refill = [s for s in self.strategies if s in ("remask", "critic")]
            if refill:
                raise UserError(
                    f"--confidence_threshold={tau}: not with --remasking={refill[0]} (it re-masks down the "
                    "schedule's counts; threshold decoding needs a strategy that commits)"
                )
        given = [f"--{n}" for n in ("prompt", "prompt_file", "infill") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)}: give only one of them")
        if self.infill is not None and self.length is not None:
            raise UserError(f"--length={self.length}: not with --infill (the template sets the length)")
        if self.per_step != 1 and self.policy is None:
            raise UserError(f"--per_step={self.per_step}: goes with --policy")
        if self.policy is not None:  # the policy's own distribution: the sampler's other knobs would change it
            defaults = {"remasking": "random", "temperature": 1.0, "top_k": 0, "top_p": 1.0, "sweep_steps": None}
            quiet = {
                "confidence_threshold": None,
                "entropy_budget": None,
                "show_steps": False,
                "trace": None,
                "animate": None,
            }
            clash = [k for k, v in {**defaults, **quiet}.items() if getattr(self, k) != v]
            if clash:
                raise UserError(f"--policy={self.policy}: not with --{clash[0]} (it draws from the model as it is)")


# --- build ----------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A loaded model with its engine, the canvas, and what its samples are compared with."""

    args: SampleArgs
    trained: Trained
    device: torch.device
    engine: Engine
    canvas: Canvas
    steps: int  # --steps, or the default that fits this checkpoint and canvas (`Engine.steps`)
    kind: str  # the engine's strategy: autoregressive, block_diffusion, diffusion or policy
    reference: Reference = field(default_factory=Reference)
    judge: Judge | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.canvas.length

    @property
    def fixed(self) -> torch.Tensor:
        return self.canvas.fixed

    @property
    def prompt_length(self) -> int:
        return self.canvas.prompt_length

    def request(self, config: SamplingConfig) -> GenerationRequest:
        a = self.args
        return GenerationRequest(
            self.canvas.ids, self.canvas.fixed, config, a.num_samples, a.batch_size, a.seed, a.policy, a.per_step
        )


def _read_prompt(args: SampleArgs) -> str | None:
    if args.prompt_file is None:
        return args.prompt or None
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8") or None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompt_file={args.prompt_file}: cannot read ({type(exc).__name__})") from None


def _check_autoregressive(args: SampleArgs, trained: Trained) -> None:
    """Refuse, in one line, the command's flags that do not apply to left-to-right generation (the engine refuses
    the rest)."""
    what = f"{trained.path} is an autoregressive checkpoint"
    if args.sweep_steps is not None:
        raise UserError(f"--sweep_steps={args.sweep_steps}: {what}; it takes one step per character")
    if args.critic_ckpt is not None:
        raise UserError(f"--critic_ckpt={args.critic_ckpt}: {what}; there is nothing to re-mask")


def build(args: SampleArgs) -> Setup:
    set_threads(args.threads)
    device = resolve_device(args.device)
    return build_from(args, read_trained(args.ckpt, args.out_dir, device), device)


def build_from(args: SampleArgs, trained: Trained, device: torch.device) -> Setup:
    """The sampling setup of a loaded model: canvas, steps, the engine's checks, reference data, judge, critic."""
    trained.require_head(("lm",), "unmask sample")
    mc = trained.model_config
    if mc.causal:
        _check_autoregressive(args, trained)
    elif trained.config.get("objective") == "block_diffusion" and mc.diffusion_block <= 0:
        raise UserError(f"{trained.path}: objective block_diffusion but its model_config has no diffusion_block")
    flag = "--prompt_file" if args.prompt_file else "--prompt"
    source = str(trained.path)
    canvas = build_canvas(
        trained.vocab, mc.block_size, mc.causal, _read_prompt(args), args.length, args.infill, args.placeholder, flag,
        source,
    )  # fmt: skip
    critic = None
    if args.critic_ckpt is not None:
        from unmask.transfer.critic import load_critic

        critic = load_critic(args.critic_ckpt, trained, min(canvas.length, mc.block_size), device).model
    engine = Engine(trained.model, trained.vocab, mc, device, critic, source)
    given = [(f"--sweep_steps={args.sweep_steps}", n) for n in args.step_counts]
    if args.steps is not None:
        given.insert(0, (f"--steps={args.steps}", args.steps))
    base = GUIDE_STEPS if args.preset == "guide" else DEFAULT_STEPS
    adaptive = args.confidence_threshold is not None or args.entropy_budget is not None
    steps = engine.steps(canvas.fixed, args.block_length, adaptive, given, base, args.policy)
    request = GenerationRequest(canvas.ids, canvas.fixed, sampling_config(args, args.strategies[0], steps))
    kind = engine.check(replace(request, policy=args.policy, per_step=args.per_step)).name
    setup = Setup(args, trained, device, engine, canvas, steps, kind, notes=list(canvas.notes))
    if args.metrics:
        setup.reference = load_reference(trained, args.data_dir, canvas.length, args.num_samples, setup.notes)
    if args.judge_ckpt is not None:
        judge = read_trained(args.judge_ckpt, None, device, flag_prefix="judge_")
        judge.require_head(("lm",), "--judge_ckpt")
        setup.judge = Judge(judge, args.judge_draws)
    return setup


# --- run ------------------------------------------------------------------------------------------------------


def sampling_config(args: SampleArgs, remasking: str, steps: int) -> SamplingConfig:
    return SamplingConfig(
        steps=steps,
        schedule=args.schedule,
        remasking=remasking,
        randomness_strength=args.randomness_strength,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        block_length=args.block_length,
        confidence_threshold=args.confidence_threshold,
        entropy_budget=args.entropy_budget,
    )


def run_samples(setup: Setup, config: SamplingConfig, on_step: StepHook | None = None) -> Generated:
    """Generate all samples (`Engine.run`): batches of --batch_size, each sample from its own generator."""
    return setup.engine.run(setup.request(config), on_step)


def evaluate(setup: Setup, run: Generated) -> dict[str, Any]:
    """Sample metrics next to real text's, and the judge's NLL (`unmask.generation.quality`)."""
    return evaluate_samples(run, setup.trained.vocab, setup.fixed, setup.prompt_length, setup.reference, setup.judge)


# --- output ---------------------------------------------------------------------------------------------------


ROWS = [
    ("repeated_4gram_rate", "repeated 4-gram rate"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("distinct_3", "distinct-3"),
    ("distinct_starts", "distinct starts"),
    ("char_entropy_bits", "char entropy (bits)"),
    ("word_hit_rate", "words in training corpus"),
    ("mean_self_logprob", "mean self log-prob (nats)"),
    ("judge_nll", "judge NLL (nats/char)"),
]


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def describe(setup: Setup, config: SamplingConfig) -> str:
    t, a = setup.trained, setup.args
    top_k = config.top_k or "off"
    top_p = config.top_p if config.top_p < 1 else "off"
    how = setup.engine.strategy(setup.request(config)).describe(config)
    sampler = "" if a.policy is not None else f"; temperature {config.temperature}, top_k {top_k}, top_p {top_p}"
    return (
        f"checkpoint {t.path} (iter {t.iter_num}); {a.num_samples} samples x {setup.length} characters; "
        f"{how}{sampler}; seed {a.seed}"
    )


def report(setup: Setup, run: Generated, metrics: dict[str, Any] | None, out: IO[str]) -> None:
    print(describe(setup, run.config), file=out)
    for i, text in enumerate(run.texts):
        print(f"=== sample {i + 1} ===", file=out)
        print(text, file=out)
    if metrics is not None:
        reference = metrics["reference"] or {}
        print("=== metrics ===", file=out)
        print(f"{'':28}{'samples':>10}{'real text':>12}", file=out)
        for key, label in ROWS:
            if key in metrics["samples"]:
                print(f"{label:28}{_fmt(metrics['samples'][key]):>10}{_fmt(reference.get(key)):>12}", file=out)
        if "train_char_entropy_bits" in metrics:
            print(f"{'char entropy of train split':28}{metrics['train_char_entropy_bits']:>10.4f}", file=out)
    print(
        f"speed: {run.chars_per_second:,.0f} chars/s, {run.forward_passes} forward passes, {run.seconds:.2f} s "
        f"on {setup.device.type}",
        file=out,
    )
    print(f"NFE per sample: mean {run.mean_nfe:.2f} (min {min(run.nfe)}, max {max(run.nfe)})", file=out)
    for note in setup.notes:
        print(f"note: {note}", file=out)


def json_document(setup: Setup, run: Generated, metrics: dict[str, Any] | None) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(setup.args).items() if k not in ("strategies", "step_counts")}
    return {
        "checkpoint": str(setup.trained.path),
        "iter_num": setup.trained.iter_num,
        "kind": setup.kind,
        "settings": {**settings, **asdict(run.config), "length": setup.length},
        "samples": [
            {"text": text, "generated": text[setup.prompt_length :], "mean_self_logprob": lp, "nfe": nfe}
            for text, lp, nfe in zip(run.texts, run.logprobs, run.nfe, strict=True)
        ],
        "metrics": metrics,
        "speed": {
            "chars_per_second": run.chars_per_second,
            "forward_passes": run.forward_passes,
            "mean_nfe": run.mean_nfe,
        },
        "notes": setup.notes,
    }


def step_printer(setup: Setup, out: IO[str]) -> StepHook:
    def show(first: int, event: StepEvent) -> None:
        # With adaptive steps the planned count is only the most possible steps.
        adaptive = setup.args.confidence_threshold is not None or setup.args.entropy_budget is not None
        of = f"/<={event.steps}" if adaptive else f"/{event.steps}"
        print(f"--- step {event.step + 1}{of} (block {event.block + 1}) ---", file=out)
        for i, row in enumerate(event.canvas):
            print(f"[{first + i + 1}] {readable(setup.trained.vocab.decode(row))}", file=out)

    return show


def step_tracer(setup: Setup, file: IO[str]) -> StepHook:
    def trace(first: int, event: StepEvent) -> None:
        record = {
            "batch_first_sample": first,
            "step": event.step,
            "steps": event.steps,
            "block": event.block,
            "forward_passes": event.forward_passes,
            "nfe": None if event.nfe is None else event.nfe.tolist(),
            "changed": [row.nonzero().flatten().tolist() for row in event.changed],
            "canvas": [setup.trained.vocab.decode(row) for row in event.canvas],
        }
        file.write(json.dumps(record, ensure_ascii=False) + "\n")

    return trace


def sweep(setup: Setup) -> list[dict[str, Any]]:
    args = setup.args
    rows = []
    header = (
        f"{'remasking':16}{'steps':>6}{'chars/s':>10}{'fwd':>6}{'rep-4':>8}{'dist-2':>8}{'H bits':>8}"
        f"{'words':>8}{'self-lp':>9}{'judge':>8}"
    )
    print(f"steps sweep: {setup.trained.path}, {args.num_samples} x {setup.length} characters, {args.schedule}")
    print(header)
    for remasking in args.strategies:
        for steps in args.step_counts:
            run = run_samples(setup, sampling_config(args, remasking, steps))
            metrics = evaluate(setup, run)
            rows.append({"remasking": remasking, "steps": steps, **metrics, "texts": run.texts})
            s = metrics["samples"]
            print(
                f"{remasking:16}{steps:>6}{run.chars_per_second:>10,.0f}{run.forward_passes:>6}"
                f"{s['repeated_4gram_rate']:>8.3f}{s['distinct_2']:>8.3f}{s['char_entropy_bits']:>8.3f}"
                f"{_fmt(s.get('word_hit_rate')):>8}{s['mean_self_logprob']:>9.3f}{_fmt(s.get('judge_nll')):>8}",
                flush=True,
            )
    reference = rows[0]["reference"] if rows else None
    if reference:
        print(
            f"{'real text':16}{'':>6}{'':>10}{'':>6}{reference['repeated_4gram_rate']:>8.3f}"
            f"{reference['distinct_2']:>8.3f}{reference['char_entropy_bits']:>8.3f}"
            f"{_fmt(reference.get('word_hit_rate')):>8}{'':>9}{_fmt(reference.get('judge_nll')):>8}"
        )
    for note in setup.notes:
        print(f"note: {note}")
    return rows


def write_new_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically and only if `path` does not exist (FileExistsError otherwise).

    A temporary file in the same directory is fsynced and hard-linked to `path`: the link either creates the
    whole file or fails because the name is taken, so neither a crash nor a concurrent writer leaves a partial
    or overwritten file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_sweep(args: SampleArgs, run_dir: Path, document: dict[str, Any]) -> Path:
    """Write the sweep document to --sweep_out, or to the first free sweep_steps[_N].json of `run_dir`."""
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.sweep_out is not None:
        candidates: Any = [Path(args.sweep_out)]
    else:
        candidates = (run_dir / ("sweep_steps.json" if i == 1 else f"sweep_steps_{i}.json") for i in itertools.count(1))
    for path in candidates:
        try:
            write_new_file(path, text)
            return path
        except FileExistsError:
            if args.sweep_out is not None:
                raise UserError(f"--sweep_out={args.sweep_out}: the file exists; give a new path") from None
        except OSError as exc:
            flag = f"--sweep_out={args.sweep_out}" if args.sweep_out is not None else f"--ckpt={run_dir}"
            raise UserError(f"{flag}: cannot write {path} ({exc.strerror})") from None
    raise AssertionError("unreachable: the default names never run out")


def main(argv: list[str]) -> int:
    def guide(flags: dict[str, Any]) -> dict[str, Any]:
        return {**GUIDE_PRESET, **flags} if flags.get("preset") == "guide" else flags

    parsed = parse_command(
        SampleArgs,
        argv,
        "unmask sample (--out_dir=DIR | --ckpt=PATH) [--flag=value ...]",
        "Generate text by iterative unmasking: prompts, infilling, remasking strategies, sample metrics and "
        "a steps sweep. See docs/sampling.md.",
        adjust=guide,
    )
    if parsed is None:
        return 0
    args = parsed[1]
    setup = build(args)

    if args.step_counts:
        if args.sweep_out is not None and Path(args.sweep_out).exists():  # refuse before the work, not after
            raise UserError(f"--sweep_out={args.sweep_out}: the file exists; give a new path")
        rows = sweep(setup)
        document = {
            "checkpoint": str(setup.trained.path),
            "settings": {k: v for k, v in asdict(args).items() if k not in ("strategies", "step_counts")},
            "length": setup.length,
            "rows": rows,
            "notes": setup.notes,
        }
        print(f"wrote {write_sweep(args, setup.trained.path.parent, document)}")
        return 0

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the document only
    hooks = [step_printer(setup, out)] if args.show_steps else []
    trace_file = None
    if args.trace is not None:
        try:
            trace_file = open(args.trace, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"--trace={args.trace}: cannot write ({exc.strerror})") from None
        hooks.append(step_tracer(setup, trace_file))
    recorder = None
    if args.animate is not None:
        if not Path(args.animate).parent.is_dir():  # before generating, not after
            raise UserError(f"--animate={args.animate}: directory {Path(args.animate).parent} does not exist")
        recorder = Recorder(setup.canvas.ids, setup.fixed, setup.trained.vocab.mask_id, args.num_samples)
        hooks.append(recorder)

    def on_step(first: int, event: StepEvent) -> None:
        for hook in hooks:
            hook(first, event)

    try:
        run = run_samples(setup, sampling_config(args, args.strategies[0], setup.steps), on_step if hooks else None)
    finally:
        if trace_file is not None:
            trace_file.close()
    if recorder is not None and args.animate is not None:
        write_animation(Path(args.animate), animation_html(recorder, setup.trained.vocab, describe(setup, run.config)))
        print(f"wrote {args.animate} ({len(recorder.frames)} steps)", file=out)
    metrics = evaluate(setup, run) if args.metrics else None
    if args.json:
        print(json.dumps(json_document(setup, run, metrics), indent=2, ensure_ascii=False))
    else:
        report(setup, run, metrics, sys.stdout)
    return 0
