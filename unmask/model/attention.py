"""Attention of the Transformer: RoPE, SDPA or FlexAttention (chosen per pass by `choose_attention`), the
block-causal mask of block diffusion and the exact KV cache of sampling."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.model.config import ATTENTION_BACKENDS, ModelConfig

# Shortest sequence "auto" sends to FlexAttention. Its kernels work in 128 x 128 tiles and skip only whole empty
# tiles, so below 4 tiles a side (block diffusion's mask is 3/4 empty at large L) there is little to skip, and
# attention is a small share of the step while the BlockMask and the kernel launch cost the same. A first guess
# from the tile size, not a GPU measurement: `benchmarks/gpu_check.py` times both paths at its block size.
FLEX_MIN_LENGTH = 512


def rope_cache(head_dim: int, positions: Tensor, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (T, head_dim) in float32, for the rotate-half form of RoPE.

    Su et al. 2021, eq. 15: channel pair i rotates by angle m * theta_i at position m, with
    theta_i = base^(-2i / head_dim). In the rotate-half layout pair i is (x[i], x[i + head_dim/2]), so the
    frequencies are repeated twice along the channel axis.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, D) by the per-position angles in cos/sin (T, D).

    With x = (x1, x2) the two halves of the channels (pair i is (x1[i], x2[i])) the result is
    (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), the rotate-half form x cos + (-x2, x1) sin written out half by half.
    The tables are cast to x's dtype first: under bf16/fp16 autocast q and k come out of the Linear in half
    precision, and multiplying them by float32 tables would silently promote them to float32, leaving q, k
    and v in different dtypes for scaled_dot_product_attention.

    One autograd node whose backward is the inverse rotation, instead of the slices, negation, concatenation,
    products and sum of the textbook form and their backward (zero-filled slice gradients added up): the same
    numbers, bit for bit, at about half the cost, which at nanoGPT's CPU shape was ~7% of a training step.
    Under torch.compile, and for tables that require a gradient (the node gives none to them), the textbook form:
    the compiler fuses it into one kernel anyway (and does not trace `out=` into strided views).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
    return _Rope.apply(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """(x1 cos1 - x2 sin1, x2 cos2 + x1 sin2) into a new contiguous tensor, or with `inverse` the transpose map
    (x1 cos1 + x2 sin2, x2 cos2 - x1 sin1) that backpropagates it. Every element is one product or one
    difference/sum of two products, rounded as the textbook form rounds them ((-a) b = -(a b) and c + (-d) = c - d
    exactly in IEEE arithmetic)."""
    half = x.shape[-1] // 2
    out = _empty_in_layout(x, torch.broadcast_shapes(x.shape, cos.shape))
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if inverse:
        o1.add_(x2 * s2)
        o2.sub_(x1 * s1)
    else:
        o1.sub_(x2 * s1)
        o2.add_(x1 * s2)
    return out


def _empty_in_layout(x: Tensor, shape: torch.Size) -> Tensor:
    """An empty tensor of `shape` whose dimensions lie in memory in the order of x's strides, as an elementwise
    op on x lays out its result: q and k then reach attention in the layout they always had (a transposed view of
    the projection), whose kernels round the same as before. Contiguous when x is broadcast."""
    if shape != x.shape:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)  # outermost first; ties keep order
    physical = torch.empty([shape[d] for d in order], dtype=x.dtype, device=x.device)
    return physical.permute([order.index(d) for d in range(x.dim())])


class _Rope(torch.autograd.Function):
    """RoPE as one autograd node (`apply_rope`): the gradient of a rotation is the inverse rotation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        g = _rotate(grad, cos, sin, inverse=True)
        if g.shape != ctx.x_shape:  # x was broadcast against the tables: sum the gradient back to x's shape
            g = g.sum_to_size(ctx.x_shape)
        return g, None, None


try:  # FlexAttention (PyTorch >= 2.5): block-sparse attention from a mask function.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAVE_FLEX = True
except ImportError:  # pragma: no cover - older PyTorch
    HAVE_FLEX = False

_compiled_flex: Callable[..., Tensor] | None = None


