"""Binary heads in the model (untied, padding mask) and the critic re-masking strategy."""

from __future__ import annotations

import torch
from torch import Tensor

from unmask.generation.diffusion import SamplingConfig, StepEvent, generate
from unmask.generation.remasking import Proposal
from unmask.model import ModelConfig, Transformer
from unmask.transfer.critic import CriticRemask


def test_binary_heads_are_untied_two_class_heads() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(10, 16, 1, 2, 16, head="token_binary"))
    assert model.head.weight.shape == (2, 16) and model.head.weight is not model.tok_emb.weight
    assert float(model.head.weight.detach().std()) < 0.005 and model.head.bias is not None
    assert model(torch.zeros(3, 7, dtype=torch.long)).shape == (3, 7, 2)
    seq = Transformer(ModelConfig(10, 16, 1, 2, 16, head="sequence_binary"))
    assert seq(torch.zeros(3, 7, dtype=torch.long)).shape == (3, 2)


def test_padding_does_not_change_a_texts_scores() -> None:
    torch.manual_seed(0)
    for head in ("sequence_binary", "token_binary"):
        model = Transformer(ModelConfig(10, 16, 2, 2, 16, head=head)).eval()  # type: ignore[arg-type]
        short = torch.tensor([[1, 2, 3]])
        padded = torch.tensor([[1, 2, 3, 9, 9, 9], [4, 5, 6, 7, 8, 1]])
        pad = torch.tensor([[False, False, False, True, True, True], [False] * 6])
        alone, batched = model(short), model(padded, pad=pad)
        if head == "sequence_binary":
            assert torch.allclose(alone[0], batched[0], atol=1e-5)
        else:
            assert torch.allclose(alone[0], batched[0, :3], atol=1e-5)
        leaked = model.hidden_states(padded)[0, :3]  # without the mask, the padding is attended to
        assert not torch.allclose(model.hidden_states(padded, pad)[0, :3], leaked, atol=1e-3)


class WrongIfZero(torch.nn.Module):
    """A stand-in critic: P(wrong) = 0.9 for character 0, 0.1 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx: Tensor) -> Tensor:
        p = torch.where(idx == 0, 0.9, 0.1)
        return torch.stack((torch.log1p(-p), torch.log(p)), dim=-1) + 0 * self.dummy  # (B, T, 2)


def test_critic_confidence_is_one_minus_p_wrong_in_the_block() -> None:
    context = torch.tensor([[3, 0, 1, 0, 2]])
    tokens = context[:, 1:4]
    proposal = Proposal(tokens, torch.ones(1, 3, 4) / 4, tokens == 0, torch.ones(1, 3, dtype=torch.bool), context, 1)
    confidence = CriticRemask(WrongIfZero(), randomness_strength=0.0).confidence(proposal, torch.Generator())
    assert torch.allclose(confidence, torch.tensor([[-0.9, -0.1, -0.9]], dtype=torch.float64))


def test_critic_sampling_remasks_what_the_critic_flags() -> None:
    def model(idx: Tensor) -> Tensor:
        # Character 0 at even positions, 1 at odd ones (almost surely); [MASK] = 2.
        logits = torch.zeros(*idx.shape, 3)
        logits[:, 0::2, 0] = logits[:, 1::2, 1] = 30.0
        return logits

    B, L = 4, 12
    seen: list[Tensor] = []

    def keep(event: StepEvent) -> None:
        seen.append(event.canvas.clone())

    canvas, fixed = torch.full((B, L), 2), torch.zeros(B, L, dtype=torch.bool)
    critic = CriticRemask(WrongIfZero(), randomness_strength=0.0)
    generator = torch.Generator().manual_seed(0)
    result = generate(model, canvas, fixed, 2, L, SamplingConfig(steps=2), generator, keep, critic)
    # Step 1 fills all 12 and re-masks the 6 the critic trusts least: exactly the zeros.
    assert torch.equal(seen[0][:, 0::2], torch.full((B, 6), 2)) and torch.equal(seen[0][:, 1::2], torch.ones(B, 6))
    assert int((result.tokens == 2).sum()) == 0
