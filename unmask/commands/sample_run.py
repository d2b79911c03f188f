"""`unmask sample` after parsing: build (checkpoint, canvas, steps, the engine's checks, reference, judge), run (the
generation engine), and the output (report, JSON document, step hooks, the steps sweep).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch

from unmask.commands.sample_args import SampleArgs
from unmask.errors import UserError
from unmask.generation.animate import readable
from unmask.generation.canvas import Canvas, build_canvas
from unmask.generation.diffusion import SamplingConfig, StepEvent
from unmask.generation.engine import (
    DEFAULT_STEPS,
    GUIDE_STEPS,
    Engine,
    Generated,
    GenerationRequest,
    StepHook,
    default_sampler,
    sampler_kind,
)
from unmask.generation.quality import Judge, Reference, evaluate_samples, load_reference
from unmask.runtime import resolve_device, set_threads
from unmask.storage.atomic import write_new_file
from unmask.storage.loading import Trained, read_trained

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
    chosen = {} if args.chooses_sampler else default_sampler(mc)
    if chosen:  # the kind's default sampler (docs/quality.md): the settings are then those of a user who gave them
        args = replace(args, **chosen)
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
    if chosen:
        flags = " ".join(f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}" for k, v in chosen.items())
        kind_name = sampler_kind(mc)
        setup.notes.append(f"sampler: the default for {kind_name} checkpoints, {flags} (--remasking or --steps choose)")
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
        schedule=args.schedule or "linear",
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
    schedule = args.schedule or "linear"
    print(f"steps sweep: {setup.trained.path}, {args.num_samples} x {setup.length} characters, {schedule}")
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


def write_sweep(args: SampleArgs, run_dir: Path, document: dict[str, Any]) -> Path:
    """Write the sweep document to --sweep_out, or to the first free sweep_steps[_N].json of `run_dir`."""
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.sweep_out is not None:
        candidates: Any = [Path(args.sweep_out)]
    else:
        candidates = (run_dir / ("sweep_steps.json" if i == 1 else f"sweep_steps_{i}.json") for i in itertools.count(1))
    for path in candidates:
        try:
            write_new_file(path, text.encode("utf-8"))
            return path
        except FileExistsError:
            if args.sweep_out is not None:
                raise UserError(f"--sweep_out={args.sweep_out}: the file exists; give a new path") from None
        except OSError as exc:
            flag = f"--sweep_out={args.sweep_out}" if args.sweep_out is not None else f"--ckpt={run_dir}"
            raise UserError(f"{flag}: cannot write {path} ({exc.strerror})") from None
    raise AssertionError("unreachable: the default names never run out")