def flex_supported(device: torch.device) -> bool:
    """Whether the fused FlexAttention kernel can run on `device`: a CUDA GPU of compute capability 8.0 or more.

    FlexAttention's Triton kernels target Ampere and newer; elsewhere (and on CPU, where it runs unfused and
    eagerly) SDPA with a boolean mask is the faster path.
    """
    return HAVE_FLEX and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def choose_attention(
    backend: str, *, flex_capable: bool, seq_len: int, head_dim: int, shared_mask: bool, dropout: bool
) -> str:
    """The attention path, "flex" or "sdpa", of one forward pass that has an explicit attention mask.

    `backend` is the model's `attention_backend` (ATTENTION_BACKENDS); `flex_capable` whether the fused FlexAttention
    kernel runs on the device (`flex_supported`); `shared_mask` whether the mask is one (T, T) pattern for every row
    (the only kind turned into a BlockMask); `dropout` whether attention dropout is active (flex has none). Only a
    shared mask without dropout can take the flex path; then "sdpa" and "flex" force the path, and "auto" takes flex
    on a capable device for sequences of at least FLEX_MIN_LENGTH and head sizes the fused kernel supports (powers
    of two from 16), SDPA otherwise.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r}: expected one of {ATTENTION_BACKENDS}")
    if backend == "sdpa" or not shared_mask or dropout:
        return "sdpa"
    if backend == "flex":
        return "flex"
    head_ok = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return "flex" if flex_capable and head_ok and seq_len >= FLEX_MIN_LENGTH else "sdpa"


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    """flex_attention, compiled once on CUDA (the fused kernel); eager elsewhere (the unfused reference path).

    Inside a model that torch.compile is tracing on CUDA, the call goes into the model's graph as it is (inductor
    fuses it there), rather than into a second compilation started mid-trace. On the CPU the call stays out of the
    graph (the warnings context breaks it) and runs eagerly: traced into a compiled model, inductor's CPU flex
    template gave logits 0.06 off the SDPA path (torch 2.13), where the eager call matches it to 1e-7."""
    global _compiled_flex
    if q.device.type == "cuda" and torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type != "cuda":
        with warnings.catch_warnings():
            # Eager flex_attention warns that it is unfused: known and intended off CUDA.
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def block_mask_from_bool(mask: Tensor) -> Any:
    """A FlexAttention BlockMask equal to a (T, S) bool mask (True = may attend); fully masked tiles are skipped."""
    if not HAVE_FLEX:
        raise RuntimeError("FlexAttention needs PyTorch >= 2.5")
    dense = mask.contiguous()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[q_idx, kv_idx]

    return create_block_mask(mask_mod, None, None, mask.shape[0], mask.shape[1], device=mask.device)


@functools.lru_cache(maxsize=32)
def block_causal_mask(T: int, K: int, device: torch.device) -> Tensor:
    """(T, T) bool, True = may attend: position i attends to j iff j // K <= i // K (blocks of K, Arriola et al.
    2025). Cached per (T, K, device) and shared: treat it as read-only."""
    block = torch.arange(T, device=device) // K  # (T,)
    return block[None, :] <= block[:, None]  # (T, T)


# A split of the query rows is taken when it leaves at most this share of the single call's query x key pairs.
SPLIT_MAX_SHARE = 0.85
# (first row, end row, first key, end key, the mask of those rows and keys): one attention call of a split.
MaskPart = tuple[int, int, int, int, Tensor]


def split_attention_mask(mask: Tensor) -> list[MaskPart] | None:
    """Two attention calls instead of one for a (T, T) bool mask whose rows see narrow spans of keys: the query
    rows cut in two where that is cheapest, each part attending to the span of keys its rows may see; None when
    that saves less than 1 - SPLIT_MAX_SHARE of the query x key pairs.

    Block diffusion's training layout [noisy ; clean] is the case: no clean row attends to a noisy key, so the
    clean rows need only the clean keys (25% fewer pairs at L = 64, K = 4, where attention is a fifth of a CPU
    step). Keys outside a part's span are masked for all its rows, so each row attends to the same keys with the
    same weights; only the kernel's blocking over keys, hence float rounding, differs from the single call."""
    m = mask.detach().to("cpu", torch.bool)
    T = m.shape[0]
    if m.dim() != 2 or m.shape[1] != T or T < 2:
        return None
    cols = torch.arange(T)
    first = torch.where(m, cols, T).min(dim=1).values  # (T,) first key each row sees (T: none)
    last = torch.where(m, cols, -1).max(dim=1).values  # (T,) last key each row sees (-1: none)
    lo_pre, hi_pre = first.cummin(0).values, last.cummax(0).values + 1  # spans of rows 0..r
    lo_suf = first.flip(0).cummin(0).values.flip(0)  # spans of rows r..T-1
    hi_suf = last.flip(0).cummax(0).values.flip(0) + 1
    p = torch.arange(1, T)  # first row of the second part
    cost = p * (hi_pre[p - 1] - lo_pre[p - 1]).clamp(min=0) + (T - p) * (hi_suf[p] - lo_suf[p]).clamp(min=0)
    best = int(cost.argmin())
    if float(cost[best]) > SPLIT_MAX_SHARE * T * T:
        return None
    P = best + 1
    parts = []
    for a, b, lo, hi in ((0, P, int(lo_pre[P - 1]), int(hi_pre[P - 1])), (P, T, int(lo_suf[P]), int(hi_suf[P]))):
        if hi <= lo:  # rows that see no key at all: nothing to split off
            return None
        parts.append((a, b, lo, hi, mask[a:b, lo:hi].contiguous()))
    return parts


