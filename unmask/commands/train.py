"""`unmask train`: parse the flags into a config (defaults < preset < flags; the checkpoint's config as the base on
resume), build the trainer for the configured objective and run it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask.config.flags import format_help, load_preset, parse_flags
from unmask.config.literal import available_presets
from unmask.config.train_config import ARCHITECTURE_FLAGS, SCHEDULE_FLAGS, TrainConfig, differing_fields
from unmask.storage import run_dir
from unmask.storage.run_dir import load_for_resume

USAGE = "unmask train [PRESET] [--flag=value ...]"


@dataclass
class TrainRun:
    """What `unmask train` starts from: the config, a checkpoint to resume, or pretrained weights to transfer."""

    cfg: TrainConfig
    checkpoint: dict[str, Any] | None = None
    path: Path | None = None
    pretrained: Any = None  # unmask.transfer.pretrained.Pretrained: a new run from these weights
    default_model: bool = False  # a new run with no preset and no model flag: the GPU-sized default model
    # A plain resume: the highest `seq` of the run's checkpoints (damaged ones too) before it read its own.
    seen_seq: int | None = None


def build_train_run(argv: list[str]) -> TrainRun:
    """Defaults < preset (positional, by name or path) < flags. On resume the checkpoint's config is the base; with
    --pretrained_checkpoint_path (a transfer start) the checkpoint gives the architecture (see unmask.transfer)."""
    positional, flags = parse_flags(TrainConfig, argv, max_positional=1)
    values = {**(load_preset(positional[0], TrainConfig) if positional else {}), **flags}
    explicit = frozenset(values)
    if values.get("init_from") == "resume" and values.get("pretrained_checkpoint_path") is not None:
        from unmask.transfer import pretrained as transfer

        if transfer.is_transfer_start(values, explicit):
            source = transfer.load_pretrained(values["pretrained_checkpoint_path"])
            return TrainRun(
                TrainConfig.from_dict(transfer.transfer_values(values, explicit, source)), pretrained=source
            )
    if values.get("init_from") != "resume":
        default_model = not positional and not set(values) & {*ARCHITECTURE_FLAGS, "batch_size"}
        return TrainRun(TrainConfig.from_dict(values), default_model=default_model)
    out_dir = Path(values.get("out_dir", TrainConfig.out_dir))
    # What the run had written before this resume read its checkpoint: the trainer compares it under the lock.
    manifest = None if values.get("ckpt_filename") is not None else run_dir.read_manifest(out_dir)
    seen_seq = None if manifest is None else run_dir.next_seq(out_dir, manifest["run_id"]) - 1
    path, checkpoint = load_for_resume(out_dir, values.get("ckpt_filename"))
    saved = checkpoint["config"]
    # Logging to an external service is decided by whoever resumes, never by a checkpoint (which may come from
    # elsewhere): --wandb_log is off unless given now.
    cfg = TrainConfig.from_dict({**saved, "wandb_log": False, **values})
    changed = differing_fields({k: v for k, v in values.items() if k in flags}, saved, SCHEDULE_FLAGS)
    if changed:
        print(
            f"unmask train: warning: resuming {path} with a different learning-rate schedule ({'; '.join(changed)}); "
            "the remaining iterations follow the new one",
            file=sys.stderr,
        )
    if cfg.switch_to_binary or checkpoint.get("model_config", {}).get("head", "lm") != "lm":
        from unmask.transfer import pretrained as transfer

        transfer.check_resume_task(cfg, checkpoint, path)
    return TrainRun(cfg, checkpoint, path, seen_seq=seen_seq)


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                TrainConfig,
                USAGE,
                "Train a bidirectional transformer to fill masked characters through a curriculum of "
                "masking stages.\nPRESET: a preset name ("
                + ", ".join(available_presets())
                + ") or a .py file of plain assignments.",
            )
        )
        return 0
    run = build_train_run(argv)
    from unmask.runtime import init_runtime, set_threads
    from unmask.training.trainer import Trainer

    set_threads(run.cfg.threads)
    runtime = init_runtime(run.cfg.device, run.cfg.dtype, run.cfg.backend)
    if run.default_model and runtime.device.type == "cpu" and runtime.is_master:
        print(cpu_default_note(run.cfg), flush=True)
    try:
        Trainer(run.cfg, runtime, run.checkpoint, run.path, run.pretrained, run.seen_seq).run()
    finally:
        runtime.shutdown()
    return 0


def cpu_default_note(cfg: TrainConfig) -> str:
    """One line for a run on a CPU with the default (GPU-sized) model: its size and the time it will take here.

    The estimate is the model's training FLOPs per iteration (PaLM's 6N + 12 L T C per token) over this machine's
    measured float32 matmul rate; an evaluation is counted as its forward passes (fresh batches, the validation set,
    the ELBO draws and five mask-rate buckets, each a third of a training step)."""
    import time

    import torch

    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    params = L * 12 * C * C + 66 * C  # the blocks, plus a character vocabulary's embedding
    flops_iter = (6 * params + 12 * L * T * C) * T * cfg.batch_size * cfg.gradient_accumulation_steps
    a = torch.randn(256, 256)
    a @ a  # warm up
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    rate = 20 * 2 * 256**3 / (time.perf_counter() - start)  # FLOP/s of this CPU, now
    step = flops_iter / rate
    evaluation = step * cfg.eval_iters * (7 + cfg.elbo_draws) / 3
    return (
        f"note: no accelerator and no preset or model flag: this is the default {params / 1e6:.1f}M-parameter, "
        f"block-{T} model, about {step:.1f} s per iteration and {evaluation:.0f} s per evaluation on this CPU; "
        "`unmask train cpu` trains a 0.8M-parameter CPU model instead"
    )
