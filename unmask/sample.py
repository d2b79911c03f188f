"""`unmask sample`: generate text from an unmasking checkpoint, with prompts, infilling, metrics and a sweep.

Parse (`SampleArgs`) -> build (`build`: checkpoint, canvas, reference data, judge) -> run (`run_samples`, then
`report` or `sweep`). The maths lives in `unmask.sampling`, the metrics in `unmask.sample_metrics`; see
docs/sampling.md for the strategies, defaults and a measured steps sweep.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

import torch

from unmask import sample_metrics as sm
from unmask.critic import CriticRemask, load_critic
from unmask.data import Dataset, load_dataset, sample_windows
from unmask.errors import UserError
from unmask.flags import format_help, parse_flags
from unmask.loading import Trained, read_trained
from unmask.runtime import resolve_device
from unmask.sampling import (
    REMASKING,
    SamplingConfig,
    StepEvent,
    generate,
    infill_canvas,
    placeholder_spans,
    plan_blocks,
    prompt_canvas,
)

# The parameter guide's "Generation & Output Parameters" recommendations (seed document 003).
GUIDE_PRESET: dict[str, Any] = {"temperature": 0.6, "top_k": 20, "top_p": 0.85, "steps": 25}
REFERENCE_SEED = 0  # real validation windows for the reference column: the same ones in every run


@dataclass
class SampleArgs:
    out_dir: str | None = None
    """Sample from the newest checkpoint in this directory (or give --ckpt)."""
    ckpt: str | None = None
    """Checkpoint file to sample from, or a run directory for its newest (wins over --out_dir)."""
    num_samples: int = 4
    """Number of samples."""
    length: int | None = None
    """Characters per sample, prompt included (default: the model's block_size; with --infill: the template's
    length). Longer than block_size: generated block by block, each block in a window of block_size characters
    holding as much text to its left as fits."""
    steps: int = 64
    """Model calls to fill the canvas (steps without anything to commit are skipped)."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely characters only (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of characters holding this probability (1: off)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """How many positions are committed per step: 'linear' (equal counts) or 'cosine' (MaskGIT: few first)."""
    remasking: str = "random"
    """Which positions are committed: random (MDLM ancestral order: with temperature 1, samples of the model's own
    distribution), low_confidence (most probable first, LLaDA), margin (top-1 minus top-2), entropy (lowest
    entropy first), remask (the original sampler: fill everything, re-mask down the schedule by entropy mixed
    with chance) or critic (remask scored by --critic_ckpt's P(wrong)). A comma list with --sweep_steps."""
    randomness_strength: float = 0.4
    """remask and critic: share of chance in choosing positions to re-mask (1: random, 0: by entropy / critic)."""
    critic_ckpt: str | None = None
    """--remasking=critic: a per-character classifier checkpoint (--binary_task=replaced_token) whose P(wrong)
    chooses the characters to re-mask."""
    block_length: int | None = None
    """Semi-autoregressive blocks of this many positions, left to right, steps split across them (default: one
    block, or block_size / 2 when --length exceeds the model's block_size)."""
    prompt: str | None = None
    """Fixed text the samples start with (counts towards --length)."""
    prompt_file: str | None = None
    """Read the prompt from this UTF-8 file (used verbatim, final newline included)."""
    infill: str | None = None
    """Template whose runs of --placeholder are filled ("To be, or ______ to be" asks for 6 characters); the
    template sets the length."""
    placeholder: str = "_"
    """The character marking positions to fill in --infill."""
    preset: Literal["guide"] | None = None
    """'guide': the parameter guide's generation values (temperature 0.6, top_k 20, top_p 0.85, 25 steps);
    flags given explicitly still win."""
    seed: int = 1337
    """Seed of the sampling generator (results depend on it and on --batch_size)."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    batch_size: int = 16
    """Samples generated together in one batch."""
    threads: int = 0
    """CPU threads for torch (0: torch's default, one per core). On a CPU whose cores other jobs keep busy, 1 can
    be many times faster: threads waiting for each other spin."""
    json: bool = False
    """Print one JSON document (samples, settings, metrics) instead of the text report."""
    show_steps: bool = False
    """Print the canvas after every step, masks shown as a block glyph."""
    trace: str | None = None
    """Write every step (changed positions, canvas) to this file, one JSON object per line."""
    metrics: bool = True
    """Compute sample metrics and the real-text reference (reads the training dataset)."""
    data_dir: str | None = None
    """Where the checkpoint's dataset lives, for metrics (default: the training run's data_dir)."""
    judge_ckpt: str | None = None
    """Score the samples and real validation text under this checkpoint or run directory (NLL per character)."""
    judge_draws: int = 4
    """Monte-Carlo draws of the ELBO when the judge is a diffusion (non-causal) model."""
    sweep_steps: str | None = None
    """Comma list of step counts (8,16,32,64,128): metrics and speed for every strategy in --remasking and every
    step count, printed as a table and written to --sweep_out."""
    sweep_out: str = "sweep_steps.json"
    """JSON file the sweep writes."""

    strategies: tuple[str, ...] = field(default=(), init=False, repr=False)
    step_counts: tuple[int, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise UserError(f"--threads={self.threads}: must be >= 0 (0 is torch's default)")
        for name in ("num_samples", "steps", "batch_size", "judge_draws"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("length", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name}={value}: must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k}: must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p={self.top_p}: must be in (0, 1] (1 is off)")
        if not 0.0 <= self.randomness_strength <= 1.0:
            raise UserError(f"--randomness_strength={self.randomness_strength}: must be in [0, 1]")
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
            if min(self.step_counts) < 1:
                raise UserError(f"--sweep_steps={self.sweep_steps}: step counts must be at least 1")
            for flag in ("show_steps", "trace", "json"):
                if getattr(self, flag):
                    raise UserError(f"--{flag}: not available with --sweep_steps (the sweep writes --sweep_out)")
        elif len(self.strategies) > 1:
            raise UserError(f"--remasking={self.remasking}: several strategies need --sweep_steps")
        given = [f"--{n}" for n in ("prompt", "prompt_file", "infill") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)}: give only one of them")
        if self.infill is not None and self.length is not None:
            raise UserError(f"--length={self.length}: not with --infill (the template sets the length)")


# --- build ----------------------------------------------------------------------------------------------------


@dataclass
class Judge:
    trained: Trained
    draws: int  # Monte-Carlo draws of the ELBO (diffusion judges)

    def nll(self, texts: list[str], scored: torch.Tensor) -> list[float]:
        """NLL per character (nats) of each text: exact for causal judges, the negative ELBO otherwise.

        `scored` (N, L) marks the generated positions; a causal judge scores only those (given everything before
        them), a diffusion judge's bound covers whole texts. Diffusion judges draw their masks from a generator
        seeded the same way at every call, so samples and real text are scored with the same draws.
        """
        vocab, model = self.trained.vocab, self.trained.model
        device = next(model.parameters()).device
        x = torch.tensor([vocab.encode(t, source=f"--judge_ckpt={self.trained.path}") for t in texts], device=device)
        block_size = self.trained.model_config.block_size
        if self.trained.model_config.causal:
            return sm.causal_nll(model, x, scored.to(device), block_size).tolist()
        generator = torch.Generator(device=device).manual_seed(REFERENCE_SEED)
        try:
            values = sm.diffusion_nll(model, x, vocab.mask_id, block_size, self.draws, generator)
        except ImportError:
            raise UserError(
                f"--judge_ckpt={self.trained.path}: a diffusion judge needs unmask.elbo.score_windows, which this "
                "installation lacks; give an autoregressive (causal) checkpoint"
            ) from None
        return values.tolist()


@dataclass
class Setup:
    args: SampleArgs
    trained: Trained
    device: torch.device
    canvas: torch.Tensor  # (L,)
    fixed: torch.Tensor  # (L,) bool
    prompt_length: int  # characters of a prefix prompt (stripped before text metrics); 0 otherwise
    corpus: sm.CorpusStats | None = None
    reference_ids: torch.Tensor | None = None  # (N, L) real validation windows
    judge: Judge | None = None
    critic: Trained | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.canvas.shape[0]

    def generator(self) -> torch.Generator:
        # float64 sampling is unsupported on MPS: sample on the CPU there.
        device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(self.args.seed)


def _read_prompt(args: SampleArgs) -> str | None:
    if args.prompt_file is None:
        return args.prompt or None
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8") or None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompt_file={args.prompt_file}: cannot read ({type(exc).__name__})") from None


def _build_canvas(args: SampleArgs, trained: Trained) -> tuple[torch.Tensor, torch.Tensor, int]:
    vocab, block_size = trained.vocab, trained.model_config.block_size
    if args.infill is not None:
        template, mark = args.infill, args.placeholder
        if not placeholder_spans(template, mark):
            raise UserError(f"--infill: the template has no {mark!r} to fill (see --placeholder)")
        known = iter(vocab.encode("".join(ch for ch in template if ch != mark), source="--infill"))
        canvas, fixed = infill_canvas([None if ch == mark else next(known) for ch in template], vocab.mask_id)
        return canvas, fixed, 0
    prompt = _read_prompt(args)
    length = args.length or block_size
    if prompt is None:
        return torch.full((length,), vocab.mask_id, dtype=torch.long), torch.zeros(length, dtype=torch.bool), 0
    flag = "--prompt_file" if args.prompt_file else "--prompt"
    ids = vocab.encode(prompt, source=flag)
    if len(ids) >= length:
        raise UserError(f"{flag}: {len(ids)} characters leave nothing to generate in --length={length}")
    canvas, fixed = prompt_canvas(ids, length, vocab.mask_id)
    return canvas, fixed, len(ids)


def _check_blocks(args: SampleArgs, fixed: torch.Tensor, block_size: int) -> None:
    if args.block_length is not None and args.block_length > block_size:
        raise UserError(f"--block_length={args.block_length}: longer than the model's block_size={block_size}")
    needed = len(plan_blocks(~fixed.unsqueeze(0), block_size, args.block_length, 1 << 30))
    fewest = min(args.step_counts or (args.steps,))
    if fewest < needed:
        flag = f"--sweep_steps={args.sweep_steps}" if args.step_counts else f"--steps={args.steps}"
        raise UserError(
            f"{flag}: fewer steps than the {needed} blocks to generate (one step per block at least); "
            "raise the steps or --block_length"
        )


def _load_corpus(setup: Setup) -> None:
    """Training-corpus statistics and real validation windows; missing data is a note, not an error."""
    config = setup.trained.config
    data_dir = setup.args.data_dir or config.get("data_dir")
    dataset_name = config.get("dataset")
    if data_dir is None or dataset_name is None:
        setup.notes.append("the checkpoint names no dataset: corpus metrics and the real-text reference skipped")
        return
    try:
        dataset: Dataset = load_dataset(Path(data_dir) / dataset_name)
    except UserError as exc:
        setup.notes.append(f"corpus metrics and the real-text reference skipped ({exc}; see --data_dir)")
        return
    if dataset.vocab != setup.trained.vocab:
        setup.notes.append(f"{dataset.dir} has another vocabulary than the checkpoint: corpus metrics skipped")
        return
    setup.corpus = sm.corpus_stats(dataset.train, dataset.vocab.itos)
    if len(dataset.val) < setup.length:
        setup.notes.append(f"validation split shorter than {setup.length} characters: no real-text reference")
        return
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    setup.reference_ids = sample_windows(dataset.val, setup.length, setup.args.num_samples, generator)


def build(args: SampleArgs) -> Setup:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    trained = read_trained(args.ckpt, args.out_dir, device)
    path = trained.path
    trained.require_head(("lm",), "unmask sample")
    if trained.model_config.causal:
        raise UserError(
            f"{path}: an autoregressive (causal) checkpoint; unmask sample generates from unmasking checkpoints "
            "(use it as --judge_ckpt instead)"
        )
    canvas, fixed, prompt_length = _build_canvas(args, trained)
    _check_blocks(args, fixed, trained.model_config.block_size)
    setup = Setup(args, trained, device, canvas, fixed, prompt_length)
    if args.metrics:
        _load_corpus(setup)
    if args.judge_ckpt is not None:
        judge = read_trained(args.judge_ckpt, None, device, flag_prefix="judge_")
        judge.require_head(("lm",), "--judge_ckpt")
        setup.judge = Judge(judge, args.judge_draws)
    if args.critic_ckpt is not None:
        window = min(setup.length, trained.model_config.block_size)
        setup.critic = load_critic(args.critic_ckpt, trained, window, device)
    return setup


# --- run ------------------------------------------------------------------------------------------------------


@dataclass
class SampleRun:
    config: SamplingConfig
    texts: list[str]  # full canvases
    logprobs: list[float]  # per sample: mean log p of its generated characters when they were written
    seconds: float
    forward_passes: int
    generated_chars: int

    @property
    def chars_per_second(self) -> float:
        return self.generated_chars / self.seconds if self.seconds > 0 else math.inf


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
    )


StepHook = Callable[[int, StepEvent], None]  # (index of the batch's first sample, event)


def run_samples(setup: Setup, config: SamplingConfig, on_step: StepHook | None = None) -> SampleRun:
    """Generate all samples in batches of --batch_size with one generator seeded by --seed; time generation only."""
    args, trained = setup.args, setup.trained
    generator = setup.generator()
    texts: list[str] = []
    logprobs: list[float] = []
    seconds, forward_passes = 0.0, 0
    for first in range(0, args.num_samples, args.batch_size):
        rows = min(args.batch_size, args.num_samples - first)
        canvas = setup.canvas.to(setup.device).expand(rows, -1).clone()  # (B, L)
        fixed = setup.fixed.to(setup.device).expand(rows, -1)  # (B, L)
        hook = partial(on_step, first) if on_step else None
        t0 = time.perf_counter()
        mask_id, block_size = trained.vocab.mask_id, trained.model_config.block_size
        critic = None
        if config.remasking == "critic" and setup.critic is not None:
            critic = CriticRemask(setup.critic.model, config.randomness_strength)
        result = generate(trained.model, canvas, fixed, mask_id, block_size, config, generator, hook, critic)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        seconds += time.perf_counter() - t0
        forward_passes += result.forward_passes
        texts.extend(trained.vocab.decode(row) for row in result.tokens)
        generated = (~fixed).to(result.logprobs.device)
        logprobs.extend(((result.logprobs * generated).sum(1) / generated.sum(1)).tolist())
    generated_chars = int((~setup.fixed).sum()) * args.num_samples
    return SampleRun(config, texts, logprobs, seconds, forward_passes, generated_chars)


def evaluate(setup: Setup, run: SampleRun) -> dict[str, Any]:
    """Sample metrics and, when real text is available, the same metrics of real validation windows."""
    cut = setup.prompt_length
    result: dict[str, Any] = {
        "samples": sm.text_metrics([t[cut:] for t in run.texts], setup.corpus),
        "reference": None,
        "speed": {
            "chars_per_second": run.chars_per_second,
            "forward_passes": run.forward_passes,
            "seconds": run.seconds,
            "generated_chars": run.generated_chars,
        },
    }
    result["samples"]["mean_self_logprob"] = sm.mean(run.logprobs)
    if setup.corpus is not None:
        result["train_char_entropy_bits"] = setup.corpus.char_entropy
    reference_texts = None
    if setup.reference_ids is not None:
        reference_texts = [setup.trained.vocab.decode(row) for row in setup.reference_ids]
        result["reference"] = sm.text_metrics([t[cut:] for t in reference_texts], setup.corpus)
    if setup.judge is not None:
        scored = (~setup.fixed).expand(setup.args.num_samples, -1)
        result["samples"]["judge_nll"] = sm.mean(setup.judge.nll(run.texts, scored))
        if reference_texts is not None:
            result["reference"]["judge_nll"] = sm.mean(setup.judge.nll(reference_texts, scored))
    return result


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
    t = setup.trained
    top_k = config.top_k or "off"
    top_p = config.top_p if config.top_p < 1 else "off"
    return (
        f"checkpoint {t.path} (iter {t.iter_num}); {setup.args.num_samples} samples x {setup.length} characters; "
        f"{config.remasking}, {config.schedule} schedule, {config.steps} steps; temperature {config.temperature}, "
        f"top_k {top_k}, top_p {top_p}; seed {setup.args.seed}"
    )


def report(setup: Setup, run: SampleRun, metrics: dict[str, Any] | None, out: IO[str]) -> None:
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
    for note in setup.notes:
        print(f"note: {note}", file=out)


def json_document(setup: Setup, run: SampleRun, metrics: dict[str, Any] | None) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(setup.args).items() if k not in ("strategies", "step_counts")}
    return {
        "checkpoint": str(setup.trained.path),
        "iter_num": setup.trained.iter_num,
        "settings": {**settings, **asdict(run.config), "length": setup.length},
        "samples": [
            {"text": text, "generated": text[setup.prompt_length :], "mean_self_logprob": lp}
            for text, lp in zip(run.texts, run.logprobs, strict=True)
        ],
        "metrics": metrics,
        "speed": {"chars_per_second": run.chars_per_second, "forward_passes": run.forward_passes},
        "notes": setup.notes,
    }


def step_printer(setup: Setup, out: IO[str]) -> StepHook:
    def show(first: int, event: StepEvent) -> None:
        print(f"--- step {event.step + 1}/{event.steps} (block {event.block + 1}) ---", file=out)
        for i, row in enumerate(event.canvas):
            print(f"[{first + i + 1}] {setup.trained.vocab.decode(row)}", file=out)

    return show


def step_tracer(setup: Setup, file: IO[str]) -> StepHook:
    def trace(first: int, event: StepEvent) -> None:
        record = {
            "batch_first_sample": first,
            "step": event.step,
            "steps": event.steps,
            "block": event.block,
            "forward_passes": event.forward_passes,
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


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                SampleArgs,
                "unmask sample (--out_dir=DIR | --ckpt=PATH) [--flag=value ...]",
                "Generate text by iterative unmasking: prompts, infilling, remasking strategies, sample metrics and "
                "a steps sweep. See docs/sampling.md.",
            )
        )
        return 0
    _, flags = parse_flags(SampleArgs, argv, max_positional=0)
    if flags.get("preset") == "guide":
        flags = {**GUIDE_PRESET, **flags}
    args = SampleArgs(**flags)
    setup = build(args)

    if args.step_counts:
        rows = sweep(setup)
        document = {
            "checkpoint": str(setup.trained.path),
            "settings": {k: v for k, v in asdict(args).items() if k not in ("strategies", "step_counts")},
            "length": setup.length,
            "rows": rows,
            "notes": setup.notes,
        }
        Path(args.sweep_out).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.sweep_out}")
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

    def on_step(first: int, event: StepEvent) -> None:
        for hook in hooks:
            hook(first, event)

    try:
        run = run_samples(setup, sampling_config(args, args.strategies[0], args.steps), on_step if hooks else None)
    finally:
        if trace_file is not None:
            trace_file.close()
    metrics = evaluate(setup, run) if args.metrics else None
    if args.json:
        print(json.dumps(json_document(setup, run, metrics), indent=2, ensure_ascii=False))
    else:
        report(setup, run, metrics, sys.stdout)
    return 0
