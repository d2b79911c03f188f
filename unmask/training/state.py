"""What a training run is built from and what its checkpoints restore: the model and optimizer for a config, the
architecture check of a resume, each rank's random streams (global, data, mask, objective), gathered into a
checkpoint and restored from it, and the all-ranks decision to skip a non-finite step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.config.train_config import ARCHITECTURE_FLAGS, TrainConfig, differing_fields
from unmask.errors import UserError
from unmask.model import ModelConfig, Transformer
from unmask.runtime import Runtime, check_attention_backend


def build_model(
    cfg: TrainConfig, vocab_size: int, model_fields: dict[str, Any], device: torch.device
) -> tuple[ModelConfig, Transformer]:
    """The model for a vocabulary, the config's architecture and the objective's fields (causal attention, a
    binary head). Model init draws from the global RNG, seeded identically on every rank (DDP also broadcasts)."""
    torch.manual_seed(cfg.seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        bias=cfg.bias,
        **model_fields,
    )
    check_attention_backend(cfg.attention, device)
    model = Transformer(config).to(device)
    model.attention_backend = cfg.attention
    return config, model


# Device types whose AdamW takes the fused kernel (torch >= 2.4 has it on the CPU too).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(
    cfg: TrainConfig, model: Transformer, rt: Runtime
) -> tuple[torch.optim.AdamW, torch.amp.GradScaler]:
    """AdamW over the trainable parameters, and the GradScaler (enabled for float16 only).

    The fused kernel on CUDA and on the CPU: on the CPU it is several times faster than the per-tensor loop (about
    2 ms of a 60 ms step at nanoGPT's CPU shape, see BENCHMARKS.md) and matches it to float rounding."""
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        fused=rt.device.type in FUSED_ADAMW_DEVICES,
    )
    return optimizer, scaler


def check_architecture(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run must keep the checkpoint's architecture; list every differing field."""
    # Self-conditioning changes the parameters like the architecture flags do; model configs written before the
    # field existed are plain models.
    diffs = differing_fields(cfg, {"self_conditioning": False, **saved}, (*ARCHITECTURE_FLAGS, "self_conditioning"))
    if diffs:
        raise UserError(f"{path}: architecture differs from the flags ({'; '.join(diffs)})")


def rank_rng_state(
    device: torch.device, data_gen: torch.Generator, mask_gen: torch.Generator, extra: dict[str, Any]
) -> dict[str, Any]:
    """This rank's random streams: the global RNG (init, dropout), data, mask, and what the objective keeps."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": data_gen.get_state(),
        "mask": mask_gen.get_state(),
        **extra,
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def gather_rank_states(rt: Runtime, own: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's states, indexed by rank (each rank draws its own data and masks)."""
    if not rt.ddp:
        return [own]
    gathered: list[Any] = [None] * rt.world_size
    torch.distributed.all_gather_object(gathered, own)
    return gathered


def own_rank_state(ckpt: dict[str, Any], rt: Runtime, path: Path) -> dict[str, Any]:
    """This rank's states in a checkpoint; a resume on another number of processes is refused in one line."""
    if len(ckpt["rng"]) != rt.world_size:
        raise UserError(
            f"{path}: saved by {len(ckpt['rng'])} process(es), resumed with {rt.world_size}; "
            f"resume with the same number of processes to continue the same data streams"
        )
    state: dict[str, Any] = ckpt["rng"][rt.rank]
    return state


def restore_rng_state(
    rng: dict[str, Any], device: torch.device, data_gen: torch.Generator, mask_gen: torch.Generator
) -> None:
    torch.set_rng_state(rng["torch"])
    data_gen.set_state(rng["data"])
    mask_gen.set_state(rng["mask"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool, rt: Runtime) -> bool:
    """Whether to take the optimizer step: the loss and the gradient norm are finite on every rank.

    The answer is all-reduced, so all ranks skip together: a NaN on one rank already reached the others' gradients
    through DDP's all-reduce, and ranks that stepped on them would diverge silently (torchtitan checks loss and
    grad norm the same way). With float16 (`scaled`) an infinite gradient is an overflow, which the GradScaler
    handles by skipping the step and lowering the scale; only the loss counts then.
    """
    bad = ~torch.isfinite(loss.detach())
    if not scaled:
        bad = bad | ~torch.isfinite(grad_norm)
    flag = bad.to(torch.float32).reshape(1)
    return float(rt.all_reduce_sum(flag).item()) == 0.0
