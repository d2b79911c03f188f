"""unmask: masked discrete-diffusion ("unmasking") language models, character-level first."""

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
