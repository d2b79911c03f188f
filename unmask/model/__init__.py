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

from unmask.model.attention import (
    FLEX_MIN_LENGTH,
    HAVE_FLEX,
    KVCache,
    apply_rope,
    block_causal_mask,
    block_mask_from_bool,
    choose_attention,
    flex_supported,
    rope_cache,
)
from unmask.model.config import ATTENTION_BACKENDS, BINARY_HEAD_INIT_STD, HEADS, ModelConfig
from unmask.model.transformer import Transformer

__all__ = [
    "ATTENTION_BACKENDS",
    "BINARY_HEAD_INIT_STD",
    "FLEX_MIN_LENGTH",
    "HAVE_FLEX",
    "HEADS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "apply_rope",
    "block_causal_mask",
    "block_mask_from_bool",
    "choose_attention",
    "flex_supported",
    "rope_cache",
]
