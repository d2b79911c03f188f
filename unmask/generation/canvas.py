"""Canvases: what a generation starts from. A canvas is (L,) ids with [MASK] where text is to be generated, and a
fixed mask (L,) bool marking the characters given (a prompt, or the text of an infilling template).

`build_canvas` is the one place a prompt, a length or a template becomes a canvas, for `unmask sample` and for
`unmask.load(...).generate` alike; its errors name the command's flags (`--prompt`, `--length`, `--infill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from unmask.data.dataset import Vocab
from unmask.errors import UserError


@dataclass
class Canvas:
    ids: Tensor  # (L,) long
    fixed: Tensor  # (L,) bool
    prompt_length: int  # characters of a prefix prompt (stripped before text metrics); 0 otherwise
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.ids.shape[0]


def prompt_canvas(prompt_ids: list[int], length: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """(L,) ids and (L,) fixed mask for a fixed prefix continued to `length` characters."""
    if len(prompt_ids) >= length:
        raise ValueError(f"a prompt of {len(prompt_ids)} characters leaves nothing to generate in {length}")
    canvas = torch.full((length,), mask_id, dtype=torch.long)
    canvas[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    fixed = torch.arange(length) < len(prompt_ids)
    return canvas, fixed


def placeholder_spans(template: str, placeholder: str) -> list[tuple[int, int]]:
    """[start, end) of every run of `placeholder` in `template`."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, ch in enumerate(template + "\0"):
        if ch == placeholder and start is None:
            start = i
        elif ch != placeholder and start is not None:
            spans.append((start, i))
            start = None
    return spans


def infill_canvas(template_ids: list[int | None], mask_id: int) -> tuple[Tensor, Tensor]:
    """(L,) ids and fixed mask from a template already encoded, with None at the positions to fill."""
    canvas = torch.tensor([mask_id if t is None else t for t in template_ids], dtype=torch.long)
    fixed = torch.tensor([t is not None for t in template_ids], dtype=torch.bool)
    return canvas, fixed


def build_canvas(
    vocab: Vocab,
    block_size: int,
    causal: bool,
    prompt: str | None = None,
    length: int | None = None,
    infill: str | None = None,
    placeholder: str = "_",
    prompt_flag: str = "--prompt",
    source: str = "the model",
) -> Canvas:
    """The canvas of a request: an infilling template, or a prompt continued to `length` (default: block_size).

    A causal model (no beginning-of-text token) with no prompt starts from a newline, as nanoGPT's sample.py does;
    the newline is counted as prompt, not as generated text.
    """
    if infill is not None:
        if causal:
            raise UserError(
                f"--infill: {source} is an autoregressive checkpoint, which sees no text to the right of a "
                "hole; use --prompt"
            )
        if not placeholder_spans(infill, placeholder):
            raise UserError(f"--infill: the template has no {placeholder!r} to fill (see --placeholder)")
        known = iter(vocab.encode("".join(ch for ch in infill if ch != placeholder), source="--infill"))
        template, given = infill_canvas([None if ch == placeholder else next(known) for ch in infill], vocab.mask_id)
        return Canvas(template, given, 0)
    length = length or block_size
    if not prompt:
        if not causal:
            return Canvas(
                torch.full((length,), vocab.mask_id, dtype=torch.long), torch.zeros(length, dtype=torch.bool), 0
            )
        if "\n" not in vocab.itos:
            raise UserError(
                f"{prompt_flag}: {source} is autoregressive and its vocabulary has no newline to start from"
            )
        canvas = build_canvas(vocab, block_size, causal, "\n", length, prompt_flag=prompt_flag, source=source)
        canvas.notes.append("no prompt: the autoregressive samples continue a newline (nanoGPT's default start)")
        return canvas
    ids = vocab.encode(prompt, source=prompt_flag)
    if len(ids) >= length:
        raise UserError(f"{prompt_flag}: {len(ids)} characters leave nothing to generate in --length={length}")
    canvas_ids, fixed = prompt_canvas(ids, length, vocab.mask_id)
    return Canvas(canvas_ids, fixed, len(ids))
