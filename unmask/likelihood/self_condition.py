"""Self-conditioning in training (`--self_conditioning`): the mdlm, block_diffusion and unmasking objectives' losses.

Chen et al. 2022 ("Analog Bits", §3.2), applied to masked diffusion: the model may take its own previous prediction
of the clean tokens as an extra input (`Transformer.forward(..., self_cond=)`, probabilities over the vocabulary).
Training teaches it to use one without paying for a second backward pass: in half the micro-batches a first forward
pass without the input runs under no_grad and the trained pass takes its (detached) probabilities; in the others the
trained pass takes none (the same as a zero input), as scoring and the first sampling step do. The coin is drawn
from the run's masking generator with the batch's other draws, so a resumed run draws the same coins.

The input is the prediction at the positions the loss scores (the masked ones) and zero elsewhere: a clean position
carries its token already, and sampling, which feeds the step before's prediction where the canvas is still masked,
gives the model the same kind of input. The probabilities are over the real characters ([MASK] dropped), the
distribution sampling draws from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unmask.likelihood.elbo import real_char_log_probs

SELF_CONDITION_RATE = 0.5  # share of training micro-batches that get the first pass's prediction (Chen et al.)


def draw_self_condition(enabled: bool, generator: torch.Generator, training: bool) -> bool:
    """Whether a micro-batch trains with the first pass's prediction: a coin of SELF_CONDITION_RATE from the masking
    `generator`, drawn only for a training batch of a self-conditioned run (other runs' streams are unchanged)."""
    if not (enabled and training):
        return False
    return bool(torch.rand((), generator=generator, device=generator.device) < SELF_CONDITION_RATE)


def first_pass_input(model: torch.nn.Module, idx: Tensor, where: Tensor, mask_id: int, **model_kwargs: Any) -> Tensor:
    """The self-condition input (B, T, V) float32 for `idx` (B, T): a forward pass without one under no_grad,
    its probabilities over the real characters at the `where` (B, T) positions, zeros elsewhere.
    `model_kwargs` (attention mask, RoPE positions) go to that pass unchanged."""
    with torch.no_grad():
        logits = model(idx, positions=where, **model_kwargs)  # (N, V)
        probs = real_char_log_probs(logits, mask_id).exp()  # (N, V) float32
        out = probs.new_zeros(*idx.shape, probs.shape[-1])  # (B, T, V)
        out[where] = probs
    return out
