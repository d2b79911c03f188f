"""Curriculum stages: what one masking stage is, how it is parsed from a dict, and how it corrupts a batch.

A stage is written as in the original framework's README, a dict such as
``{"type": "sticky", "target_masked_ratio": 0.4, "p1_probability": 0.2, "p2_probability": 0.8,
"val_loss_stale_count": 5}``. Parsing validates every key and value and names the stage in its errors
(``unmasking_stages[1]: ...``), so a bad curriculum fails before any work is done.

Corruption choices (the original framework left them open; docs/origin.md):
sticky and span stages replace the selected positions with ``[MASK]`` (the README-era code); random stages
use BERT 80/10/10 corruption (the seed's random stage).

How long a stage lasts (every type): until its validation loss has not improved for `val_loss_stale_count`
evaluations, or until it has trained for `epochs` epochs or `iters` iterations, whichever comes first (the
parameter guide's epoch-based stages). A stage that gives a duration but no `val_loss_stale_count` is
duration-only. `lr_factor` multiplies the learning-rate schedule while the stage is current (the guide's
`learning_rate_decay_factors`). `unmask.curriculum.plateau` applies these rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unmask.curriculum import masking
from unmask.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Fields every stage has. Subclasses add the masking parameters of their `type`."""

    type: ClassVar[str] = ""
    # Keys a stage dict of this type must give (the masking parameters).
    required: ClassVar[tuple[str, ...]] = ()
    val_loss_stale_count: int | None = 5
    epochs: float | None = None
    iters: int | None = None
    lr_factor: float = 1.0

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

    def duration(self) -> str:
        """How the stage ends and its lr factor, e.g. ``val_loss_stale_count=5`` or ``epochs=75, lr_factor=0.8``."""
        parts = [] if self.val_loss_stale_count is None else [f"val_loss_stale_count={self.val_loss_stale_count}"]
        parts += [f"{name}={value:g}" for name, value in (("epochs", self.epochs), ("iters", self.iters)) if value]
        if self.lr_factor != 1.0:
            parts.append(f"lr_factor={self.lr_factor:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The stage as a dict `parse_stage` reads back; keys left unset (None) are omitted."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"type": self.type, **values}


