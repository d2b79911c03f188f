"""Critic-guided re-masking: a per-character binary classifier chooses which characters to revise.

`unmask sample --remasking=critic --critic_ckpt=PATH`. The critic is a `token_binary` checkpoint (`unmask train
--switch_to_binary=True --binary_task=replaced_token`): for every character of a text it gives P(wrong), the
probability that the character was replaced. Sampling works as the original framework's `remask` strategy
(fill every masked position, then re-mask the least trusted down to the schedule's count), with the critic in
place of the sampling model's entropy:

    re-mask score = s * U + (1 - s) * P_critic(wrong | the whole filled window),    s = --randomness_strength

so `critic` and `remask` differ only in the scorer. The critic reads `proposal.context`: the model's window with
the candidates filled in. With blocks (long canvases), later blocks are still [MASK] in that window, an input
the critic never saw in training (it was trained on complete text).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmask.errors import UserError
from unmask.generation.draws import Generators, uniform
from unmask.generation.remasking import Proposal
from unmask.storage.loading import Trained, read_trained


class CriticRemask:
    """The `remask` strategy scored by a critic's P(wrong) (a `unmask.generation.diffusion.Remasking`)."""

    name = "critic"
    refill = True

    def __init__(self, critic: torch.nn.Module, randomness_strength: float = 0.4) -> None:
        if not 0.0 <= randomness_strength <= 1.0:
            raise ValueError(f"randomness_strength must be in [0, 1], got {randomness_strength}")
        self.critic = critic
        self.randomness_strength = randomness_strength

    def p_wrong(self, proposal: Proposal) -> Tensor:
        """(B, n) float64 on the proposal's sampling device: the critic's P(class 1) for the block's positions."""
        device = next(self.critic.parameters()).device
        logits = self.critic(proposal.context.to(device))  # (B, W, 2)
        n = proposal.tokens.shape[1]
        block = logits[:, proposal.offset : proposal.offset + n].double().softmax(dim=-1)[..., 1]  # (B, n)
        return block.to(proposal.probs.device)

    def confidence(self, proposal: Proposal, generator: Generators) -> Tensor:
        p_wrong = self.p_wrong(proposal).to(generator.device)
        noise = uniform(p_wrong.shape, generator)  # (B, n): per-sample streams with RowGenerators
        s = self.randomness_strength
        return -(s * noise + (1.0 - s) * p_wrong)  # the highest re-masking score is the least trusted


def load_critic(value: str, sampler: Trained, window: int, device: torch.device) -> Trained:
    """The critic checkpoint for `sampler`: a per-character classifier with the same vocabulary that can read
    windows of `window` characters."""
    critic = read_trained(value, None, device, flag_prefix="critic_")
    critic.require_head(("token_binary",), "--critic_ckpt")
    if critic.vocab != sampler.vocab:
        raise UserError(
            f"--critic_ckpt={value}: its vocabulary ({critic.vocab.n_chars} characters) differs from the sampling "
            f"model's ({sampler.vocab.n_chars}); train the critic from the same pretrained checkpoint or dataset"
        )
    if critic.model_config.block_size < window:
        raise UserError(
            f"--critic_ckpt={value}: block_size {critic.model_config.block_size} is shorter than the sampling window "
            f"of {window} characters"
        )
    return critic
