"""One generation engine: a typed request in, texts out, for every kind of language-model checkpoint.

`unmask sample`, `unmask.load(...).generate`, `unmask compare` and the animation all call `Engine.run` with a
`GenerationRequest`. The engine picks one `Strategy` per model kind when it is built (from the architecture:
causal, block-causal or bidirectional, or an unmasking policy when one is asked for), and never asks for the kind
again:

- `Autoregressive`: left to right, one character per forward pass, with the exact KV cache
  (`unmask.generation.cached.generate_autoregressive`);
- `BlockDiffusion`: blocks of the model's K characters left to right, each by iterative unmasking against a KV
  cache of the finished blocks (`generate_block_diffusion`);
- `FullSequence`: iterative unmasking of the whole canvas, block_size at a time (`unmask.generation.diffusion`);
- `PolicyOrder`: a deterministic unmasking order drawing from the model's own distribution
  (`unmask.likelihood.policy.generate_with_policy`), the sampler `unmask eval --estimator=policy` scores.

Each strategy refuses, in one line naming the flag, what its kind cannot do (`check`) before any work is done.
Samples draw from their own generators seeded from (seed, index), so a sample does not depend on the batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.generation.cached import generate_autoregressive, generate_block_diffusion, plan_diffusion_blocks
from unmask.generation.diffusion import Generation, SamplingConfig, StepEvent, generate
from unmask.generation.draws import RowGenerators
from unmask.generation.remasking import Remasking
from unmask.generation.schedules import plan_blocks
from unmask.likelihood.policy import generate_with_policy
from unmask.model import ModelConfig

StepHook = Callable[[int, StepEvent], None]  # (index of the batch's first sample, event)


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a canvas (see `unmask.generation.canvas`), how many samples, and how to sample."""

    canvas: Tensor  # (L,) ids, [MASK] where text is generated
    fixed: Tensor  # (L,) bool: the given characters
    sampling: SamplingConfig
    num_samples: int = 4
    batch_size: int = 16
    seed: int = 1337
    policy: str | None = None  # a deterministic unmasking order instead of `sampling.remasking`
    per_step: int = 1  # characters per step of the policy

    @property
    def length(self) -> int:
        return self.canvas.shape[0]


@dataclass
class Generated:
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


class Strategy(Protocol):
    """How one kind of model fills a batch of canvases."""

    name: str  # 'autoregressive', 'block_diffusion', 'diffusion' or 'policy'

    def check(self, request: GenerationRequest) -> None:
        """Refuse (UserError naming the flag) what this kind cannot do."""

    def blocks(self, fixed: Tensor, block_length: int | None) -> int | None:
        """How many blocks the canvas is generated in (each needs a step at least); None when `steps` does not
        apply (one character, or one policy step, per forward pass)."""
        ...

    def describe(self, config: SamplingConfig) -> str:
        """How this kind generates, for the report."""
        ...

    def fill(
        self,
        canvas: Tensor,
        fixed: Tensor,
        config: SamplingConfig,
        generators: RowGenerators,
        on_step: Callable[[StepEvent], None] | None,
        remasking: Remasking | None,
    ) -> Generation:
        """Fill the non-fixed positions of canvas (B, L)."""
        ...


DEFAULT_STEPS = 64  # --steps unset: this many steps per block_size characters to generate
# The parameter guide's "Generation & Output Parameters" recommendations (`--preset=guide`). Its 25 steps are a
# default like DEFAULT_STEPS (`default_steps`), not a value the user gave: they scale with a longer canvas.
GUIDE_PRESET: dict[str, float | int] = {"temperature": 0.6, "top_k": 20, "top_p": 0.85}
GUIDE_STEPS = 25

# The sampler of each checkpoint kind when the user chooses none (`unmask sample` and `Model.generate` with none of
# SAMPLER_CHOICES), chosen from docs/quality.md's table at 4 layers x 128, 2000 iterations: the setting with the
# lowest judge NLL among those whose samples' character entropy is within 0.2 bits of real text's (lower is the
# repetition that low-confidence orders cause in mdlm and unmasking samples, 0.5-0.9 bits below). Block diffusion:
# entropy-bounded low-confidence decoding at 1 nat (judge NLL 2.71 against 3.34 in random order, entropy 0.19 bits
# under real text). mdlm and unmasking: none qualifies but random order (the `--remasking` default). An
# autoregressive model draws left to right.
DEFAULT_SAMPLERS: dict[str, dict[str, Any]] = {
    "block_diffusion": {"remasking": "low_confidence", "entropy_budget": 1.0},
}
# Giving any of these chooses the sampler: the kind's default is then not applied (temperature, top-k and top-p
# shape the draws of any sampler and do not count).
SAMPLER_CHOICES = ("remasking", "steps", "schedule", "confidence_threshold", "entropy_budget", "policy", "preset")


