"""The architecture of a model: `ModelConfig` and the heads it can carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "auto": FlexAttention for explicit (T, T) masks of at least FLEX_MIN_LENGTH positions on a CUDA device that
# supports it, SDPA otherwise (`choose_attention`); "sdpa" and "flex" force one path (flex runs eagerly, unfused and
# forward-only off CUDA: for tests).
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
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
    # 0: not a block-diffusion model. K > 0: block length K of a block-diffusion model (Arriola et al. 2025):
    # forward(x) over a clean sequence uses the block-causal mask. K = 1 is autoregressive-like, K = L is MDLM.
    diffusion_block: int = 0
    # Self-conditioning (Chen et al. 2022, "Analog Bits"; here for masked diffusion): forward takes an optional
    # `self_cond` (B, T, V), a previous prediction's probabilities over the vocabulary, mapped into the embedding
    # space and added to the token embedding. False: no such input and no extra parameters.
    self_conditioning: bool = False

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
        if self.self_conditioning and (self.causal or self.head != "lm"):
            raise ValueError("self_conditioning is for bidirectional language models (causal=False, head='lm')")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
