"""The model's CPU fast paths compute what the plain forms compute: RoPE as one autograd node (bit for bit, forward
and backward, in the layout attention always saw), the last block run only on the selected rows, and attention under
block diffusion's training mask in two calls over the key spans the rows see."""

from __future__ import annotations

import pytest
import torch

from unmask.likelihood.block import training_attn_mask
from unmask.model import ModelConfig, Transformer, apply_rope, rope_cache
from unmask.model.attention import split_attention_mask

VOCAB = 11


def textbook_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotate-half form as written before the fast path: x cos + (-x2, x1) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_rope_node_is_bit_identical_to_the_textbook_form_forward_and_backward() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 3, 20, 2, 8
    cos, sin = rope_cache(D, torch.arange(T))
    # q and k as the attention layer hands them over: a transposed view of the qkv projection's output.
    qkv = torch.randn(B, T, 3 * H * D, generator=g, requires_grad=True)
    x = qkv[..., : 2 * H * D].view(B, T, 2 * H, D).transpose(1, 2)  # (B, 2H, T, D), strided
    upstream = torch.randn(B, 2 * H, T, D, generator=g)
    fast = apply_rope(x, cos, sin)
    (fast_grad,) = torch.autograd.grad(fast, qkv, upstream)
    slow = textbook_rope(x, cos, sin)
    (slow_grad,) = torch.autograd.grad(slow, qkv, upstream)
    assert torch.equal(fast, slow)
    assert torch.equal(fast_grad, slow_grad)
    # The result lies in memory as the textbook's elementwise result does (attention kernels round by layout).
    assert fast.stride() == slow.stride()


def test_rope_tables_that_require_grad_get_their_gradient() -> None:
    D = 8
    cos, sin = rope_cache(D, torch.arange(5))
    cos.requires_grad_(True)
    x = torch.randn(5, D)
    (grad,) = torch.autograd.grad(apply_rope(x, cos, sin).sum(), cos)
    assert torch.equal(grad, x)  # d(x cos + r sin)/d cos = x


def _model(dropout: float = 0.0, **overrides: object) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=dropout, **overrides)
    return Transformer(config).train()  # type: ignore[arg-type]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (4, 16), generator=g)
    positions = torch.rand(4, 16, generator=g) < 0.4
    return idx, positions


def test_selected_rows_run_the_last_block_on_those_rows_only() -> None:
    model, (idx, positions) = _model(), _batch()
    seen: list[int] = []
    hooks = [block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].numel() // 16)) for block in model.blocks]
    model(idx, positions)
    for hook in hooks:
        hook.remove()
    assert seen == [4 * 16, int(positions.sum())]  # every row in the first block, the N selected in the last


@pytest.mark.parametrize("overrides", [{}, {"causal": True}, {"diffusion_block": 4}])
def test_selected_rows_give_the_full_pass_logits_and_gradients(overrides: dict[str, object]) -> None:
    model, (idx, positions) = _model(**overrides), _batch()
    sparse = model(idx, positions)
    sparse.square().sum().backward()
    sparse_grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    full = model(idx)[positions]
    full.square().sum().backward()
    assert torch.equal(sparse, full)
    for p, expected in zip(model.parameters(), sparse_grads, strict=True):
        # The last block's weight gradients sum over N rows instead of B * T rows with zeros: float rounding only.
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_with_active_dropout_the_rows_are_selected_after_the_full_pass() -> None:
    # Dropout over N rows would draw other masks than over B * T: the stream of a seeded run must not change.
    model, (idx, positions) = _model(dropout=0.2), _batch()
    torch.manual_seed(5)
    sparse = model(idx, positions)
    torch.manual_seed(5)
    full = model(idx)[positions]
    assert torch.equal(sparse, full)


def test_block_diffusion_layout_splits_off_the_clean_rows_from_the_noisy_keys() -> None:
    L, K = 16, 4
    mask = training_attn_mask(L, K, torch.device("cpu"))  # (L + 12, L + 12): [noisy ; clean without its last block]
    parts = split_attention_mask(mask)
    assert parts is not None
    T = mask.shape[0]
    assert [a for a, *_ in parts] + [parts[-1][1]] == [0, parts[0][1], T]  # the rows, cut once
    for a, b, lo, hi, part in parts:
        assert torch.equal(part, mask[a:b, lo:hi])
        outside = mask[a:b].clone()
        outside[:, lo:hi] = False
        assert not outside.any()  # no row of a part sees a key outside its span
    assert sum((b - a) * (hi - lo) for a, b, lo, hi, _ in parts) < 0.8 * T * T
    assert split_attention_mask(torch.ones(8, 8, dtype=torch.bool)) is None  # nothing to save


def test_split_attention_gives_the_single_call_logits() -> None:
    L, K = 16, 4
    model = _model(diffusion_block=K).eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, VOCAB, (3, L + 12), generator=g)
    pos = torch.cat((torch.arange(L), torch.arange(12)))
    mask = training_attn_mask(L, K, torch.device("cpu"))
    calls: list[int] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = counting
        try:
            split = model(idx, attn_mask=mask, pos=pos)
            n_split = len(calls)
            single = model(idx, attn_mask=mask.expand(3, 1, *mask.shape), pos=pos)  # a per-row mask: one call
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
    assert n_split == 2 * len(model.blocks) and len(calls) - n_split == len(model.blocks)
    assert torch.allclose(split, single, atol=1e-5)
