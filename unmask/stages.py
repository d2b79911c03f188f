"""Curriculum stages: what one masking stage is, how it is parsed from a dict, and how it corrupts a batch.

A stage is written as in the original framework's README, a dict such as
``{"type": "sticky", "target_masked_ratio": 0.4, "p1_probability": 0.2, "p2_probability": 0.8,
"val_loss_stale_count": 5}``. Parsing validates every key and value and names the stage in its errors
(``unmasking_stages[1]: ...``), so a bad curriculum fails before any work is done.

Corruption choices (the seed left them open, see research/seed_system.md §10 "open questions"):
sticky and span stages replace the selected positions with ``[MASK]`` (the README-era code); random stages
use BERT 80/10/10 corruption (the seed's random stage).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unmask import masking
from unmask.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Fields every stage has. Subclasses add the masking parameters of their `type`."""

    type: ClassVar[str] = ""
    val_loss_stale_count: int = 5

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        """Which positions to corrupt: bool (B, T) on the generator's device."""
        raise NotImplementedError

    def corrupt(
        self, x: torch.Tensor, selected: torch.Tensor, mask_id: int, n_chars: int, generator: torch.Generator
    ) -> torch.Tensor:
        """The model input for clean ids `x` (B, T) with `selected` (B, T) positions to be predicted."""
        return masking.mask_positions(x, selected, mask_id)

    def apply(
        self, x: torch.Tensor, mask_id: int, n_chars: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted input (B, T), selected positions (B, T)) for clean ids `x` (B, T)."""
        selected = self.select(x.shape[0], x.shape[1], generator)
        return self.corrupt(x, selected, mask_id, n_chars, generator), selected

    def params(self) -> str:
        """The stage's parameters as the console shows them, e.g. ``target_ratio=0.4, p1=0.2, p2=0.8``."""
        raise NotImplementedError

    def ratio_label(self) -> str:
        """Short label for per-stage validation lines, e.g. ``ratio=0.4``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class StickyStage(Stage):
    """Masked regions that grow from seeds: exactly round(target_masked_ratio * T) masks per row."""

    type: ClassVar[str] = "sticky"
    target_masked_ratio: float = 0.2
    p1_probability: float = 0.3
    p2_probability: float = 0.0

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        return masking.sticky_selection(
            batch_size, T, self.target_masked_ratio, self.p1_probability, self.p2_probability, generator
        )

    def params(self) -> str:
        return f"target_ratio={self.target_masked_ratio}, p1={self.p1_probability}, p2={self.p2_probability}"

    def ratio_label(self) -> str:
        return f"ratio={self.target_masked_ratio}"


@dataclass(frozen=True, kw_only=True)
class RandomStage(Stage):
    """Independent positions at a per-sample ratio ~ U(0, max_masked_ratio), BERT 80/10/10 corruption."""

    type: ClassVar[str] = "random"
    max_masked_ratio: float = 0.3

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        return masking.random_selection(batch_size, T, 0.0, self.max_masked_ratio, generator)

    def corrupt(
        self, x: torch.Tensor, selected: torch.Tensor, mask_id: int, n_chars: int, generator: torch.Generator
    ) -> torch.Tensor:
        return masking.bert_corruption(x, selected, mask_id, n_chars, generator)

    def params(self) -> str:
        return f"max_ratio={self.max_masked_ratio}"

    def ratio_label(self) -> str:
        return f"max_ratio={self.max_masked_ratio}"


@dataclass(frozen=True, kw_only=True)
class SpanStage(Stage):
    """`spans_count` random inclusive spans per row (seed_system.md §1.5); covers about k/(2k+1) of a row."""

    type: ClassVar[str] = "span"
    spans_count: int = 20

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        return masking.span_selection(batch_size, T, self.spans_count, generator)

    def params(self) -> str:
        return f"spans_count={self.spans_count}"

    def ratio_label(self) -> str:
        return f"spans={self.spans_count}"


STAGE_TYPES: dict[str, type[Stage]] = {cls.type: cls for cls in (StickyStage, RandomStage, SpanStage)}

# The seed README's three-stage sticky curriculum: scattered 20 % masks, then small regions, then large ones.
DEFAULT_STAGES: tuple[Stage, ...] = (
    StickyStage(target_masked_ratio=0.2, p1_probability=0.3, p2_probability=0.0, val_loss_stale_count=5),
    StickyStage(target_masked_ratio=0.4, p1_probability=0.2, p2_probability=0.8, val_loss_stale_count=5),
    StickyStage(target_masked_ratio=0.6, p1_probability=0.1, p2_probability=0.9, val_loss_stale_count=10),
)

_PROBABILITIES = ("target_masked_ratio", "p1_probability", "p2_probability", "max_masked_ratio")


def parse_stage(raw: Any, where: str) -> Stage:
    """Validate one stage dict (or an existing Stage) and build it; errors name `where`, e.g. `unmasking_stages[2]`."""
    if isinstance(raw, Stage):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a stage must be a dict with a 'type' key, got {raw!r}")
    kind = raw.get("type")
    if kind is None:
        raise UserError(f"{where}: missing key 'type' (one of {', '.join(STAGE_TYPES)})")
    cls = STAGE_TYPES.get(kind)
    if cls is None:
        raise UserError(f"{where}: unknown stage type {kind!r} (expected one of {', '.join(STAGE_TYPES)})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields) - {"type"})
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {kind} stage (allowed: {', '.join(fields)})"
        )
    required = [name for name in fields if name != "val_loss_stale_count"]
    missing = [name for name in required if name not in raw]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(map(repr, missing))} for a {kind} stage")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "type":
            continue
        if name in _PROBABILITIES:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}: {name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{where}: {name}={value} is outside [0, 1]")
            values[name] = float(value)
        else:  # integer counts
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{where}: {name} must be an integer, got {value!r}")
            if value < 1:
                raise UserError(f"{where}: {name}={value} must be >= 1")
            values[name] = value
    return cls(**values)


def parse_stages(raw: Any, name: str) -> tuple[Stage, ...]:
    """Validate a list of stage dicts given for flag/preset key `name`."""
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{name}: expected a list of stage dicts, got {type(raw).__name__}")
    if not raw:
        raise UserError(f"{name}: the list of stages is empty")
    return tuple(parse_stage(item, f"{name}[{i}]") for i, item in enumerate(raw))