class KVCache:
    """Keys/values of the positions fed so far, per layer, each (B, H, S, D); S = self.length.

    Keys are stored after RoPE, i.e. rotated by the angles of their absolute positions 0..S-1, so new tokens fed
    at positions S, S+1, ... score against them with the right relative offsets.
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []  # per layer (B, H, S, D)
        self.values: list[Tensor] = []  # per layer (B, H, S, D)

    @property
    def length(self) -> int:
        """Positions cached (0 when empty)."""
        return self.keys[0].shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length {length} must be in [0, {self.length}]")
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def past(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The cached (keys, values) of `layer`, or None when nothing is cached yet."""
        if layer < len(self.keys) and self.keys[layer].shape[2] > 0:
            return self.keys[layer], self.values[layer]
        return None

    def store(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Set `layer`'s cache to keys/values (B, H, S', D) covering positions 0..S'-1."""
        if layer < len(self.keys):
            self.keys[layer], self.values[layer] = keys, values
        elif layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            raise ValueError(f"layer {layer} stored before layer {len(self.keys)}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on q and k, via PyTorch's fused SDPA kernel (or FlexAttention)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        *,
        is_causal: bool | None = None,
        block_mask: Any = None,
        cache: KVCache | None = None,
        layer: int = 0,
        update_cache: bool = False,
        rows: Tensor | None = None,
        split: list[MaskPart] | None = None,
    ) -> Tensor:
        """(B, T, C), or with `rows` (B, T) bool the outputs at those positions only (N, C, row-major; the output
        projection runs on those alone). `attn_mask` (T, S) or (B, 1, T|1, S) bool, True where a key may be
        attended to (None: every key); `split` (`split_attention_mask` of a (T, T) attn_mask, no dropout) computes
        it as one attention call per part of the query rows.

        `is_causal` None means the model's own `causal`. With `cache`, the keys/values of `layer` cached so far are
        prepended (S = cached + T) and, with `update_cache`, the extended ones are stored back. `block_mask`
        (a FlexAttention BlockMask) replaces `attn_mask` on the flex path.
        """
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        qk, v = self.qkv(x).split((2 * C, C), dim=-1)  # (B, T, 2C), (B, T, C)
        # q and k rotate together: one RoPE pass over the 2H heads of both.
        q, k = apply_rope(qk.view(B, T, 2 * H, D).transpose(1, 2), cos, sin).split(H, dim=1)  # each (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            past = cache.past(layer)
            if past is not None:
                k = torch.cat((past[0], k), dim=2)  # (B, H, S, D)
                v = torch.cat((past[1], v), dim=2)  # (B, H, S, D)
            if update_cache:
                cache.store(layer, k, v)
        if block_mask is not None:
            y = _flex(q, k, v, block_mask)  # (B, H, T, D)
        elif split is not None:
            y = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=part)
                    for a, b, lo, hi, part in split
                ],
                dim=2,
            )  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=self.causal if is_causal is None else is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, H, T, D)
        y = y.transpose(1, 2)  # (B, T, H, D)
        y = y.contiguous().view(B, T, C) if rows is None else y[rows].view(-1, C)  # (B, T, C) or (N, C)
        return self.resid_drop(self.proj(y))
