"""`unmask sample`: generate text from a language-model checkpoint, with prompts, infilling, metrics and a sweep.

Diffusion checkpoints (unmasking, mdlm) fill a canvas by iterative unmasking; autoregressive ones continue a
prompt one character per forward pass with a KV cache; block-diffusion ones (`diffusion_block = K`) fill blocks of
K left to right, each by iterative unmasking against a KV cache of the finished blocks.

Parse (`SampleArgs`, in sample_args.py) -> build (`build`: checkpoint, canvas, steps, reference data, judge) -> run
(`run_samples`: the generation engine), then `report` or `sweep` (sample_run.py). The engine lives in
`unmask.generation.engine`, sample quality in `unmask.generation.quality`; see docs/sampling.md for the strategies,
defaults and a measured steps sweep.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unmask.commands.sample_args import SampleArgs
from unmask.commands.sample_run import (
    Setup,
    build,
    build_from,
    describe,
    evaluate,
    json_document,
    report,
    run_samples,
    sampling_config,
    step_printer,
    step_tracer,
    sweep,
    write_sweep,
)
from unmask.config.command import parse_command
from unmask.errors import UserError
from unmask.generation.animate import Recorder, animation_html, write_animation
from unmask.generation.diffusion import StepEvent
from unmask.generation.engine import GUIDE_PRESET

__all__ = ["SampleArgs", "Setup", "build", "build_from", "evaluate", "main", "run_samples", "sampling_config"]


def main(argv: list[str]) -> int:
    def guide(flags: dict[str, Any]) -> dict[str, Any]:
        return {**GUIDE_PRESET, **flags} if flags.get("preset") == "guide" else flags

    parsed = parse_command(
        SampleArgs,
        argv,
        "unmask sample (--out_dir=DIR | --ckpt=PATH) [--flag=value ...]",
        "Generate text by iterative unmasking: prompts, infilling, remasking strategies, sample metrics and "
        "a steps sweep. See docs/sampling.md.",
        adjust=guide,
    )
    if parsed is None:
        return 0
    setup = build(parsed[1])
    args = setup.args  # the checkpoint kind's default sampler filled in, when no flag chose one

    if args.step_counts:
        if args.sweep_out is not None and Path(args.sweep_out).exists():  # refuse before the work, not after
            raise UserError(f"--sweep_out={args.sweep_out}: the file exists; give a new path")
        rows = sweep(setup)
        document = {
            "checkpoint": str(setup.trained.path),
            "settings": {k: v for k, v in asdict(args).items() if k not in ("strategies", "step_counts")},
            "length": setup.length,
            "rows": rows,
            "notes": setup.notes,
        }
        print(f"wrote {write_sweep(args, setup.trained.path.parent, document)}")
        return 0

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the document only
    hooks = [step_printer(setup, out)] if args.show_steps else []
    trace_file = None
    if args.trace is not None:
        try:
            trace_file = open(args.trace, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"--trace={args.trace}: cannot write ({exc.strerror})") from None
        hooks.append(step_tracer(setup, trace_file))
    recorder = None
    if args.animate is not None:
        if not Path(args.animate).parent.is_dir():  # before generating, not after
            raise UserError(f"--animate={args.animate}: directory {Path(args.animate).parent} does not exist")
        recorder = Recorder(setup.canvas.ids, setup.fixed, setup.trained.vocab.mask_id, args.num_samples)
        hooks.append(recorder)

    def on_step(first: int, event: StepEvent) -> None:
        for hook in hooks:
            hook(first, event)

    try:
        run = run_samples(setup, sampling_config(args, args.strategies[0], setup.steps), on_step if hooks else None)
    finally:
        if trace_file is not None:
            trace_file.close()
    if recorder is not None and args.animate is not None:
        write_animation(Path(args.animate), animation_html(recorder, setup.trained.vocab, describe(setup, run.config)))
        print(f"wrote {args.animate} ({len(recorder.frames)} steps)", file=out)
    metrics = evaluate(setup, run) if args.metrics else None
    if args.json:
        print(json.dumps(json_document(setup, run, metrics), indent=2, ensure_ascii=False))
    else:
        report(setup, run, metrics, sys.stdout)
    return 0
