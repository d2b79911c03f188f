"""`unmask eval`: the likelihood of a checkpoint on a whole split, in bits per character.

Diffusion checkpoints get the negative ELBO (an upper bound on the NLL; `unmask.likelihood.elbo` has the derivation and
the estimators), autoregressive ones the exact NLL, both over every non-overlapping block_size window of the split, so
the two families are compared on the same characters. Diffusion checkpoints also get the original framework's
per-stage masked cross-entropy on its fixed validation set (seed 42), i.e. the numbers the trainer logged.

`--estimator=policy --policy=NAME` scores diffusion checkpoints instead by the *exact* likelihood of the model
under a deterministic unmasking policy (Turok, De Sa and Kuleshov 2026, "DUEL"; `unmask.likelihood.policy`): no bound
and no Monte Carlo, ceil(L / per_step) forward passes per window. It is the likelihood of a different generative
model than the ELBO's (the policy's order instead of a uniformly random one), the one `unmask sample --policy`
draws from, so it is reported next to the ELBO of the same windows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from unmask.config.command import parse_command
from unmask.config.flags import MAX_SEED, bounded, check_ranges
from unmask.curriculum.stages import parse_stages
from unmask.data.dataset import gather_windows, load_dataset
from unmask.errors import UserError
from unmask.likelihood.elbo import DEFAULT_ESTIMATOR, ESTIMATOR_DESCRIPTIONS, LN2
from unmask.likelihood.policy import (
    POLICIES,
    POLICY_DESCRIPTIONS,
    Policy,
    model_predict,
    policy_log_likelihood,
    policy_steps,
)
from unmask.likelihood.score import (
    Scorer,
    evenly_spaced,
    scorer_for,
    split_window_offsets,
    windows_likelihood,
)
from unmask.runtime import MAX_THREADS, Runtime, resolve_device, set_threads
from unmask.storage.loading import Trained, read_trained
from unmask.training.validation import build_validation_set, evaluate_batches, validation_window_offsets

USAGE = (
    "unmask eval --out_dir=DIR|--ckpt=PATH [--split=val] [--draws=N] [--seed=S] [--json]\n"
    "       [--estimator=policy --policy=left_to_right|low_confidence|margin|entropy [--per_step=N]]"
)
DESCRIPTION = (
    "Bits per character of a checkpoint over every non-overlapping block_size window of a split: the negative\n"
    "ELBO (an upper bound on the NLL) for diffusion checkpoints, the exact NLL for autoregressive ones, with a\n"
    "standard error across windows. Diffusion checkpoints also get the per-stage masked cross-entropy.\n"
    "--estimator=policy: the exact NLL of a diffusion checkpoint under a deterministic unmasking policy, next to\n"
    "its ELBO on the same windows."
)
EvalEstimator = Literal["exact_k", "stratified_t", "antithetic_t", "policy"]
# The trainer's validation-set size when a checkpoint's config predates these keys (TrainConfig defaults).
_DEFAULT_EVAL_ITERS, _DEFAULT_BATCH_SIZE = 20, 16


@dataclass
class EvalArgs:
    out_dir: str | None = None
    """Training run directory: its newest checkpoint is evaluated."""
    ckpt: str | None = None
    """Checkpoint file to evaluate, or a run directory for its newest (wins over --out_dir)."""
    split: Literal["val", "train"] = "val"
    """Which split of the checkpoint's dataset to score."""
    draws: int = bounded(4, 1, 10**4)
    """Monte-Carlo draws (forward passes) per window for diffusion checkpoints."""
    estimator: EvalEstimator = DEFAULT_ESTIMATOR
    """ELBO estimator: exact_k (k masks stratified over the draws, L/k weights; lowest variance), stratified_t or
    antithetic_t (continuous t with 1/t weights); or policy: the exact NLL under --policy (diffusion checkpoints;
    the ELBO is then reported beside it with exact_k)."""
    policy: Policy | None = None
    """--estimator=policy: the unmasking order, a deterministic function of the model's predictions:
    left_to_right, low_confidence (highest max-probability first), margin (largest top-1 minus top-2 first) or
    entropy (lowest entropy first); ties go to the lowest position."""
    per_step: int = bounded(1, 1, 2**20)
    """--estimator=policy: characters committed per step (the last step takes the rest); a window of L costs
    ceil(L / per_step) forward passes."""
    seed: int = bounded(0, 0, MAX_SEED)
    """Seed of the mask draws: the same seed, batch size and device give the same numbers."""
    json: bool = False
    """Print one JSON object instead of the readable report."""
    threads: int = bounded(0, 0, MAX_THREADS)
    """CPU threads for torch (0: the cores that are idle now, measured over 0.15 s from /proc/stat, at least 1)."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    batch_size: int = bounded(64, 1, 2**20)
    """Sequences per forward pass (a diffusion window takes --draws of them)."""
    data_dir: str | None = None
    """Directory holding the prepared dataset (default: the checkpoint's training data_dir)."""
    max_windows: int | None = bounded(None, 1, 10**12)
    """Score only this many evenly spaced windows (a quick look; the report says so)."""
    windows: Literal["split", "validation_set"] = "split"
    """Which windows: split (every non-overlapping block_size window of --split) or validation_set (the training
    run's fixed validation windows, at paragraph starts like its training windows: reproduces the val_bpc the
    training log reports, within Monte-Carlo error; --split=val only)."""

    def __post_init__(self) -> None:
        check_ranges(self)


WINDOWS = {
    "split": "every non-overlapping block_size window of the split (offsets 0, L, 2L, ...)",
    "validation_set": "the run's fixed validation windows (seed 42, eval_iters x batch_size windows, at paragraph "
    "starts unless --use_paragraph_boundaries=False): the windows its logged val_bpc scores",
}


def scored_windows(
    args: EvalArgs, trained: Trained, scorer: Scorer, tokens: np.ndarray, paragraphs: np.ndarray
) -> tuple[np.ndarray, int]:
    """(offsets of the windows to score, how many `--windows` names before --max_windows)."""
    if args.windows == "split":
        starts = split_window_offsets(len(tokens), scorer.block_size, scorer.exact)
    else:
        cfg = trained.config
        count = int(cfg.get("eval_iters", _DEFAULT_EVAL_ITERS)) * int(cfg.get("batch_size", _DEFAULT_BATCH_SIZE))
        aligned = paragraphs if bool(cfg.get("use_paragraph_boundaries", True)) else None
        starts = validation_window_offsets(tokens, aligned, scorer.block_size + scorer.context, count)
    return evenly_spaced(starts, args.max_windows), len(starts)


def _validate(args: EvalArgs) -> None:
    if args.estimator == "antithetic_t" and args.draws % 2:
        raise UserError(f"--draws={args.draws}: --estimator=antithetic_t needs an even number of draws (pairs)")
    if args.windows == "validation_set" and args.split != "val":
        raise UserError(
            f"--windows=validation_set: the run's validation windows are in the val split, not --split={args.split}"
        )
    if args.estimator == "policy":
        if args.policy is None:
            raise UserError(f"--estimator=policy: give --policy={'|'.join(POLICIES)}")
    elif args.policy is not None:
        raise UserError(f"--policy={args.policy}: only with --estimator=policy")
    elif args.per_step != 1:
        raise UserError(f"--per_step={args.per_step}: only with --estimator=policy")


def objective_of(trained: Trained) -> str:
    if trained.model_config.causal:
        return "autoregressive"
    return str(trained.config.get("objective", "unmasking"))


def stage_metrics(
    trained: Trained, tokens: np.ndarray, paragraphs: np.ndarray, batch_size: int, device: torch.device
) -> tuple[dict[str, Any] | None, list[str]]:
    """The trainer's per-stage masked-CE metrics on the fixed validation set (seed 42) built from `tokens`."""
    cfg = trained.config
    raw = cfg.get("validation_stages") or cfg.get("unmasking_stages")
    if not raw:
        return None, []
    stages = parse_stages(raw, "validation_stages")
    n_samples = int(cfg.get("eval_iters", _DEFAULT_EVAL_ITERS)) * int(cfg.get("batch_size", _DEFAULT_BATCH_SIZE))
    vocab, block = trained.vocab, trained.model_config.block_size
    use_paragraphs = bool(cfg.get("use_paragraph_boundaries", True))
    data = build_validation_set(
        tokens, paragraphs if use_paragraphs else None, stages, n_samples, block, vocab.mask_id, vocab.n_chars, device
    )
    runtime = Runtime(device, torch.float32)
    metrics = evaluate_batches(trained.model, data, batch_size, len(stages), vocab.n_chars, runtime)
    labels = [f"Stage {i} ({s.type}): {s.ratio_label()}" for i, s in enumerate(stages)]
    return metrics, labels


def window_starts(n_tokens: int, block_size: int, max_windows: int | None) -> tuple[np.ndarray, int]:
    """Offsets of the scored diffusion windows of a split and the split's total (`--windows=split`)."""
    starts = split_window_offsets(n_tokens, block_size, causal=False)
    return evenly_spaced(starts, max_windows), len(starts)


@torch.no_grad()
def policy_split_likelihood(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    mask_id: int,
    policy: str,
    per_step: int,
    batch_size: int,
    device: torch.device,
    block_length: int | None = None,
    max_windows: int | None = None,
    starts: np.ndarray | None = None,
) -> dict[str, Any]:
    """Exact NLL under `policy` of every non-overlapping block_size window of a split (the ELBO's windows; or the
    windows at `starts`), in bits per character, with the standard error across windows (data only: the number
    has no estimator noise)."""
    if starts is None:
        starts, total = window_starts(len(tokens), block_size, max_windows)
    else:
        total = len(starts)
    W, L = len(starts), block_size
    per_window = torch.empty(W, dtype=torch.float64)  # nats per character
    predict = model_predict(model, mask_id)
    for i in range(0, W, batch_size):
        x = gather_windows(tokens, torch.from_numpy(starts[i : i + batch_size]), L).to(device)  # (b, L)
        logp = policy_log_likelihood(predict, x, mask_id, policy, per_step, block_length)  # (b,)
        per_window[i : i + len(x)] = -logp.cpu() / L
    nats = float(per_window.mean())
    stderr = float(per_window.std() / math.sqrt(W)) if W > 1 else None
    return {
        "bpc": nats / LN2,
        "bpc_stderr": None if stderr is None else stderr / LN2,
        "bpc_mc_stderr": 0.0,
        "nats_per_char": nats,
        "nats_stderr": stderr,
        "estimator": "policy",
        "draws": 1,
        "windows": W,
        "windows_total": total,
        "chars": W * L,
        "block_size": L,
        "policy": policy,
        "per_step": per_step,
        "block_length": block_length,
        "forward_passes_per_window": policy_steps(L, per_step, block_length),
    }


def _block_length(trained: Trained) -> int | None:
    """A block-diffusion checkpoint's block (`ModelConfig.diffusion_block`, else the config key `diffusion_block`;
    0 or absent: none): the policy stays inside the leftmost open block."""
    value = getattr(trained.model_config, "diffusion_block", 0) or trained.config.get("diffusion_block")
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{trained.path}: config diffusion_block={value!r} is not a positive integer")
    return value


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def evaluate(args: EvalArgs) -> dict[str, Any]:
    """Run the evaluation described by `args`; returns the report as a JSON-able dict."""
    _validate(args)
    device = resolve_device(args.device)
    trained = read_trained(args.ckpt, args.out_dir, device)
    path = trained.path
    trained.require_head(("lm",), "unmask eval (a likelihood in bits per character)")
    cfg = trained.config
    if args.data_dir is None and "data_dir" not in cfg:
        raise UserError(f"{path}: the checkpoint does not record its data_dir; give --data_dir=DIR")
    if "dataset" not in cfg:
        raise UserError(f"{path}: the checkpoint does not record its dataset name")
    dataset_dir = Path(args.data_dir if args.data_dir is not None else cfg["data_dir"]) / str(cfg["dataset"])
    dataset = load_dataset(dataset_dir)
    if dataset.vocab != trained.vocab:
        raise UserError(
            f"--data_dir={dataset_dir.parent}: {dataset_dir} has a different vocabulary "
            f"({dataset.vocab.n_chars} characters) than {path} ({trained.vocab.n_chars}); wrong dataset"
        )
    tokens = dataset.split(args.split)
    causal = trained.model_config.causal
    block = trained.model_config.block_size
    if len(split_window_offsets(len(tokens), block, causal)) == 0:
        raise UserError(
            f"--split={args.split}: {dataset_dir} has {len(tokens):,} {args.split} characters, "
            f"fewer than one window of {block + int(causal)}"
        )

    if args.estimator == "policy" and causal:
        raise UserError(
            f"--estimator=policy: {path} is an autoregressive (causal) checkpoint, whose NLL is already exact "
            "(left to right); an unmasking policy applies to diffusion checkpoints only"
        )

    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    elbo_estimator = DEFAULT_ESTIMATOR if args.estimator == "policy" else args.estimator
    K = _block_length(trained) or 0
    scorer = scorer_for(causal, K, trained.vocab.mask_id, block, args.draws, elbo_estimator)
    starts, total = scored_windows(args, trained, scorer, tokens, dataset.paragraphs[args.split])
    result = windows_likelihood(scorer, trained.model, tokens, starts, generator, args.batch_size, device, True)
    result |= {"windows_total": total, "windows_kind": args.windows, "windows_description": WINDOWS[args.windows]}
    seconds = time.perf_counter() - start
    extra: dict[str, Any] = {}
    if args.estimator == "policy":
        assert args.policy is not None  # _validate
        elbo = {**result, "estimator_description": ESTIMATOR_DESCRIPTIONS[elbo_estimator], "seconds": seconds}
        start = time.perf_counter()
        result = policy_split_likelihood(
            trained.model,
            tokens,
            block,
            trained.vocab.mask_id,
            args.policy,
            args.per_step,
            args.batch_size,
            device,
            _block_length(trained),
            starts=starts,
        )
        result |= {"windows_total": total, "windows_kind": args.windows, "windows_description": WINDOWS[args.windows]}
        seconds = time.perf_counter() - start
        extra = {"elbo": elbo}
    masked_ce: dict[str, Any] | None = None
    labels: list[str] = []
    if not causal and _block_length(trained) is None:  # (stage-masked windows mean nothing block-causally)
        masked_ce, labels = stage_metrics(trained, tokens, dataset.paragraphs[args.split], args.batch_size, device)
    return _finite(
        {
            "checkpoint": str(path),
            "iter": trained.iter_num,
            "objective": objective_of(trained),
            "split": args.split,
            "dataset": str(dataset_dir),
            "bound": not causal and args.estimator != "policy",
            **result,
            "estimator_description": _describe(result),
            **extra,
            "max_windows": args.max_windows,
            "seed": args.seed,
            "device": str(device),
            "seconds": round(seconds, 3),
            "model": asdict(trained.model_config),
            "stages": labels,
            "masked_ce": masked_ce,
        }
    )


def _describe(result: dict[str, Any]) -> str:
    if result["estimator"] != "policy":
        return ESTIMATOR_DESCRIPTIONS[result["estimator"]]
    blocks = "" if result["block_length"] is None else f", inside blocks of {result['block_length']}"
    return (
        f"exact NLL under the {result['policy']} policy ({POLICY_DESCRIPTIONS[result['policy']]}), "
        f"{result['per_step']} character(s) per step{blocks}: "
        f"{result['forward_passes_per_window']} forward passes per window"
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_lines(r: dict[str, Any]) -> list[str]:
    m = r["model"]
    if r["estimator"] == "policy":
        what = f"exact NLL under the {r['policy']} unmasking policy"
    else:
        what = "negative ELBO (upper bound on the NLL)" if r["bound"] else "exact NLL"
    lines = [
        f"checkpoint  {r['checkpoint']} (iter {r['iter']}, objective {r['objective']}, "
        f"{m['n_layer']} layers x {m['n_embd']}, block {r['block_size']})",
        f"data        {r['dataset']} {r['split']} split: {r['windows']:,} windows of {r['block_size']} "
        f"({r['chars']:,} characters scored)",
        f"windows     --windows={r['windows_kind']}: {r['windows_description']}",
    ]
    if r["windows"] < r["windows_total"]:
        lines.append(
            f"            --max_windows={r['max_windows']}: {r['windows']:,} evenly spaced of "
            f"{r['windows_total']:,} windows, a quick look, not the whole split"
        )
    lines += [
        f"bpc         {_fmt(r['bpc'])} ± {_fmt(r['bpc_stderr'])} bits/char ({_fmt(r['nats_per_char'])} nats/char): "
        f"{what}",
        f"estimator   {r['estimator']}: {r['estimator_description']}"
        + ("" if not r["bound"] else f"; {r['draws']} draws per window"),
        "stderr      across windows (data and estimator noise)"
        + ("" if not r["bound"] else f"; estimator noise alone {_fmt(r['bpc_mc_stderr'])} bits/char")
        if r["bound"]
        else "stderr      across windows (the windows only: the number itself is exact)",
        f"time        {r['seconds']:.1f} s on {r['device']}",
    ]
    elbo = r.get("elbo")
    if elbo is not None:
        lines += [
            f"ELBO        {_fmt(elbo['bpc'])} ± {_fmt(elbo['bpc_stderr'])} bits/char ({_fmt(elbo['nats_per_char'])} "
            f"nats/char) on the same windows: negative ELBO (upper bound on the NLL of the random-order model)",
            f"            {elbo['estimator']}, {elbo['draws']} draws per window; estimator noise "
            f"{_fmt(elbo['bpc_mc_stderr'])} bits/char; {elbo['seconds']:.1f} s",
        ]
    ce = r["masked_ce"]
    if ce is not None:
        lines.append(f"Per-stage masked CE (the trainer's fixed validation set, seed 42, {r['split']} split):")
        for i, label in enumerate(r["stages"]):
            lines.append(f"  {label}: {_fmt(ce[f'val_stage_{i}_loss'])} ({ce[f'val_stage_{i}_samples']} samples)")
        lines.append(
            f"  overall: loss {_fmt(ce['val_loss'])}, most likely guess correct "
            f"{_fmt(ce['val_most_likely_accuracy'], 1)}%, model vs random {_fmt(ce['val_model_vs_random'], 2)}x"
        )
    return lines


def main(argv: list[str]) -> int:
    parsed = parse_command(EvalArgs, argv, USAGE, DESCRIPTION)
    if parsed is None:
        return 0
    args = parsed[1]
    set_threads(args.threads)
    result = evaluate(args)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print("\n".join(report_lines(result)))
    return 0
