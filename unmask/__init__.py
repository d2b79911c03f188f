"""unmask: masked discrete-diffusion ("unmasking") language models, character-level first.

The subpackages in data-flow order (docs/architecture.md has the details and the layer rules):

text -> ids          `data` (prepare, the dataset format, `Vocab`, where corpora come from)
ids -> batches       `curriculum` (pure masking functions, stage dicts, the plateau rule, batches)
batch -> logits      `model` (`Transformer`, attention, KV cache)
logits -> loss       `objectives` (the registry, one module per objective), `likelihood.block` (block diffusion's
                     maths), `transfer.tasks` (the binary tasks)
loss -> step         `training` (the loop, its state and progress, the schedule, preemption, the run log,
                     validation), `runtime` (device, DDP, threads), `launch` (torchrun with honest exit codes)
step -> numbers      `likelihood` (estimators, ELBO, block bound, policy, and `score`: the one likelihood path)
model -> text        `generation` (`engine`: the one generation engine; canvases, schedules, remasking, draws,
                     the KV-cached paths, sample quality, the animation)
files                `storage` (atomic writes, checkpoints, run directories, loading, the export format)
commands             `cli` (dispatch table), `config` (flags, presets, `TrainConfig`), `commands` (one thin main
                     per command), `api` (`unmask.load`)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unmask.api import Model

__version__ = "0.1.0"


def load(path: str | Path, device: Any = "cpu") -> Model:
    """A trained model from an export directory (`unmask export`), a checkpoint file or a run directory.

    Returns `unmask.api.Model`: `.generate(...)`, `.score(texts)`, `.model`, `.vocab`, `.config`. Imported
    lazily, so `import unmask` stays light (no torch until a model is loaded).
    """
    from unmask.api import load as load_model

    return load_model(path, device)
