"""The flags of `unmask sample` (`SampleArgs`), validated on construction: each error names its flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unmask.config.flags import MAX_SEED, Range, bounded, check_ranges
from unmask.errors import UserError
from unmask.generation.engine import SAMPLER_CHOICES
from unmask.generation.remasking import REMASKING
from unmask.likelihood.policy import Policy
from unmask.runtime import MAX_THREADS

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
    schedule: Literal["linear", "cosine"] | None = None
    """How many positions are committed per step: 'linear' (equal counts; the default) or 'cosine' (MaskGIT: few
    first)."""
    remasking: str | None = None
    """Which positions are committed: random (MDLM ancestral order: with temperature 1, samples of the model's own
    distribution), low_confidence (most probable first, LLaDA), margin (top-1 minus top-2), entropy (lowest
    entropy first), remask (the original sampler: fill everything, re-mask down the schedule by entropy mixed
    with chance) or critic (remask scored by --critic_ckpt's P(wrong)). A comma list with --sweep_steps.
    Default: random, except for block-diffusion checkpoints when none of --remasking, --steps, --schedule,
    --confidence_threshold, --entropy_budget, --policy, --preset and --sweep_steps is given: then the checkpoint
    kind's sampler, low_confidence with --entropy_budget=1 (chosen from the quality table of docs/quality.md)."""
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
        self.strategies = tuple(s.strip() for s in (self.remasking or "random").split(","))
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
            clash = [k for k, v in {**defaults, **quiet}.items() if getattr(self, k) not in (v, None)]
            if clash:
                raise UserError(f"--policy={self.policy}: not with --{clash[0]} (it draws from the model as it is)")

    @property
    def chooses_sampler(self) -> bool:
        """Whether a flag that chooses the sampler was given (else the checkpoint kind's default sampler applies:
        `unmask.generation.engine.DEFAULT_SAMPLERS`)."""
        return self.sweep_steps is not None or any(getattr(self, name) is not None for name in SAMPLER_CHOICES)
