"""The Python API: `unmask.load(PATH)` -> a `Model` that generates text and scores it in bits per character.

PATH is an export directory (`unmask export`), a checkpoint file or a training run directory (its newest
checkpoint). `Model.generate` takes the options of `unmask sample` (validated by the same rules, so an error names
the same flag) and samples by iterative unmasking, or left to right for an autoregressive model. `Model.score`
gives bits per character with the estimator that fits the objective: the negative ELBO by exact-k masking for
diffusion models (an upper bound on the NLL; Ou et al. 2024, Nie et al. 2025), the exact NLL for autoregressive
ones (see `unmask.likelihood.elbo`).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from unmask.data.dataset import Vocab
from unmask.errors import UserError
from unmask.generation.canvas import build_canvas
from unmask.generation.diffusion import SamplingConfig
from unmask.generation.engine import (
    DEFAULT_STEPS,
    GUIDE_PRESET,
    GUIDE_STEPS,
    SAMPLER_CHOICES,
    Engine,
    GenerationRequest,
    default_sampler,
)
from unmask.likelihood.score import Scorer, scorer_for
from unmask.model import ModelConfig, Transformer
from unmask.storage.export_format import export_config, export_dir_problem, is_export_dir, load_export, split_tied
from unmask.storage.loading import Trained, trained_from
from unmask.storage.run_dir import read_checkpoint

DEFAULT_SEED = 1337  # `unmask sample`'s default
DEFAULT_BATCH = 16  # samples generated together (`unmask sample --batch_size`; a sample does not depend on it)
SCORE_DRAWS = 16  # forward passes per window of a diffusion score (exact_k: k stratified over them)
# The sampler options of `Model.generate` (besides prompt/length/seed): `unmask sample`'s.
SAMPLER_OPTIONS = (*(f.name for f in fields(SamplingConfig)), "critic_ckpt", "preset")
AR_OPTIONS = ("temperature", "top_k", "top_p")


class Model:
    """A trained model ready for inference: `.model` (torch module, eval mode), `.vocab`, `.config`.

    `.config` is the export document (`config.json` of `unmask export`): `model_config`, `vocab`, `objective`,
    `objective_params`, `training` summary, `train_config`, versions. `.trained` is the same model as
    `unmask.storage.loading.Trained`, the form the commands use.
    """

    def __init__(self, trained: Trained, config: dict[str, Any]) -> None:
        self.trained = trained
        self.config = config

    @property
    def model(self) -> Transformer:
        return self.trained.model

    @property
    def vocab(self) -> Vocab:
        return self.trained.vocab

    @property
    def model_config(self) -> ModelConfig:
        return self.trained.model_config

    @property
    def objective(self) -> str:
        return str(self.config["objective"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        mc = self.model_config
        return (
            f"unmask.Model({self.objective}, {mc.n_layer} layers x {mc.n_embd}, block_size {mc.block_size}, "
            f"{self.vocab.n_chars} characters, from {self.trained.path})"
        )

    # --- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        length: int | None = None,
        num_samples: int | None = None,
        *,
        infill: str | None = None,
        placeholder: str = "_",
        seed: int = DEFAULT_SEED,
        **sampler_options: Any,
    ) -> list[str] | str:
        """Generate text; the result includes the prompt (as `unmask sample` prints it).

        `prompt`: a fixed prefix (a list: one batch per prompt); `length`: characters per sample, prompt included
        (default: the model's block_size); `infill`: a template whose runs of `placeholder` are filled (sets the
        length). `sampler_options` are `unmask sample`'s: steps, schedule, remasking, randomness_strength,
        temperature, top_k, top_p, block_length, critic_ckpt, preset ("guide"); an autoregressive model takes
        temperature, top_k and top_p. One `torch.Generator` seeded with `seed` drives everything, so a call is
        reproducible. Returns one string, or a list when `prompt` is a list or `num_samples` is given.
        """
        self.trained.require_head(("lm",), "Model.generate")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        rows = 1 if num_samples is None else num_samples
        if rows < 1:
            raise UserError(f"num_samples={num_samples}: must be at least 1")
        if infill is not None and self.model_config.causal:
            raise UserError("--infill: an autoregressive model generates left to right only (no infilling)")
        texts: list[str] = []
        for text in prompts:
            texts.extend(self._generate(text, length, rows, infill, placeholder, seed, sampler_options))
        return texts[0] if num_samples is None and not isinstance(prompt, list) else texts

    def _generate(
        self,
        prompt: str | None,
        length: int | None,
        rows: int,
        infill: str | None,
        placeholder: str,
        seed: int,
        options: dict[str, Any],
    ) -> list[str]:
        """The engine `unmask sample` runs (`unmask.generation.engine`: same canvases, checks, default steps and
        per-sample generators), so a call gives the texts the command prints for the same seed."""
        mc = self.model_config
        unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
        if unknown:
            raise UserError(f"{', '.join(unknown)}: unknown sampler option(s); expected {', '.join(SAMPLER_OPTIONS)}")
        if mc.causal:
            other = sorted(set(options) - set(AR_OPTIONS))
            if other:
                raise UserError(
                    f"{', '.join(other)}: not for an autoregressive model (it takes {', '.join(AR_OPTIONS)})"
                )
        options = dict(options)
        if not any(name in options for name in SAMPLER_CHOICES):  # the kind's default sampler, as `unmask sample`
            options = {**default_sampler(mc), **options}
        base = DEFAULT_STEPS
        if options.pop("preset", None) == "guide":
            options = {**GUIDE_PRESET, **options}
            base = GUIDE_STEPS
        critic_ckpt = options.pop("critic_ckpt", None)
        checked = SamplingConfig(**options)  # validates first (errors name the flags); the steps are resolved below
        if (options.get("remasking") == "critic") != (critic_ckpt is not None):
            raise UserError("remasking='critic' and critic_ckpt=PATH go together")
        if mc.causal and not prompt and length is not None:
            length += 1  # no prompt: `unmask sample` starts from a newline (nanoGPT's default), not part of the text
        elif mc.causal and not prompt:
            length = mc.block_size + 1
        source = str(self.trained.path)
        canvas = build_canvas(self.vocab, mc.block_size, mc.causal, prompt, length, infill, placeholder, source=source)
        critic = None
        if critic_ckpt is not None:
            from unmask.transfer.critic import load_critic

            window = min(canvas.length, mc.block_size)
            critic = load_critic(critic_ckpt, self.trained, window, self._sampling_device()).model
        engine = Engine(self.model, self.vocab, mc, self.device, critic, source)
        given = [(f"--steps={checked.steps}", checked.steps)] if "steps" in options else []
        steps = engine.steps(canvas.fixed, checked.block_length, checked.adaptive, given, base)
        config = replace(checked, steps=steps)
        run = engine.run(GenerationRequest(canvas.ids, canvas.fixed, config, rows, DEFAULT_BATCH, seed))
        return [t[canvas.prompt_length :] for t in run.texts] if mc.causal and not prompt else run.texts

    def _sampling_device(self) -> torch.device:
        # float64 draws are unsupported on MPS: sample on the CPU there (as `unmask sample` does).
        return self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")

    # --- scoring --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, texts: str | list[str], draws: int = SCORE_DRAWS, seed: int = 0) -> list[float]:
        """Bits per character of each text.

        The number of the model's kind (`unmask.likelihood.score.Scorer`, the one `unmask eval` and the training
        log use): diffusion models the negative ELBO (exact-k masks stratified over `draws` forward passes per
        window), block-diffusion models the block negative ELBO, both summed over consecutive block_size windows
        of the text, per character; every text uses a generator seeded with `seed`, so its score does not depend
        on the other texts. Autoregressive models: the exact NLL of every character after the first (the first is
        context only), each given at most block_size characters before it in non-overlapping windows (as
        `unmask eval`).
        """
        self.trained.require_head(("lm",), "Model.score")
        if isinstance(texts, str):
            texts = [texts]
        if draws < 1:
            raise UserError(f"draws={draws}: must be at least 1")
        return [self._score_one(text, i, draws, seed) for i, text in enumerate(texts)]

    def scorer(self, draws: int = SCORE_DRAWS) -> Scorer:
        """The likelihood of this model's kind (`unmask.likelihood.score`): what `unmask eval` and training report."""
        mc = self.model_config
        return scorer_for(mc.causal, mc.diffusion_block, self.vocab.mask_id, mc.block_size, draws)

    def _score_one(self, text: str, index: int, draws: int, seed: int) -> float:
        ids = torch.tensor(self.vocab.encode(text, source=f"texts[{index}]"), dtype=torch.long, device=self.device)
        scorer = self.scorer(draws)
        if scorer.exact and len(ids) < 2:
            raise UserError(f"texts[{index}]: an autoregressive score needs at least 2 characters")
        if len(ids) == 0:
            raise UserError(f"texts[{index}]: empty text")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return float(scorer.text_nats(self.model, ids[None], generator)[0]) / math.log(2)


def load(path: str | Path, device: torch.device | str = "cpu") -> Model:
    """A `Model` from an export directory, a checkpoint file or a run directory (its newest checkpoint)."""

    path = Path(path)
    incomplete = export_dir_problem(path)
    if incomplete is not None:
        raise UserError(incomplete)
    if is_export_dir(path):
        model, vocab, config = load_export(path, device)
        training = config.get("training", {})
        trained = Trained(
            model,
            vocab,
            model.config,
            dict(config.get("train_config", {})),
            int(training.get("iterations", 0)),
            path,
            dict(config.get("task", {})),
        )
        return Model(trained, config)
    if not path.exists():
        raise UserError(f"{path}: no such export directory, checkpoint file or run directory")
    ckpt_path, ckpt = read_checkpoint(path, str(path))  # a run directory: the run's newest checkpoint
    trained = trained_from(ckpt_path, ckpt, device)
    _, tied = split_tied(trained.model.state_dict())
    return Model(trained, export_config(trained, ckpt, tied))