@dataclass(frozen=True, kw_only=True)
class StickyStage(Stage):
    """Masked regions that grow from seeds: exactly round(target_masked_ratio * T) masks per row."""

    type: ClassVar[str] = "sticky"
    required: ClassVar[tuple[str, ...]] = ("target_masked_ratio", "p1_probability", "p2_probability")
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
    """Independent positions at a per-sample ratio ~ U(lo, hi), BERT 80/10/10 corruption.

    The range is either ``(0, max_masked_ratio)`` (the original README's key) or ``masking_rate_range = (lo, hi)``
    (the parameter guide's key); exactly one of the two is given.
    """

    type: ClassVar[str] = "random"
    max_masked_ratio: float | None = None
    masking_rate_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if (self.max_masked_ratio is None) == (self.masking_rate_range is None):
            raise ValueError("a random stage takes exactly one of max_masked_ratio and masking_rate_range")

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) of the per-sample masking ratio."""
        if self.masking_rate_range is not None:
            return self.masking_rate_range
        assert self.max_masked_ratio is not None  # __post_init__ guarantees one of the two
        return 0.0, self.max_masked_ratio

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        lo, hi = self.bounds
        return masking.random_selection(batch_size, T, lo, hi, generator)

    def corrupt(
        self, x: torch.Tensor, selected: torch.Tensor, mask_id: int, n_chars: int, generator: torch.Generator
    ) -> torch.Tensor:
        return masking.bert_corruption(x, selected, mask_id, n_chars, generator)

    def params(self) -> str:
        if self.masking_rate_range is None:
            return f"max_ratio={self.max_masked_ratio}"
        return "ratio~U({}, {})".format(*self.masking_rate_range)

    def ratio_label(self) -> str:
        return self.params()


@dataclass(frozen=True, kw_only=True)
class SpanStage(Stage):
    """`spans_count` random inclusive spans per row (docs/origin.md §1.3); covers about k/(2k+1) of a row."""

    type: ClassVar[str] = "span"
    required: ClassVar[tuple[str, ...]] = ("spans_count",)
    spans_count: int = 20

    def select(self, batch_size: int, T: int, generator: torch.Generator) -> torch.Tensor:
        return masking.span_selection(batch_size, T, self.spans_count, generator)

    def params(self) -> str:
        return f"spans_count={self.spans_count}"

    def ratio_label(self) -> str:
        return f"spans={self.spans_count}"


STAGE_TYPES: dict[str, type[Stage]] = {cls.type: cls for cls in (StickyStage, RandomStage, SpanStage)}

# The seed README's three-stage sticky curriculum: scattered 20 % masks, then small regions, then large ones.
# The original README's three sticky stages (the `original` preset trains exactly these).
ORIGINAL_STAGES: tuple[Stage, ...] = (
    StickyStage(target_masked_ratio=0.2, p1_probability=0.3, p2_probability=0.0, val_loss_stale_count=5),
    StickyStage(target_masked_ratio=0.4, p1_probability=0.2, p2_probability=0.8, val_loss_stale_count=5),
    StickyStage(target_masked_ratio=0.6, p1_probability=0.1, p2_probability=0.9, val_loss_stale_count=10),
)
# Share of --max_iters each original stage lasts at most in the default curriculum; the final stage gets the rest.
DEFAULT_STAGE_SHARE = 0.1


def default_curriculum(max_iters: int) -> tuple[Stage, ...]:
    """The curriculum of a run that configures no stages: the original three sticky stages, each ending at its
    stale count or after 10 % of --max_iters (whichever comes first), then a `random` stage masking U(0, 1) of
    each window until the end. Sampling starts from an all-[MASK] canvas: a model that never trained beyond 60 %
    masking cannot fill one (with the three stages alone, samples scored 5.72 nats per character under an
    autoregressive judge, against 1.77 for real text)."""
    share = max(1, round(DEFAULT_STAGE_SHARE * max_iters))
    sticky = tuple(dataclasses.replace(stage, iters=share) for stage in ORIGINAL_STAGES)
    return (*sticky, RandomStage(masking_rate_range=(0.0, 1.0)))


_PROBABILITIES = ("target_masked_ratio", "p1_probability", "p2_probability", "max_masked_ratio")
# Integer keys: inclusive range. iters matches TrainConfig's --max_iters bound, spans_count its --block_size bound
# (more spans than characters cannot be placed).
_COUNTS = {"val_loss_stale_count": (1, 10**6), "iters": (1, 10**12), "spans_count": (1, 2**20)}
# Positive number keys: (0, upper].
_POSITIVE = {"epochs": 1e6, "lr_factor": 1000.0}
MAX_STAGES = 1024


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def _check_value(name: str, value: Any, where: str) -> Any:
    """One validated, typed stage value; errors name the stage and the key."""
    if name in _PROBABILITIES:
        number = _number(value, where, name)
        if not 0.0 <= number <= 1.0:
            raise UserError(f"{where}: {name}={value} is outside [0, 1]")
        return number
    if name in _COUNTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {name} must be an integer, got {value!r}")
        least, most = _COUNTS[name]
        if value < least:
            raise UserError(f"{where}: {name}={value} must be >= {least}")
        if value > most:
            shown = value if len(str(value)) <= 24 else f"<{len(str(value))} digits>"
            raise UserError(f"{where}: {name}={shown} must be <= {most:,}")
        return value
    if name in _POSITIVE:
        number = _number(value, where, name)
        if number <= 0:
            raise UserError(f"{where}: {name}={value} must be > 0")
        if number > _POSITIVE[name]:
            raise UserError(f"{where}: {name}={value} must be <= {_POSITIVE[name]:,g}")
        return number
    if name == "masking_rate_range":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{where}: masking_rate_range must be a pair [lo, hi], got {value!r}")
        lo, hi = (_number(v, where, name) for v in value)
        if not 0.0 <= lo <= hi <= 1.0:
            raise UserError(f"{where}: masking_rate_range={list(value)} needs 0 <= lo <= hi <= 1")
        return (lo, hi)
    raise AssertionError(f"no validator for stage key {name}")


def parse_stage(raw: Any, where: str) -> Stage:
    """Validate one stage dict (or an existing Stage) and build it; errors name `where`, e.g. `unmasking_stages[2]`.

    A key given as None counts as not given (so `Stage.to_dict` output and hand-written dicts read the same).
    """
    if isinstance(raw, Stage):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a stage must be a dict with a 'type' key, got {raw!r}")
    raw = {k: v for k, v in raw.items() if v is not None}
    kind = raw.get("type")
    if kind is None:
        raise UserError(f"{where}: missing key 'type' (one of {', '.join(STAGE_TYPES)})")
    cls = STAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UserError(f"{where}: unknown stage type {kind!r} (expected one of {', '.join(STAGE_TYPES)})")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(fields) - {"type"})
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {kind} stage (allowed: {', '.join(fields)})"
        )
    missing = [name for name in cls.required if name not in raw]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(map(repr, missing))} for a {kind} stage")
    if cls is RandomStage:
        given = [name for name in ("max_masked_ratio", "masking_rate_range") if name in raw]
        if not given:
            raise UserError(f"{where}: missing key(s) 'max_masked_ratio' (or 'masking_rate_range') for a random stage")
        if len(given) == 2:
            raise UserError(f"{where}: give either 'max_masked_ratio' or 'masking_rate_range', not both")
    values = {name: _check_value(name, value, where) for name, value in raw.items() if name != "type"}
    if "val_loss_stale_count" not in raw and ("epochs" in raw or "iters" in raw):
        values["val_loss_stale_count"] = None  # duration-only: the stale count never ends this stage
    return cls(**values)


def parse_stages(raw: Any, name: str) -> tuple[Stage, ...]:
    """Validate a list of stage dicts given for flag/preset key `name`."""
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{name}: expected a list of stage dicts, got {type(raw).__name__}")
    if not raw:
        raise UserError(f"{name}: the list of stages is empty")
    if len(raw) > MAX_STAGES:
        raise UserError(f"{name}: {len(raw):,} stages, more than {MAX_STAGES}")
    return tuple(parse_stage(item, f"{name}[{i}]") for i, item in enumerate(raw))
