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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# "lm": logits over the vocabulary, tied to the embedding; "token_binary": 2 logits per position;
# "sequence_binary": 2 logits per sequence from the mean-pooled final hidden states.
HEADS = ("lm", "token_binary", "sequence_binary")
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on q and k, via PyTorch's fused SDPA kernel."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.causal = config.causal
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """`attn_mask` (B, 1, 1, T) bool, True where a key may be attended to (None: every key)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cos, sin, attn_mask)  # (B, T, C)
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

    def hidden_states(self, idx: Tensor, pad: Tensor | None = None) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after the last LayerNorm.

        `pad` (B, T) bool marks padding: no position attends to it (a key-padding mask). Every row needs at least
        one real position. Hidden states at padded positions are meaningless.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        seq_len = idx.shape[1]
        if seq_len > self.config.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size={self.config.block_size}")
        attn_mask = None
        if pad is not None:
            if pad.dtype != torch.bool or pad.shape != idx.shape:
                raise ValueError(f"pad must be a bool tensor of shape {tuple(idx.shape)}")
            if self.config.causal:
                raise ValueError("a padding mask is for bidirectional models")
            attn_mask = ~pad[:, None, None, :]  # (B, 1, 1, T): True = may be attended to
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]  # (T, D)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: Tensor, positions: Tensor | None = None, pad: Tensor | None = None) -> Tensor:
        """Logits (B, T, V), or with a bool mask `positions` (B, T) only the selected rows (N, V).

        The selected rows come in row-major order, i.e. the result equals `forward(idx)[positions]`, but the
        head is applied only to the N selected hidden states. V is 2 for a `token_binary` head. A
        `sequence_binary` head returns (B, 2): the head applied to the mean hidden state over the positions that
        are not `pad`.
        """
        h = self.hidden_states(idx, pad)  # (B, T, C)
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
