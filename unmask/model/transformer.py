"""The Transformer: `ModelConfig`, the pre-LN blocks, the heads (`Transformer`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from unmask.model.attention import (
    KVCache,
    MaskPart,
    SelfAttention,
    block_causal_mask,
    block_mask_from_bool,
    choose_attention,
    flex_supported,
    rope_cache,
    split_attention_mask,
)
from unmask.model.config import BINARY_HEAD_INIT_STD, ModelConfig


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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        rows: Tensor | None = None,
        **attn: Any,
    ) -> Tensor:
        """(B, T, C), or with `rows` (B, T) bool only the outputs at those positions (N, C), row-major: every
        position still serves as a key and value, but the attention projection, the residual and the MLP run on
        the N selected rows alone. `attn` passes `is_causal`, `block_mask`, `cache`, `layer`, `update_cache` on to
        `SelfAttention`."""
        a = self.attn(self.ln1(x), cos, sin, attn_mask, rows=rows, **attn)  # (B, T, C) or (N, C)
        x = x + a if rows is None else x[rows] + a  # (B, T, C) or (N, C)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token embedding (plus a self-condition input, `ModelConfig.self_conditioning`) -> n_layer pre-LN blocks ->
    LayerNorm -> output head (tied LM head, or a binary head)."""

    self_cond_proj: nn.Linear  # only with `ModelConfig.self_conditioning`

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
        self._split_key: Tensor | None = None  # the bool mask whose attention split is `_split`
        self._split: list[MaskPart] | None = None

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
        if config.self_conditioning:
            # A previous prediction p (B, T, V) enters as its expected token embedding p @ tok_emb (the tied table)
            # through a zero-initialised linear map without bias: a fresh self-conditioned model computes exactly
            # what a plain one does, and a zero input adds exactly nothing. Built last, so the other weights get the
            # same draws as a plain model's of the same seed.
            self.self_cond_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            nn.init.zeros_(self.self_cond_proj.weight)

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
        self_cond: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after the last LayerNorm; with `rows` (B, T) bool only
        those positions' (N, C), row-major, equal to `hidden_states(idx)[rows]` up to float rounding.

        `rows` saves the work no selected output depends on: the last block computes keys and values at every
        position (attention needs them) but its attention projection, MLP and the final LayerNorm only at the N
        selected rows. A masked-diffusion step selects about half the positions, block diffusion's training layout
        under a third (its clean copy is only context), so this saves a tenth of their step on the CPU. Eager and
        without active dropout only; otherwise the selection comes after the last block (under torch.compile a
        data-dependent shape inside the graph would split it; dropout would draw its masks over other shapes).

        `pad` (B, T) bool marks padding: no position attends to it (a key-padding mask). Every row needs at least
        one real position. Hidden states at padded positions are meaningless. See `forward` for the other
        arguments.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, seq_len = idx.shape
        cfg = self.config
        if self_cond is not None:
            if not cfg.self_conditioning:
                raise ValueError("self_cond needs a model built with self_conditioning=True")
            if self_cond.shape != (B, seq_len, cfg.vocab_size) or not self_cond.dtype.is_floating_point:
                raise ValueError(
                    f"self_cond must be a float tensor of shape ({B}, {seq_len}, {cfg.vocab_size}), got "
                    f"{self_cond.dtype} {tuple(self_cond.shape)}"
                )
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
        # A (T, T) mask whose rows see narrow key spans attends in parts (block diffusion's training layout), in
        # eager passes without attention dropout (which would draw its masks over other shapes).
        dropout = self.training and cfg.dropout > 0
        split = None
        if mask is not None and mask.dim() == 2 and cache is None and block_mask is None and not dropout:
            split = None if torch.compiler.is_compiling() else self._mask_split(mask)
        # Select after the blocks (see above) under torch.compile, and with active dropout: dropping out N rows
        # instead of B * T would draw other random masks than the full pass.
        late_rows = rows is not None and (torch.compiler.is_compiling() or dropout)
        last = len(self.blocks) - 1
        x = self.tok_emb(idx)  # (B, T, C)
        if self_cond is not None:
            emb = self.tok_emb.weight  # (V, C)
            x = x + self.self_cond_proj(self_cond.to(emb.dtype) @ emb)  # (B, T, C)
        x = self.drop(x)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(
                x,
                cos,
                sin,
                mask,
                rows if layer == last and not late_rows else None,
                is_causal=is_causal,
                block_mask=block_mask,
                split=split,
                cache=cache,
                layer=layer,
                update_cache=update_cache,
            )  # (B, T, C); the last block (N, C) with rows
        if late_rows:
            x = x[rows]  # (N, C)
        return self.ln_f(x)  # (B, T, C) or (N, C)

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

    def _mask_split(self, mask: Tensor) -> list[MaskPart] | None:
        """`split_attention_mask` of `mask`, recomputed only when a different mask tensor comes (masks are
        read-only, and the training layout's is cached per shape): once per run, not per step."""
        if self._split_key is not mask:
            self._split = split_attention_mask(mask)
            self._split_key = mask  # a strong reference, so identity cannot be confused with a freed tensor
        return self._split

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
        self_cond: Tensor | None = None,
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

        `self_cond` (B, T, V), only for a model with `self_conditioning`: a previous prediction's probabilities over
        the vocabulary at each position (zeros where there is none), added to the token embedding through
        `self_cond_proj`. None is the same as zeros, without the cost. A zero row leaves that position's keys and
        values exactly those of a pass without the input (the exact cached commit of block diffusion relies on it).
        """
        pooled_head = self.config.head == "sequence_binary"
        rows = None if pooled_head else positions
        if rows is not None and (rows.dtype != torch.bool or rows.shape != idx.shape):
            raise ValueError(
                f"positions must be a bool tensor of shape {tuple(idx.shape)}, got {rows.dtype} {tuple(rows.shape)}"
            )
        h = self.hidden_states(
            idx,
            pad,
            attn_mask=attn_mask,
            pos=pos,
            cache=cache,
            update_cache=update_cache,
            self_cond=self_cond,
            rows=rows,
        )  # (B, T, C), or (N, C) with positions
        if pooled_head:
            keep = torch.ones_like(idx, dtype=h.dtype) if pad is None else (~pad).to(h.dtype)  # (B, T)
            pooled = (h * keep.unsqueeze(-1)).sum(dim=1) / keep.sum(dim=1, keepdim=True)  # (B, C)
            return self.head(pooled)  # (B, 2)
        return self.head(h)  # (B, T, V), or (N, V) with positions

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
