"""A small pre-LN Transformer for masked discrete diffusion ("unmasking") language models.

The network is bidirectional by default: every position attends to every other, so a masked character is
predicted from context on both sides. `causal=True` turns the same weights into an autoregressive baseline.
Positions enter only through rotary embeddings on queries and keys (RoPE, Su et al. 2021, "RoFormer"), so
attention scores depend on relative offsets and there is no learned absolute position table.

`Transformer.forward` can compute logits only at selected positions, since a masked-diffusion loss only needs
them where tokens are masked. This saves the output head's matmul (n_embd x vocab) and the (B, T, V) logits
tensor at the other positions: little for a character vocabulary, a lot for a subword one.

Besides the language-model head (tied to the embedding), a model can carry a 2-class head for transfer learning
(`ModelConfig.head`): `token_binary` scores every position (e.g. "was this character replaced?"), and
`sequence_binary` scores a whole text from the mean of its final hidden states. Texts of different lengths are
batched with a padding mask that removes padded positions from attention and from the mean, so a text's score
does not depend on what it was batched with.

Block diffusion (Arriola et al. 2025, "Block Diffusion", BD3-LM): with `ModelConfig.diffusion_block = K > 0` the
model is a masked-diffusion model per block of K characters, conditioned on the clean blocks before it. A plain
`forward(x)` then uses the block-causal mask (position i attends to j iff j // K <= i // K); training passes the
2L-long layout [noisy ; clean] with an explicit `attn_mask` and `pos` (see `unmask.likelihood.block`). A `KVCache`
lets sampling feed committed blocks once and reuse their keys and values (`forward(..., cache=, update_cache=)`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import UserError

# "lm": logits over the vocabulary, tied to the embedding; "token_binary": 2 logits per position;
# "sequence_binary": 2 logits per sequence from the mean-pooled final hidden states.
HEADS = ("lm", "token_binary", "sequence_binary")
# "auto": FlexAttention for explicit (T, T) masks of at least FLEX_MIN_LENGTH positions on a CUDA device that
# supports it, SDPA otherwise (`choose_attention`); "sdpa" and "flex" force one path (flex runs eagerly, unfused and
# forward-only off CUDA: for tests).
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
# Shortest sequence "auto" sends to FlexAttention. Its kernels work in 128 x 128 tiles and skip only whole empty
# tiles, so below 4 tiles a side (block diffusion's mask is 3/4 empty at large L) there is little to skip, and
# attention is a small share of the step while the BlockMask and the kernel launch cost the same. A first guess
# from the tile size, not a GPU measurement: `benchmarks/gpu_check.py` times both paths at its block size.
FLEX_MIN_LENGTH = 512
BINARY_HEAD_INIT_STD = 0.002  # the original framework's switch_to_binary_classification (docs/origin.md §1.7)


@dataclass
class ModelConfig:
    """Hyperparameters of `Transformer`; validated on construction."""

    vocab_size: int  # model vocabulary incl. special tokens ([MASK] = last id)
    block_size: int = 256  # longest sequence the RoPE tables cover
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # bias in every Linear and LayerNorm
    causal: bool = False  # False: bidirectional (unmasking); True: autoregressive baseline
    rope_base: float = 10000.0
    head: Literal["lm", "token_binary", "sequence_binary"] = "lm"  # see HEADS
    # 0: not a block-diffusion model. K > 0: block length K of a block-diffusion model (Arriola et al. 2025):
    # forward(x) over a clean sequence uses the block-causal mask. K = 1 is autoregressive-like, K = L is MDLM.
    diffusion_block: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2 != 0:
            # RoPE rotates pairs of channels, so each head needs an even number of them.
            raise ValueError(f"n_embd={self.n_embd} / n_head={self.n_head} = {self.head_dim} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base={self.rope_base} must be greater than 1")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}: expected one of {', '.join(HEADS)}")
        if self.head != "lm" and self.causal:
            raise ValueError("binary heads are for bidirectional models (causal=False)")
        if self.diffusion_block < 0:
            raise ValueError(f"diffusion_block={self.diffusion_block} must be >= 0 (0: not a block-diffusion model)")
        if self.diffusion_block > 0 and self.causal:
            raise ValueError(f"diffusion_block={self.diffusion_block} needs causal=False: blocks are bidirectional")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


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

    The tables are cast to x's dtype first: under bf16/fp16 autocast q and k come out of the Linear in half
    precision, and multiplying them by float32 tables would silently promote them to float32, leaving q, k
    and v in different dtypes for scaled_dot_product_attention.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)  # (..., T, D): (x1, x2) -> (-x2, x1) is a 90 degree turn per pair
    return x * cos + rotated * sin


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


def check_attention_backend(backend: str, device: torch.device, flag: str = "--attention") -> None:
    """Refuse, in one line, a forced flex path for training where FlexAttention cannot train (its backward needs the
    CUDA kernel of compute capability >= 8.0; on the CPU it is forward-only)."""
    if backend == "flex" and not flex_supported(device):
        where = "PyTorch without FlexAttention" if not HAVE_FLEX else f"device {device}"
        raise UserError(
            f"{flag}=flex: FlexAttention trains only on CUDA GPUs of compute capability 8.0 or more, not on {where}; "
            f"use {flag}=auto (or sdpa)"
        )


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
    ) -> Tensor:
        """`attn_mask` (T, S) or (B, 1, T|1, S) bool, True where a key may be attended to (None: every key).

        `is_causal` None means the model's own `causal`. With `cache`, the keys/values of `layer` cached so far are
        prepended (S = cached + T) and, with `update_cache`, the extended ones are stored back. `block_mask`
        (a FlexAttention BlockMask) replaces `attn_mask` on the flex path.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            past = cache.past(layer)
            if past is not None:
                k = torch.cat((past[0], k), dim=2)  # (B, H, S, D)
                v = torch.cat((past[1], v), dim=2)  # (B, H, S, D)
            if update_cache:
                cache.store(layer, k, v)
        if block_mask is not None:
            y = _flex(q, k, v, block_mask)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=self.causal if is_causal is None else is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (Hendrycks & Gimpel 2016) -> C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN residual block (Xiong et al. 2020): normalise each branch's input, not the residual stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None, **attn: Any) -> Tensor:
        """`attn` passes `is_causal`, `block_mask`, `cache`, `layer`, `update_cache` on to `SelfAttention`."""
        x = x + self.attn(self.ln1(x), cos, sin, attn_mask, **attn)  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class Transformer(nn.Module):
    """Token embedding -> n_layer pre-LN blocks -> LayerNorm -> output head (tied LM head, or a binary head)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        if config.head == "lm":
            self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            # Weight tying (Press & Wolf 2017): the head scores a hidden state against every token embedding.
            self.head.weight = self.tok_emb.weight
        else:
            # Untied 2-class head. A bias (unlike the original's) lets a linear probe on frozen features shift
            # its decision threshold; it costs 2 parameters.
            self.head = nn.Linear(config.n_embd, 2, bias=True)

        # Non-persistent: derived from the config, so they stay out of checkpoints.
        cos, sin = rope_cache(config.head_dim, torch.arange(config.block_size), config.rope_base)
        self.rope_cos: Tensor
        self.rope_sin: Tensor
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, D)
        # Which attention kernel explicit masks use (ATTENTION_BACKENDS); not part of the config or checkpoints.
        self.attention_backend: str = "auto"
        self._flex_key: Tensor | None = None  # the bool mask whose BlockMask is `_flex_mask`
        self._flex_mask: Any = None

        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019): scale the init of every projection that writes into the residual
        # stream by 1/sqrt(2 * n_layer), since each block adds two such terms to the stream.
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)
        if config.head != "lm":
            # Small logits at the start: both classes near 50%, as the original's binary head.
            nn.init.normal_(self.head.weight, mean=0.0, std=BINARY_HEAD_INIT_STD)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02) weights, zero biases; LayerNorm keeps PyTorch's (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(
        self,
        idx: Tensor,
        pad: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        pos: Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after the last LayerNorm.

        `pad` (B, T) bool marks padding: no position attends to it (a key-padding mask). Every row needs at least
        one real position. Hidden states at padded positions are meaningless. See `forward` for the other
        arguments.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, seq_len = idx.shape
        cfg = self.config
        mask: Tensor | None = None
        is_causal: bool | None = None  # None: the model's own `causal` (SDPA's fused causal path)
        if cache is not None:
            if attn_mask is not None or pos is not None or pad is not None:
                raise ValueError("attn_mask, pos and pad are for uncached forward passes; the cache fixes positions")
            start = cache.length
            if start + seq_len > cfg.block_size:
                raise ValueError(
                    f"cache.length={start} + {seq_len} new positions exceeds block_size={cfg.block_size}; "
                    "crop the cache and recompute"
                )
            cos, sin = self.rope_cos[start : start + seq_len], self.rope_sin[start : start + seq_len]  # (T, D)
            q_pos = torch.arange(start, start + seq_len, device=idx.device)  # (T,) absolute query positions
            k_pos = torch.arange(start + seq_len, device=idx.device)  # (S,) cached + new key positions
            if cfg.causal:
                mask = k_pos[None, :] <= q_pos[:, None]  # (T, S)
            elif cfg.diffusion_block > 0:
                mask = k_pos[None, :] // cfg.diffusion_block <= q_pos[:, None] // cfg.diffusion_block  # (T, S)
            is_causal = False
        else:
            if update_cache:
                raise ValueError("update_cache=True needs a cache")
            if pos is None:
                if seq_len > cfg.block_size:
                    raise ValueError(f"sequence length {seq_len} exceeds block_size={cfg.block_size}")
                cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]  # (T, D)
            else:
                if pos.shape != (seq_len,) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
                    raise ValueError(
                        f"pos must be an integer tensor of shape ({seq_len},), got {pos.dtype} {tuple(pos.shape)}"
                    )
                # Reading the range back is a host sync and, under torch.compile, a graph break in front of every
                # layer: a compiled model (block diffusion's training layout, whose pos is built in-library)
                # skips the check.
                if (
                    seq_len
                    and not torch.compiler.is_compiling()
                    and (int(pos.min()) < 0 or int(pos.max()) >= cfg.block_size)
                ):
                    raise ValueError(f"pos must lie in [0, block_size={cfg.block_size})")
                cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D)
            if attn_mask is not None:
                if attn_mask.dtype != torch.bool or attn_mask.shape not in (
                    (seq_len, seq_len),
                    (B, 1, seq_len, seq_len),
                ):
                    raise ValueError(
                        f"attn_mask must be a bool tensor of shape ({seq_len}, {seq_len}) or ({B}, 1, {seq_len}, "
                        f"{seq_len}), got {attn_mask.dtype} {tuple(attn_mask.shape)}"
                    )
                mask, is_causal = attn_mask, False  # the caller's pattern replaces the model's own
            elif cfg.diffusion_block > 0:
                mask, is_causal = block_causal_mask(seq_len, cfg.diffusion_block, idx.device), False  # (T, T)
        if pad is not None:
            if pad.dtype != torch.bool or pad.shape != idx.shape:
                raise ValueError(f"pad must be a bool tensor of shape {tuple(idx.shape)}")
            if cfg.causal:
                raise ValueError("a padding mask is for bidirectional models")
            keys = ~pad[:, None, None, :]  # (B, 1, 1, T): True = may be attended to
            mask = keys if mask is None else mask & keys  # (B, 1, T|1, T)
        block_mask = self._flex_block_mask(mask) if cache is None and self._use_flex(mask, idx.device) else None
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(
                x,
                cos,
                sin,
                mask,
                is_causal=is_causal,
                block_mask=block_mask,
                cache=cache,
                layer=layer,
                update_cache=update_cache,
            )  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def _use_flex(self, mask: Tensor | None, device: torch.device) -> bool:
        """Whether this pass attends through FlexAttention (`choose_attention`)."""
        if mask is None:
            return False
        return self.attention_path(mask.shape[-1], device, shared_mask=mask.dim() == 2) == "flex"

    def attention_path(self, seq_len: int, device: torch.device, shared_mask: bool = True) -> str:
        """ "flex" or "sdpa": the kernel a forward pass with an explicit mask over `seq_len` positions takes on
        `device` (e.g. block diffusion's training layout, seq_len = 2L - K), for this model's backend, head size and
        dropout."""
        return choose_attention(
            self.attention_backend,
            flex_capable=flex_supported(device),
            seq_len=seq_len,
            head_dim=self.config.head_dim,
            shared_mask=shared_mask,
            dropout=self.training and self.config.dropout > 0,
        )

    @torch.compiler.disable
    def _flex_block_mask(self, mask: Tensor | None) -> Any:
        """The BlockMask of `mask`, rebuilt only when a different mask tensor comes (masks are read-only). Eager even
        in a compiled model: a cache lookup on the mask's identity, built once per mask."""
        assert mask is not None
        if self._flex_key is not mask:
            self._flex_mask = block_mask_from_bool(mask)
            self._flex_key = mask  # a strong reference, so identity cannot be confused with a freed tensor
        return self._flex_mask

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        pad: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        pos: Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Logits (B, T, V), or with a bool mask `positions` (B, T) only the selected rows (N, V).

        The selected rows come in row-major order, i.e. the result equals `forward(idx)[positions]`, but the
        head is applied only to the N selected hidden states. V is 2 for a `token_binary` head. A
        `sequence_binary` head returns (B, 2): the head applied to the mean hidden state over the positions that
        are not `pad`.

        Without `cache` the attention pattern is the model's own: full (bidirectional), causal, or block-causal
        for `diffusion_block = K > 0` (i attends to j iff j // K <= i // K). `attn_mask` (T, T) or (B, 1, T, T)
        bool (True = may attend, combined with `pad`) replaces it, and `pos` (T,) gives each token's RoPE
        position (default 0..T-1; then T may exceed block_size): the block-diffusion training layout.

        With `cache` (a `KVCache`), the T new tokens sit at positions cache.length .. cache.length + T - 1 and
        attend to every cached position and to the new ones: causally for a causal model, all of them for a
        bidirectional one, block-causally in absolute positions for a block-diffusion model (a chunk within one
        block, e.g. the noisy current block, sees all of itself and the cached blocks; a multi-block prompt fed at
        once gets the training layout). `update_cache=True` appends the new keys/values to the cache.
        cache.length + T must be <= block_size.
        """
        h = self.hidden_states(idx, pad, attn_mask=attn_mask, pos=pos, cache=cache, update_cache=update_cache)
        if self.config.head == "sequence_binary":
            keep = torch.ones_like(idx, dtype=h.dtype) if pad is None else (~pad).to(h.dtype)  # (B, T)
            pooled = (h * keep.unsqueeze(-1)).sum(dim=1) / keep.sum(dim=1, keepdim=True)  # (B, C)
            return self.head(pooled)  # (B, 2)
        if positions is None:
            return self.head(h)  # (B, T, V)
        if positions.dtype != torch.bool or positions.shape != idx.shape:
            raise ValueError(
                f"positions must be a bool tensor of shape {tuple(idx.shape)}, "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        return self.head(h[positions])  # (N, V)

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters; `parameters()` yields the tied embedding/head weight once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two AdamW groups: matrices (Linear, Embedding) decay; biases and LayerNorm gains do not.

        Only trainable parameters are included, each exactly once (`parameters()` de-duplicates the tied
        weight).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training (forward + backward) FLOPs per token, for throughput/MFU reporting.

        PaLM appendix B (Chowdhery et al. 2022): 6N for the matmuls with weights plus 12 * L * T * C for the
        attention scores and weighted sum. N counts the tied embedding once, which stands for the output
        head's matmul (the input lookup costs no FLOPs). The attention term assumes the full T x T map, which
        is exact for bidirectional attention and the usual convention for causal attention.
        """
        T = self.config.block_size if seq_len is None else seq_len
        cfg = self.config
        return 6.0 * self.num_params() + 12.0 * cfg.n_layer * T * cfg.n_embd
