"""The training optimizer: AdamW's fused kernel on the CPU too, the same update as the per-tensor loop to rounding."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from unmask.model import ModelConfig, Transformer
from unmask.training.state import build_optimizer


def _cfg() -> SimpleNamespace:
    return SimpleNamespace(weight_decay=0.1, learning_rate=1e-2, beta1=0.9, beta2=0.99, adam_eps=1e-8)


def test_the_cpu_optimizer_is_fused_and_steps_as_the_loop_does() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    loop_model = copy.deepcopy(model)
    rt = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    fused, scaler = build_optimizer(_cfg(), model, rt)  # type: ignore[arg-type]
    assert all(group["fused"] for group in fused.param_groups)  # ~3x faster than the loop at nanoGPT's CPU shape
    assert not scaler.is_enabled()
    c = _cfg()
    loop = torch.optim.AdamW(
        loop_model.optimizer_groups(c.weight_decay), lr=c.learning_rate, betas=(c.beta1, c.beta2), eps=c.adam_eps
    )
    idx = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, opt in ((model, fused), (loop_model, loop)):
            m(idx).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), loop_model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
