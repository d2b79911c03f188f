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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

import torch

from unmask.config.command import parse_command
from unmask.data.dataset import Dataset, load_dataset, sample_windows
from unmask.errors import UserError
from unmask.generation import metrics as sm
from unmask.generation.animate import Recorder, animation_html, readable, write_animation
from unmask.generation.cached import generate_autoregressive, generate_block_diffusion, plan_diffusion_blocks
from unmask.generation.canvas import infill_canvas, placeholder_spans, prompt_canvas
from unmask.generation.diffusion import SamplingConfig, StepEvent, generate
from unmask.generation.draws import RowGenerators
from unmask.generation.remasking import REMASKING
from unmask.generation.schedules import plan_blocks
from unmask.likelihood.policy import Policy, generate_with_policy
from unmask.likelihood.score import scorer_for
from unmask.runtime import resolve_device, set_threads
from unmask.storage.loading import Trained, read_trained

# The parameter guide's "Generation & Output Parameters" recommendations (seed document 003).
GUIDE_PRESET: dict[str, Any] = {"temperature": 0.6, "top_k": 20, "top_p": 0.85, "steps": 25}
REFERENCE_SEED = 0  # real validation windows for the reference column: the same ones in every run
# Longest canvas: 10^6 characters keep the (B, L) canvas, fixed mask and float64 log-probabilities at about 17 MB
# per sample; far longer canvases would allocate gigabytes before the first forward pass.
MAX_LENGTH = 1_000_000
# Largest --entropy_budget: far above any block's summed entropy (2^20 positions x ln(65,536) is about 1.2e7 nats),
# so every useful value fits and a typo of many digits is refused.
MAX_ENTROPY_BUDGET = 1e9


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
    holding as much text to its left as fits. At most 1,000,000."""
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
    confidence_threshold: float | None = None
    """Parallel decoding (Fast-dLLM): every step commits each masked position of the current block whose drawn
    character has model probability >= this (untempered, as LLaDA's and Fast-dLLM's confidence), and at least
    one (the one --remasking ranks first); forward passes then adapt to the model's certainty and --steps and
    --schedule are unused. 0 fills a block per step; above 1, one position per step. Not with remask/critic."""
    entropy_budget: float | None = None
    """Entropy-bounded parallel decoding (EB-sampler), in nats, from 0 to 1e9: every step commits masked positions of
    the current block in --remasking's order while the summed entropy of the model's (untempered) distributions at
    them stays within this budget, and at least one; forward passes then adapt to the model's certainty and
    --steps and --schedule are unused. 0: one position per step; a budget above the block's summed entropy (at
    most block length x ln(characters)) fills it in one step. Not with --confidence_threshold or remask/critic."""
    block_length: int | None = None
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
    """'guide': the parameter guide's generation values (temperature 0.6, top_k 20, top_p 0.85, 25 steps);
    flags given explicitly still win."""
    seed: int = 1337
    """Seed of the sampling generators: sample i draws from its own generator, seeded from (seed, i), so a sample
    depends on the seed and its index, not on --batch_size."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    batch_size: int = 16
    """Samples generated together in one batch."""
    threads: int = 0
    """CPU threads for torch. 0 (default): as many as the cores that are idle now (the cores minus the 1-minute
    load average, at least 1): on cores that other jobs keep busy, threads waiting for each other spin."""
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
    judge_draws: int = 4
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
    per_step: int = 1
    """--policy: characters committed per step (the last step takes the rest); --steps is then unused."""

    strategies: tuple[str, ...] = field(default=(), init=False, repr=False)
    step_counts: tuple[int, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "batch_size", "judge_draws"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("length", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name}={value}: must be at least 1")
        if self.length is not None and self.length > MAX_LENGTH:
            raise UserError(f"--length={self.length}: at most {MAX_LENGTH:,} characters per sample")
        if self.infill is not None and len(self.infill) > MAX_LENGTH:
            raise UserError(f"--infill: a template of {len(self.infill):,} characters; at most {MAX_LENGTH:,}")
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k}: must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p={self.top_p}: must be in (0, 1] (1 is off)")
        if not 0.0 <= self.randomness_strength <= 1.0:
            raise UserError(f"--randomness_strength={self.randomness_strength}: must be in [0, 1]")
        tau = self.confidence_threshold
        if tau is not None and not tau >= 0.0:  # `not >=` also refuses NaN
            raise UserError(f"--confidence_threshold={tau}: must be >= 0 (0 commits a whole block per step)")
        budget = self.entropy_budget
        if budget is not None and not 0.0 <= budget <= MAX_ENTROPY_BUDGET:  # `not <=` also refuses NaN
            raise UserError(
                f"--entropy_budget={budget}: must be in [0, 1e9] nats (0 commits one position per step; a block's "
                "summed entropy fills it in one)"
            )
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
        if self.per_step < 1 or (self.per_step != 1 and self.policy is None):
            raise UserError(f"--per_step={self.per_step}: must be >= 1, and goes with --policy")
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
class Judge:
    trained: Trained
    draws: int  # Monte-Carlo draws of the ELBO (diffusion judges)

    def nll(self, texts: list[str], scored: torch.Tensor) -> list[float]:
        """NLL per character (nats) of each text under the judge, by its kind's scorer (the number `unmask eval`
        and `Model.score` give: `unmask.likelihood.score`): exact for causal judges, a bound otherwise.

        `scored` (N, L) marks the generated positions; a causal judge scores only those (given everything before
        them, in the windows `unmask eval` takes), a diffusion judge's bound covers whole texts. Diffusion judges
        draw their masks from a generator seeded the same way at every call, so samples and real text are scored
        with the same draws.
        """
        vocab, model, mc = self.trained.vocab, self.trained.model, self.trained.model_config
        device = next(model.parameters()).device
        x = torch.tensor([vocab.encode(t, source=f"--judge_ckpt={self.trained.path}") for t in texts], device=device)
        scorer = scorer_for(mc.causal, mc.diffusion_block, vocab.mask_id, mc.block_size, self.draws)
        generator = torch.Generator(device=device).manual_seed(REFERENCE_SEED)
        return scorer.text_nats(model, x, generator, scored.to(device)).tolist()


