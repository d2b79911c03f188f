"""Tests for unmask.model: shapes, attention direction, RoPE, tying, init, optimizer groups, learning, KV cache,
block-causal masks, explicit masks and positions, the FlexAttention path."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from unmask.model import HAVE_FLEX, KVCache, ModelConfig, Transformer, apply_rope, block_causal_mask, rope_cache

VOCAB = 11  # 10 characters + [MASK]
MASK_ID = VOCAB - 1


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add overhead, and on a busy 2-core machine spinning
    # worker threads made the training loop below about 30x slower (15 s instead of 0.5 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides: object) -> ModelConfig:
    kwargs: dict[str, object] = dict(vocab_size=VOCAB, block_size=12, n_layer=2, n_head=2, n_embd=16)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def random_tokens(B: int = 3, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


def test_full_logits_shape() -> None:
    model = tiny_model()
    idx = random_tokens(3, 12)
    assert model(idx).shape == (3, 12, VOCAB)
    assert model.hidden_states(idx).shape == (3, 12, 16)
    assert model(idx[:, :5]).shape == (3, 5, VOCAB)  # shorter than block_size is fine


def test_positions_logits_equal_gathered_full_logits() -> None:
    model = tiny_model()
    idx = random_tokens(3, 12)
    positions = torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) < 0.3
    positions[0, 0] = True
    sparse = model(idx, positions)
    assert sparse.shape == (int(positions.sum()), VOCAB)
    assert torch.allclose(sparse, model(idx)[positions], atol=1e-6)


def test_positions_must_be_bool_of_matching_shape() -> None:
    model = tiny_model()
    idx = random_tokens(2, 8)
    with pytest.raises(ValueError, match="positions"):
        model(idx, torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        model(idx, torch.ones(2, 7, dtype=torch.bool))


def _logit_change_per_position(model: Transformer, j: int) -> torch.Tensor:
    idx = random_tokens(1, 12)
    changed = idx.clone()
    changed[0, j] = (changed[0, j] + 1) % VOCAB
    with torch.no_grad():
        return (model(idx) - model(changed)).abs().amax(dim=-1)[0]  # (T,)


def test_bidirectional_attention_sees_the_future() -> None:
    diff = _logit_change_per_position(tiny_model(), j=7)
    assert (diff[:7] > 1e-6).all()


def test_causal_attention_ignores_the_future() -> None:
    diff = _logit_change_per_position(tiny_model(causal=True), j=7)
    assert (diff[:7] == 0).all()
    assert (diff[7:] > 1e-6).all()


def test_rope_scores_depend_only_on_relative_offset() -> None:
    D = 8
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cos, sin = rope_cache(D, torch.arange(64), base=10000.0)
    rq = apply_rope(q.expand(64, D), cos, sin)  # (64, D): q placed at every position
    rk = apply_rope(k.expand(64, D), cos, sin)  # (64, D)
    # Angles up to 63 rad carry float32 rounding of about 63 * 6e-8, hence the tolerance.
    for m, n in [(5, 2), (9, 9), (3, 20)]:
        reference = rq[m] @ rk[n]
        for shift in (1, 7, 40):
            assert torch.allclose(rq[m + shift] @ rk[n + shift], reference, atol=1e-4, rtol=1e-4)
    # ... yet it does depend on the offset, and the rotation preserves norms.
    assert (rq[5] @ rk[2] - rq[5] @ rk[3]).abs() > 1e-2
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(64), atol=1e-5)


def test_model_uses_relative_positions() -> None:
    # Identical tokens cannot show this: their values are identical, so any attention pattern gives the same
    # output everywhere. Instead: without positions, bidirectional attention is permutation-equivariant,
    # model(idx[:, perm]) == model(idx)[:, perm]; RoPE must break that.
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.mul_(20.0)  # sharpen attention well past the near-uniform pattern at init
    idx = random_tokens(1, 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))

    def equivariance_gap() -> float:
        with torch.no_grad():
            return (model(idx[:, perm]) - model(idx)[:, perm]).abs().max().item()

    assert equivariance_gap() > 1e-2
    model.rope_cos.fill_(1.0)  # control: identity rotation removes all position information
    model.rope_sin.zero_()
    assert equivariance_gap() < 1e-5


def test_dropout_only_in_training() -> None:
    model = tiny_model(dropout=0.5)
    idx = random_tokens(2, 12)
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_rope_frequencies_follow_the_paper() -> None:
    D, base = 8, 100.0
    cos, sin = rope_cache(D, torch.tensor([0, 1, 3]), base=base)
    assert cos.dtype == sin.dtype == torch.float32
    theta = base ** (-torch.arange(0, D, 2) / D)  # Su et al. 2021: theta_i = base^(-2i/d)
    assert torch.allclose(sin[2, : D // 2], torch.sin(3 * theta), atol=1e-6)
    assert torch.allclose(sin[2, D // 2 :], torch.sin(3 * theta), atol=1e-6)
    assert torch.equal(cos[0], torch.ones(D))


def test_autocast_bf16_forward_is_dtype_safe() -> None:
    model = tiny_model()
    idx = random_tokens(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_weights_are_tied_and_counted_once() -> None:
    model = tiny_model()
    assert model.head.weight is model.tok_emb.weight
    C, V, L = 16, VOCAB, 2
    per_block = 2 * C + (3 * C * C + C * C) + (4 * C * C + 4 * C * C)  # 2 LN gains, attention, MLP
    assert model.num_params() == V * C + L * per_block + C
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_state_dict_has_no_rope_buffers() -> None:
    model = tiny_model()
    assert not any("rope" in key for key in model.state_dict())
    clone = Transformer(tiny_config())
    clone.load_state_dict(model.state_dict())  # strict: the buffers are not expected either


def test_init_statistics() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, block_size=16, n_layer=4, n_head=4, n_embd=128, bias=True)
    model = Transformer(config)
    resid_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif p.dim() >= 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif "ln" in name and name.endswith("weight"):
            assert (p == 1).all(), name
        else:
            assert (p == 0).all(), name  # Linear and LayerNorm biases


def test_optimizer_groups() -> None:
    model = tiny_model(bias=True)
    model.ln_f.weight.requires_grad_(False)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # type: ignore[union-attr]
    decay_group, no_decay_group = model.optimizer_groups(weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    decay, no_decay = decay_group["params"], no_decay_group["params"]
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() < 2 for p in no_decay)
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids))
    assert id(model.ln_f.weight) not in ids
    assert id(model.blocks[0].attn.qkv.weight) not in ids  # type: ignore[union-attr]
    assert sum(p.numel() for p in decay + no_decay) == model.num_params(trainable_only=True)
    assert model.num_params(trainable_only=True) < model.num_params()
    torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)  # accepted as-is


def test_flops_per_token() -> None:
    model = tiny_model()
    expected = 6 * model.num_params() + 12 * 2 * 12 * 16
    assert model.flops_per_token() == expected
    assert model.flops_per_token(seq_len=6) < expected


def test_sequence_longer_than_block_size_is_rejected() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"13.*block_size=12"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 130, "n_head": 4}, "n_embd=130 must be divisible by n_head=4"),
        ({"n_embd": 12, "n_head": 4}, "n_embd=12"),  # head_dim 3 is odd: RoPE needs pairs
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"block_size": -1}, "block_size=-1"),
        ({"n_layer": 0}, "n_layer=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_same_seed_gives_same_init() -> None:
    a, b, c = tiny_model(seed=5), tiny_model(seed=5), tiny_model(seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_tiny_model_overfits_one_masked_batch() -> None:
    # Each row counts up mod 10 from a random start, so a masked character is recoverable only from its
    # neighbours at known relative offsets: this exercises attention and RoPE, not just the embedding.
    model = tiny_model(seed=0, n_embd=32).train()
    g = torch.Generator().manual_seed(4)
    targets = (torch.randint(0, MASK_ID, (8, 1), generator=g) + torch.arange(12)) % MASK_ID  # (8, 12)
    masked = torch.rand(8, 12, generator=g) < 0.3
    inputs = targets.masked_fill(masked, MASK_ID)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(model(inputs, masked), targets[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # small init: near-uniform predictions
    assert losses[-1] < 0.1 * losses[0]


def reference_hidden_states(model: Transformer, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass as it was before the KV-cache API, written out from the modules' weights."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    mask = None if pad is None else ~pad[:, None, None, :]
    x = model.tok_emb(idx)
    for block in model.blocks:
        attn = block.attn  # type: ignore[union-attr]
        h = block.ln1(x)  # type: ignore[operator]
        B, _, C = h.shape
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in attn.qkv(h).split(C, dim=-1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=attn.causal)
        x = x + attn.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        x = x + block.mlp(block.ln2(x))  # type: ignore[operator]
    return model.ln_f(x)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_without_new_arguments_is_bit_identical_to_the_reference(causal: bool) -> None:
    model = tiny_model(causal=causal)
    idx = random_tokens(3, 12)
    with torch.no_grad():
        assert torch.equal(model(idx), model.head(reference_hidden_states(model, idx)))
        if not causal:
            pad = torch.zeros(3, 12, dtype=torch.bool)
            pad[0, 7:] = True
            assert torch.equal(model.hidden_states(idx, pad), reference_hidden_states(model, idx, pad))


def test_old_model_config_without_diffusion_block_loads_with_the_default() -> None:
    fields = dataclasses.asdict(tiny_config())
    del fields["diffusion_block"]  # a checkpoint written before the field existed
    assert ModelConfig(**fields).diffusion_block == 0
    with pytest.raises(ValueError, match="diffusion_block=4 needs causal=False"):
        tiny_config(diffusion_block=4, causal=True)
    with pytest.raises(ValueError, match="diffusion_block=-1"):
        tiny_config(diffusion_block=-1)


def test_block_causal_mask_entries() -> None:
    mask = block_causal_mask(5, 2, torch.device("cpu"))
    expected = torch.tensor([[j // 2 <= i // 2 for j in range(5)] for i in range(5)])
    assert torch.equal(mask, expected)


def test_block_diffusion_model_forward_is_block_causal() -> None:
    model = tiny_model(diffusion_block=4)
    diff = _logit_change_per_position(model, j=5)  # block 1 = positions 4..7
    assert (diff[:4] == 0).all()  # block 0 never sees block 1
    assert (diff[4:] > 1e-6).all()  # block 1 sees all of itself (both directions), block 2 sees block 1


def _incremental_logits(model: Transformer, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = KVCache()
    pieces, start = [], 0
    with torch.no_grad():
        for size in chunks:
            pieces.append(model(idx[:, start : start + size], cache=cache, update_cache=True))
            start += size
            assert cache.length == start
    return torch.cat(pieces, dim=1)


def test_causal_cache_equals_uncached_logits() -> None:
    model = tiny_model(causal=True)
    idx = random_tokens(3, 12)
    with torch.no_grad():
        full = model(idx)
    for chunks in ([12], [1] * 12, [5, 1, 4, 2]):
        assert torch.allclose(_incremental_logits(model, idx, chunks), full, atol=1e-5), chunks


def test_block_diffusion_cache_equals_uncached_logits() -> None:
    K = 4
    model = tiny_model(diffusion_block=K)
    idx = random_tokens(3, 12)
    with torch.no_grad():
        full = model(idx)  # block-causal over the clean sequence
    # Block by block (the sampler's use), and a two-block prefill followed by one block.
    for chunks in ([K, K, K], [2 * K, K]):
        assert torch.allclose(_incremental_logits(model, idx, chunks), full, atol=1e-5), chunks
    # A noisy block fed without update_cache attends to the cached clean blocks and to all of itself, which is the
    # uncached model on [clean prefix ; noisy block]; the cache is left as it was.
    noisy = idx.clone()
    noisy[:, 8:11] = MASK_ID
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :8], cache=cache, update_cache=True)
        cached = model(noisy[:, 8:], cache=cache)
        assert cache.length == 8
        assert torch.allclose(cached, model(noisy)[:, 8:], atol=1e-5)


def test_bidirectional_cache_attends_to_all_new_and_cached_positions() -> None:
    model = tiny_model()
    idx = random_tokens(2, 12)
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :7], cache=cache, update_cache=True)
        tail = model(idx[:, 7:], cache=cache)
        # The new tokens see positions 0..11; the cached ones were computed without seeing the tail.
        mask = torch.ones(12, 12, dtype=torch.bool)
        mask[:7, 7:] = False
        assert torch.allclose(tail, model(idx, attn_mask=mask)[:, 7:], atol=1e-5)


def test_cache_crop_then_refeed() -> None:
    model = tiny_model(causal=True)
    idx = random_tokens(2, 12)
    other = random_tokens(2, 12, seed=9)
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :6], cache=cache, update_cache=True)
        model(other[:, 6:10], cache=cache, update_cache=True)  # a branch to throw away
        cache.crop(6)
        assert cache.length == 6
        again = model(idx[:, 6:], cache=cache, update_cache=True)
        assert torch.allclose(again, model(idx)[:, 6:], atol=1e-5)
    with pytest.raises(ValueError, match="crop length 13"):
        cache.crop(13)


def test_cache_argument_errors() -> None:
    model = tiny_model(causal=True)
    idx = random_tokens(1, 12)
    cache = KVCache()
    with torch.no_grad():
        model(idx[:, :10], cache=cache, update_cache=True)
        with pytest.raises(ValueError, match=r"cache.length=10 \+ 3 new positions exceeds block_size=12"):
            model(idx[:, :3], cache=cache)
        with pytest.raises(ValueError, match="update_cache=True needs a cache"):
            model(idx, update_cache=True)
        with pytest.raises(ValueError, match="uncached"):
            model(idx[:, :2], cache=cache, pos=torch.arange(2))
        with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
            model(idx, attn_mask=torch.ones(12, 11, dtype=torch.bool))
        with pytest.raises(ValueError, match="pos must lie in"):
            model(idx, pos=torch.arange(12) + 1)


def test_attn_mask_and_pos_run_two_copies_in_one_pass() -> None:
    # [x ; x] with a block-diagonal mask and both copies at positions 0..T-1 must give each copy the logits of
    # model(x): the layout block diffusion trains with, here with a sequence twice block_size long.
    model = tiny_model(diffusion_block=4)
    idx = random_tokens(2, 12)
    T = 12
    inner = block_causal_mask(T, 4, torch.device("cpu"))
    mask = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    mask[:T, :T] = inner
    mask[T:, T:] = inner
    with torch.no_grad():
        both = model(torch.cat((idx, idx), dim=1), attn_mask=mask, pos=torch.arange(T).repeat(2))
        single = model(idx)
    assert torch.allclose(both[:, :T], single, atol=1e-5)
    assert torch.allclose(both[:, T:], single, atol=1e-5)


@pytest.mark.skipif(not HAVE_FLEX, reason="FlexAttention needs PyTorch >= 2.5")
def test_flex_attention_path_equals_sdpa_on_cpu() -> None:
    # Off CUDA flex_attention runs eagerly (unfused) and, in torch 2.13, forward only ("does not support backward
    # on CPU"): this checks that the BlockMask built from the boolean mask gives the logits and loss of SDPA.
    model = tiny_model(diffusion_block=4)
    idx = random_tokens(2, 12)
    T = 12
    mask = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    mask[:T, :T] = block_causal_mask(T, 4, torch.device("cpu"))
    mask[T:, :T] = torch.rand(T, T, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[T:, T:] = torch.eye(T, dtype=torch.bool)
    targets = torch.cat((idx, idx), dim=1)
    results = []
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = model(targets, attn_mask=mask, pos=torch.arange(T).repeat(2))
        results.append((logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())))
    assert model._flex_key is mask  # the flex path really ran (and cached the BlockMask of this mask)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_attn_mask_is_combined_with_pad() -> None:
    model = tiny_model()
    idx = random_tokens(2, 12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    everything = torch.ones(12, 12, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model(idx, pad=pad, attn_mask=everything), model(idx, pad=pad), atol=1e-6)
        # and the explicit mask still applies: position 0 seeing only itself is not the padded-only answer
        only_self = torch.eye(12, dtype=torch.bool)
        assert not torch.allclose(model(idx, pad=pad, attn_mask=only_self), model(idx, pad=pad), atol=1e-3)
