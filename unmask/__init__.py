"""unmask: masked discrete-diffusion ("unmasking") language models, character-level first.

The modules in data-flow order (docs/architecture.md has the details):

text -> ids          `prepare` (the command; `sources`: where shakespeare_char comes from), `data` (the dataset
                     format, `Vocab`, memmapped splits)
ids -> windows       `data.sample_windows`, `batches.BatchSource`
windows -> batch     `masking` (pure selection/corruption functions), `stages` (stage dicts), `curriculum`
                     (which stages train now), `batches` (per-stage corruption, the selection pool)
batch -> logits      `model` (`Transformer`, KV cache)
logits -> loss       `objectives` (one module per objective with its losses, `registry` names them), `block_diffusion`
                     (its masks, loss and bound), `transfer.tasks` (the binary tasks)
loss -> step         `trainer` (the loop), `schedule` (learning rate), `runtime` (device, DDP, threads),
                     `preemption`
step -> metrics      `validation` (every evaluation metric of training), `elbo` (likelihood estimators),
                     `policy` (the exact likelihood of an unmasking policy), `run_log` (console, metrics.jsonl)
metrics -> files     `checkpoint` (atomic, verified), `run_dir` (a run owns its out_dir), `loading` (checkpoint ->
                     model for inference), `export` (safetensors), `api` (`unmask.load`)
commands             `cli` (dispatch table), `command` (shared parsing), `train`, `sample` (+ `sampling`,
                     `sampling_cached`, `sample_metrics`, `animate`), `evaluate`, `compare`, `plot`, `export`,
                     `transfer.classify`
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