KINDS = ("diffusion", "autoregressive", "block_diffusion")


def checkpoint_kind(trained: Trained) -> str:
    """How a language-model checkpoint generates: 'diffusion' (iterative unmasking of a canvas),
    'autoregressive' (a causal model, one character per forward pass) or 'block_diffusion' (blocks of the
    model's `diffusion_block` characters, left to right, each by iterative unmasking)."""
    config = trained.model_config
    if config.causal:
        return "autoregressive"
    block = config.diffusion_block
    if trained.config.get("objective") == "block_diffusion" and block <= 0:
        raise UserError(f"{trained.path}: objective block_diffusion but its model_config has no diffusion_block")
    return "block_diffusion" if block > 0 else "diffusion"


@dataclass
class Setup:
    args: SampleArgs
    trained: Trained
    device: torch.device
    canvas: torch.Tensor  # (L,)
    fixed: torch.Tensor  # (L,) bool
    prompt_length: int  # characters of a prefix prompt (stripped before text metrics); 0 otherwise
    kind: str = "diffusion"  # see checkpoint_kind
    corpus: sm.CorpusStats | None = None
    reference_ids: torch.Tensor | None = None  # (N, L) real validation windows
    judge: Judge | None = None
    critic: Trained | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.canvas.shape[0]

    def generator(self, first: int = 0, count: int | None = None) -> RowGenerators:
        """The generators of samples first .. first + count - 1 (default: all), one per sample, seeded from --seed
        and the sample's index: a sample does not depend on --batch_size."""
        # float64 sampling is unsupported on MPS: sample on the CPU there.
        device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        count = self.args.num_samples - first if count is None else count
        return RowGenerators.for_samples(self.args.seed, first, count, device)


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