def sampler_kind(config: ModelConfig) -> str:
    """'autoregressive', 'block_diffusion' or 'diffusion': the keys of DEFAULT_SAMPLERS."""
    if config.causal:
        return "autoregressive"
    return "block_diffusion" if config.diffusion_block > 0 else "diffusion"


def default_sampler(config: ModelConfig) -> dict[str, Any]:
    """The sampler settings of DEFAULT_SAMPLERS for this model's kind ({}: the flags' own defaults)."""
    return dict(DEFAULT_SAMPLERS.get(sampler_kind(config), {}))


def default_steps(base: int, to_fill: int, block_size: int, blocks: int) -> int:
    """The steps of a run that did not give --steps: `base` (DEFAULT_STEPS, or the guide's) for up to block_size
    characters to fill; for more, as many per character (the characters per step of the model's own canvas, so
    quality does not fall with the length and time grows linearly with it) but never more than one step per
    character; and at least one step per block (a block-diffusion model's blocks of K, or the sampler's blocks
    past block_size), so the default always works."""
    return max(base, min(-(-base * to_fill // block_size), to_fill), blocks)


def _check_steps(request: GenerationRequest, needed: int | None) -> None:
    config = request.sampling
    if needed is not None and not config.adaptive and config.steps < needed:
        raise UserError(
            f"--steps={config.steps}: fewer steps than the {needed} blocks to generate (one step per block at "
            "least); raise the steps or --block_length, or leave --steps unset"
        )


class _ModelStrategy:
    """What every strategy holds: the model, its architecture, the [MASK] id, and how refusals name the model."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, mask_id: int, source: str = "the model") -> None:
        self.model, self.config, self.mask_id, self.source = model, config, mask_id, source


class Autoregressive(_ModelStrategy):
    name = "autoregressive"

    def check(self, request: GenerationRequest) -> None:
        what = f"{self.source} is an autoregressive checkpoint"
        holes = (~request.fixed).nonzero().flatten()
        if holes.numel() and bool(request.fixed[int(holes[0]) :].any()):
            raise UserError(f"--infill: {what}, which sees no text to the right of a hole; use --prompt")
        if request.sampling.confidence_threshold is not None:
            tau = request.sampling.confidence_threshold
            raise UserError(f"--confidence_threshold={tau}: {what}; it commits one character per step")
        if request.sampling.entropy_budget is not None:
            budget = request.sampling.entropy_budget
            raise UserError(f"--entropy_budget={budget}: {what}; it commits one character per step")
        if request.sampling.block_length is not None:
            raise UserError(f"--block_length={request.sampling.block_length}: {what}; it generates one at a time")
        if request.policy is not None:
            raise UserError(f"--policy: an autoregressive (causal) checkpoint has one order already ({self.source})")

    def blocks(self, fixed: Tensor, block_length: int | None) -> int | None:
        return None

    def describe(self, config: SamplingConfig) -> str:
        return "autoregressive: one character per forward pass, KV cache"

    def fill(
        self,
        canvas: Tensor,
        fixed: Tensor,
        config: SamplingConfig,
        generators: RowGenerators,
        on_step: Callable[[StepEvent], None] | None,
        remasking: Remasking | None,
    ) -> Generation:
        block_size = self.config.block_size
        return generate_autoregressive(self.model, canvas, fixed, self.mask_id, block_size, config, generators, on_step)


class BlockDiffusion(_ModelStrategy):
    name = "block_diffusion"

    def check(self, request: GenerationRequest) -> None:
        K, length = self.config.diffusion_block, request.sampling.block_length
        if length is not None and length != K:
            raise UserError(
                f"--block_length={length}: {self.source} is a block-diffusion checkpoint; it generates in its own "
                f"blocks of {K}"
            )
        holes = (~request.fixed).nonzero().flatten()
        if holes.numel():
            next_block = (int(holes[0]) // K + 1) * K  # the first position after the first hole's block
            later = request.fixed[next_block:].nonzero().flatten()
            if later.numel():
                raise UserError(
                    f"--infill: {self.source} is a block-diffusion checkpoint (blocks of {K}, filled left to right, "
                    f"each seeing only the blocks before it); the template's fixed text at position "
                    f"{next_block + int(later[0])} lies after the block of the first hole (positions "
                    f"{next_block - K}..{next_block - 1}), so that hole could not see it: keep every fixed "
                    "character after the first hole inside that block"
                )
        _check_steps(request, self.blocks(request.fixed, length))

    def blocks(self, fixed: Tensor, block_length: int | None) -> int | None:
        mc = self.config
        return len(plan_diffusion_blocks(~fixed.unsqueeze(0), mc.diffusion_block, mc.block_size, None))

    def describe(self, config: SamplingConfig) -> str:
        return f"block diffusion: blocks of {self.config.diffusion_block} left to right, KV cache; " + _steps_text(
            config, " split across the blocks"
        )

    def fill(
        self,
        canvas: Tensor,
        fixed: Tensor,
        config: SamplingConfig,
        generators: RowGenerators,
        on_step: Callable[[StepEvent], None] | None,
        remasking: Remasking | None,
    ) -> Generation:
        mc = self.config
        return generate_block_diffusion(
            self.model, canvas, fixed, self.mask_id, mc.block_size, mc.diffusion_block, config, generators, on_step,
            remasking, self_conditioning=mc.self_conditioning,
        )  # fmt: skip


class FullSequence(_ModelStrategy):
    name = "diffusion"

    def check(self, request: GenerationRequest) -> None:
        block_size, length = self.config.block_size, request.sampling.block_length
        if length is not None and length > block_size:
            raise UserError(f"--block_length={length}: longer than the model's block_size={block_size}")
        _check_steps(request, self.blocks(request.fixed, length))

    def blocks(self, fixed: Tensor, block_length: int | None) -> int | None:
        return len(plan_blocks(~fixed.unsqueeze(0), self.config.block_size, block_length, None))

    def describe(self, config: SamplingConfig) -> str:
        return _steps_text(config, "")

    def fill(
        self,
        canvas: Tensor,
        fixed: Tensor,
        config: SamplingConfig,
        generators: RowGenerators,
        on_step: Callable[[StepEvent], None] | None,
        remasking: Remasking | None,
    ) -> Generation:
        block_size = self.config.block_size
        return generate(
            self.model, canvas, fixed, self.mask_id, block_size, config, generators, on_step, remasking,
            self_conditioning=self.config.self_conditioning,
        )  # fmt: skip


class PolicyOrder:
    name = "policy"

    def __init__(
        self, model: torch.nn.Module, config: ModelConfig, mask_id: int, policy: str, per_step: int, source: str
    ) -> None:
        self.model, self.config, self.mask_id, self.source = model, config, mask_id, source
        self.policy, self.per_step = policy, per_step

    def check(self, request: GenerationRequest) -> None:
        length = request.sampling.block_length
        if length is not None and length > self.config.block_size:
            raise UserError(f"--block_length={length}: longer than the model's block_size={self.config.block_size}")

    def blocks(self, fixed: Tensor, block_length: int | None) -> int | None:
        return None

    def describe(self, config: SamplingConfig) -> str:
        return (
            f"policy {self.policy}, {self.per_step} per step, the model's own distribution (exact likelihood: "
            "unmask eval --estimator=policy)"
        )

    def fill(
        self,
        canvas: Tensor,
        fixed: Tensor,
        config: SamplingConfig,
        generators: RowGenerators,
        on_step: Callable[[StepEvent], None] | None,
        remasking: Remasking | None,
    ) -> Generation:
        block_length = self.config.diffusion_block or config.block_length  # a block model's own K
        return generate_with_policy(
            self.model, canvas, fixed, self.mask_id, self.policy, self.per_step, generators.generators, block_length
        )


def _steps_text(config: SamplingConfig, split: str) -> str:
    if config.confidence_threshold is not None:
        how = f"confidence threshold {config.confidence_threshold} (adaptive steps)"
    elif config.entropy_budget is not None:
        how = f"entropy budget {config.entropy_budget} nats per step (adaptive steps)"
    else:
        how = f"{config.schedule} schedule, {config.steps} steps{split}"
    return f"{config.remasking}, {how}"


def strategy_for(
    model: torch.nn.Module,
    config: ModelConfig,
    mask_id: int,
    policy: str | None = None,
    per_step: int = 1,
    source: str = "the model",
) -> Strategy:
    """The strategy of a model's kind: chosen once, from its architecture (and a policy, if one is asked for).
    `source` names the model in refusals (e.g. the checkpoint's path)."""
    if config.causal:
        return Autoregressive(model, config, mask_id, source)
    if policy is not None:
        return PolicyOrder(model, config, mask_id, policy, per_step, source)
    if config.diffusion_block > 0:
        return BlockDiffusion(model, config, mask_id, source)
    return FullSequence(model, config, mask_id, source)


class Engine:
    """Generates for one loaded model: `check` a request, then `run` it."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab: Vocab,
        config: ModelConfig,
        device: torch.device,
        critic: torch.nn.Module | None = None,
        source: str = "the model",
    ) -> None:
        self.model, self.vocab, self.config, self.device, self.critic = model, vocab, config, device, critic
        self.source = source  # how refusals name the model (a checkpoint's path)

    def strategy(self, request: GenerationRequest) -> Strategy:
        mask_id, policy, per_step = self.vocab.mask_id, request.policy, request.per_step
        return strategy_for(self.model, self.config, mask_id, policy, per_step, self.source)

    def check(self, request: GenerationRequest) -> Strategy:
        strategy = self.strategy(request)
        strategy.check(request)
        return strategy

    def steps(
        self,
        fixed: Tensor,
        block_length: int | None,
        adaptive: bool,
        given: list[tuple[str, int]],
        base: int = DEFAULT_STEPS,
        policy: str | None = None,
    ) -> int:
        """The steps a request takes: the first of `given` ((flag, steps) the user gave, each refused when fewer
        than the blocks to generate), else `default_steps` for this model and canvas, which always suffices.
        `adaptive` (a confidence threshold or an entropy budget): every block takes what it needs."""
        block_size = self.config.block_size
        if block_length is not None and block_length > block_size and not self.config.causal:
            raise UserError(f"--block_length={block_length}: longer than the model's block_size={block_size}")
        strategy = strategy_for(self.model, self.config, self.vocab.mask_id, policy, source=self.source)
        needed = strategy.blocks(fixed, block_length)
        if needed is None or adaptive:
            return given[0][1] if given else base
        for flag, steps in given:
            if steps < needed:
                raise UserError(
                    f"{flag}: fewer steps than the {needed} blocks to generate (one step per block at least); "
                    "raise the steps or --block_length, or leave --steps unset"
                )
        if given:
            return given[0][1]
        return default_steps(base, int((~fixed).sum()), block_size, needed)

    def generators(self, request: GenerationRequest, first: int, count: int) -> RowGenerators:
        """Samples first .. first + count - 1 each draw from their own generator seeded from (seed, index)."""
        # float64 sampling is unsupported on MPS: sample on the CPU there.
        device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        return RowGenerators.for_samples(request.seed, first, count, device)

    def run(self, request: GenerationRequest, on_step: StepHook | None = None) -> Generated:
        """Generate every sample in batches of `batch_size`; time generation only."""
        strategy = self.check(request)
        config = request.sampling
        remasking = None
        if config.remasking == "critic" and self.critic is not None:
            from unmask.transfer.critic import CriticRemask

            remasking = CriticRemask(self.critic, config.randomness_strength)
        texts: list[str] = []
        logprobs: list[float] = []
        nfe: list[int] = []
        seconds, forward_passes = 0.0, 0
        for first in range(0, request.num_samples, request.batch_size):
            rows = min(request.batch_size, request.num_samples - first)
            canvas = request.canvas.to(self.device).expand(rows, -1).clone()  # (B, L)
            fixed = request.fixed.to(self.device).expand(rows, -1)  # (B, L)
            hook = partial(on_step, first) if on_step else None
            generators = self.generators(request, first, rows)
            t0 = time.perf_counter()
            result = strategy.fill(canvas, fixed, config, generators, hook, remasking)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - t0
            forward_passes += result.forward_passes
            nfe.extend(result.nfe.tolist())
            texts.extend(self.vocab.decode(row) for row in result.tokens)
            generated = (~fixed).to(result.logprobs.device)
            logprobs.extend(((result.logprobs * generated).sum(1) / generated.sum(1)).tolist())
        generated_chars = int((~request.fixed).sum()) * request.num_samples
        return Generated(config, texts, logprobs, seconds, forward_passes, generated_chars, nfe)