def _check_block_diffusion(args: SampleArgs, trained: Trained, fixed: torch.Tensor) -> None:
    """Refuse, in one line, what a block-causal model cannot do: other block lengths, and templates with fixed
    text after the first hole's block (the hole would be filled without seeing it)."""
    K, path = trained.model_config.diffusion_block, trained.path
    if args.block_length is not None and args.block_length != K:
        raise UserError(
            f"--block_length={args.block_length}: {path} is a block-diffusion checkpoint; it generates in its own "
            f"blocks of {K}"
        )
    if args.infill is None:
        return
    holes = (~fixed).nonzero().flatten()
    next_block = (int(holes[0]) // K + 1) * K  # the first position after the first hole's block
    later = fixed[next_block:].nonzero().flatten()
    if later.numel():
        raise UserError(
            f"--infill: {path} is a block-diffusion checkpoint (blocks of {K}, filled left to right, each seeing only "
            f"the blocks before it); the template's fixed text at position {next_block + int(later[0])} lies after "
            f"the block of the first hole (positions {next_block - K}..{next_block - 1}), so that hole could not "
            "see it: keep every fixed character after the first hole inside that block"
        )


def _check_blocks(args: SampleArgs, fixed: torch.Tensor, trained: Trained, kind: str) -> None:
    block_size = trained.model_config.block_size
    if args.block_length is not None and args.block_length > block_size:
        raise UserError(f"--block_length={args.block_length}: longer than the model's block_size={block_size}")
    if args.confidence_threshold is not None or args.entropy_budget is not None:
        return  # adaptive steps: every block takes what it needs
    if kind == "block_diffusion":
        K = trained.model_config.diffusion_block
        needed = len(plan_diffusion_blocks(~fixed.unsqueeze(0), K, block_size, None))
    else:
        needed = len(plan_blocks(~fixed.unsqueeze(0), block_size, args.block_length, None))
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


def _check_autoregressive(args: SampleArgs, trained: Trained) -> None:
    """Refuse, in one line, what does not apply to left-to-right generation one character at a time."""
    what = f"{trained.path} is an autoregressive checkpoint"
    if args.infill is not None:
        raise UserError(f"--infill: {what}, which sees no text to the right of a hole; use --prompt")
    if args.sweep_steps is not None:
        raise UserError(f"--sweep_steps={args.sweep_steps}: {what}; it takes one step per character")
    if args.confidence_threshold is not None:
        tau = args.confidence_threshold
        raise UserError(f"--confidence_threshold={tau}: {what}; it commits one character per step")
    if args.entropy_budget is not None:
        raise UserError(f"--entropy_budget={args.entropy_budget}: {what}; it commits one character per step")
    if args.block_length is not None:
        raise UserError(f"--block_length={args.block_length}: {what}; it generates one character at a time")
    if args.critic_ckpt is not None:
        raise UserError(f"--critic_ckpt={args.critic_ckpt}: {what}; there is nothing to re-mask")


def _autoregressive_start(
    trained: Trained, canvas: torch.Tensor, fixed: torch.Tensor, notes: list[str]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Without a prompt, a causal model (no beginning-of-text token) starts from a newline, as nanoGPT's
    sample.py does; the newline is not counted as generated text."""
    if "\n" not in trained.vocab.itos:
        raise UserError(f"--prompt: {trained.path} is autoregressive and its vocabulary has no newline to start from")
    canvas, fixed = canvas.clone(), fixed.clone()
    canvas[0], fixed[0] = trained.vocab.encode("\n", source="--prompt")[0], True
    notes.append("no prompt: the autoregressive samples continue a newline (nanoGPT's default start)")
    return canvas, fixed, 1


def build(args: SampleArgs) -> Setup:
    set_threads(args.threads)
    device = resolve_device(args.device)
    return build_from(args, read_trained(args.ckpt, args.out_dir, device), device)


def build_from(args: SampleArgs, trained: Trained, device: torch.device) -> Setup:
    """The sampling setup of a loaded model (`unmask sample`, and `unmask.load(...).generate`)."""
    trained.require_head(("lm",), "unmask sample")
    kind = checkpoint_kind(trained)
    notes: list[str] = []
    if kind == "autoregressive":
        _check_autoregressive(args, trained)
    canvas, fixed, prompt_length = _build_canvas(args, trained)
    if kind == "autoregressive":
        if prompt_length == 0:
            canvas, fixed, prompt_length = _autoregressive_start(trained, canvas, fixed, notes)
    else:
        if kind == "block_diffusion":
            _check_block_diffusion(args, trained, fixed)
        _check_blocks(args, fixed, trained, kind)
    setup = Setup(args, trained, device, canvas, fixed, prompt_length, kind, notes=notes)
    if args.metrics:
        _load_corpus(setup)
    if args.judge_ckpt is not None:
        judge = read_trained(args.judge_ckpt, None, device, flag_prefix="judge_")
        judge.require_head(("lm",), "--judge_ckpt")
        setup.judge = Judge(judge, args.judge_draws)
    if args.critic_ckpt is not None:
        window = min(setup.length, trained.model_config.block_size)
        from unmask.transfer.critic import load_critic

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
    nfe: list[int]  # per sample: model calls it took part in (adaptive with --confidence_threshold)

    @property
    def mean_nfe(self) -> float:
        return sum(self.nfe) / len(self.nfe)

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
        confidence_threshold=args.confidence_threshold,
        entropy_budget=args.entropy_budget,
    )


StepHook = Callable[[int, StepEvent], None]  # (index of the batch's first sample, event)


def run_samples(setup: Setup, config: SamplingConfig, on_step: StepHook | None = None) -> SampleRun:
    """Generate all samples in batches of --batch_size, each from its own generator; time generation only."""
    args, trained = setup.args, setup.trained
    texts: list[str] = []
    logprobs: list[float] = []
    nfe: list[int] = []
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
            from unmask.transfer.critic import CriticRemask

            critic = CriticRemask(setup.critic.model, config.randomness_strength)
        generator = setup.generator(first, rows)
        if args.policy is not None:
            block_length = trained.model_config.diffusion_block or args.block_length  # a block model's own K
            result = generate_with_policy(
                trained.model, canvas, fixed, mask_id, args.policy, args.per_step, generator.generators, block_length
            )
        elif setup.kind == "autoregressive":
            result = generate_autoregressive(trained.model, canvas, fixed, mask_id, block_size, config, generator, hook)
        elif setup.kind == "block_diffusion":
            K = trained.model_config.diffusion_block
            result = generate_block_diffusion(
                trained.model, canvas, fixed, mask_id, block_size, K, config, generator, hook, critic
            )
        else:
            result = generate(trained.model, canvas, fixed, mask_id, block_size, config, generator, hook, critic)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        seconds += time.perf_counter() - t0
        forward_passes += result.forward_passes
        nfe.extend(result.nfe.tolist())
        texts.extend(trained.vocab.decode(row) for row in result.tokens)
        generated = (~fixed).to(result.logprobs.device)
        logprobs.extend(((result.logprobs * generated).sum(1) / generated.sum(1)).tolist())
    generated_chars = int((~setup.fixed).sum()) * args.num_samples
    return SampleRun(config, texts, logprobs, seconds, forward_passes, generated_chars, nfe)


def evaluate(setup: Setup, run: SampleRun) -> dict[str, Any]:
    """Sample metrics and, when real text is available, the same metrics of real validation windows."""
    cut = setup.prompt_length
    result: dict[str, Any] = {
        "samples": sm.text_metrics([t[cut:] for t in run.texts], setup.corpus),
        "reference": None,
        "speed": {
            "chars_per_second": run.chars_per_second,
            "forward_passes": run.forward_passes,
            "mean_nfe": run.mean_nfe,
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
    if setup.kind == "autoregressive":
        return (
            f"checkpoint {t.path} (iter {t.iter_num}, autoregressive: one character per forward pass, KV cache); "
            f"{setup.args.num_samples} samples x {setup.length} characters; temperature {config.temperature}, "
            f"top_k {top_k}, top_p {top_p}; seed {setup.args.seed}"
        )
    if setup.args.policy is not None:
        return (
            f"checkpoint {t.path} (iter {t.iter_num}); {setup.args.num_samples} samples x {setup.length} characters; "
            f"policy {setup.args.policy}, {setup.args.per_step} per step, the model's own distribution (exact "
            f"likelihood: unmask eval --estimator=policy); seed {setup.args.seed}"
        )
    if config.confidence_threshold is not None:
        steps = f"confidence threshold {config.confidence_threshold} (adaptive steps)"
    elif config.entropy_budget is not None:
        steps = f"entropy budget {config.entropy_budget} nats per step (adaptive steps)"
    else:
        steps = f"{config.schedule} schedule, {config.steps} steps"
        if setup.kind == "block_diffusion":
            steps += " split across the blocks"
    kind = ""
    if setup.kind == "block_diffusion":
        kind = f", block diffusion: blocks of {t.model_config.diffusion_block} left to right, KV cache"
    return (
        f"checkpoint {t.path} (iter {t.iter_num}{kind}); {setup.args.num_samples} samples x {setup.length} characters; "
        f"{config.remasking}, {steps}; temperature {config.temperature}, "
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
    print(f"NFE per sample: mean {run.mean_nfe:.2f} (min {min(run.nfe)}, max {max(run.nfe)})", file=out)
    for note in setup.notes:
        print(f"note: {note}", file=out)


def json_document(setup: Setup, run: SampleRun, metrics: dict[str, Any] | None) -> dict[str, Any]:
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
        recorder = Recorder(setup.canvas, setup.fixed, setup.trained.vocab.mask_id, args.num_samples)
        hooks.append(recorder)

    def on_step(first: int, event: StepEvent) -> None:
        for hook in hooks:
            hook(first, event)

    try:
        run = run_samples(setup, sampling_config(args, args.strategies[0], args.steps), on_step if hooks else None)
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
