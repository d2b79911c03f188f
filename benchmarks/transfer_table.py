"""Transfer-learning table: does diffusion pretraining help binary heads? And does a critic help sampling?

Runs everything on the CPU, in-process, under WORK (default: `transfer_table` in the temporary directory):

1. `unmask prepare shakespeare_char` (from $UNMASK_DATA_MIRROR when set) and a short pretraining run with the `cpu`
   preset (block_size 128, the README's three stages mixed in every batch; reused when its checkpoint exists), and
   an autoregressive judge with the same settings for the sampling comparison;
2. a sequence task built from the validation split, which pretraining never saw: passages of whole lines (at
   most 128 characters), half of them with the words of every line shuffled (label 1), the rest real (label 0);
   shuffling keeps every line's characters, so only word order tells the classes apart;
3. for `replaced_token` and for that sequence task, `feature_extraction`, `fine_tuning` and `from_scratch` (same
   architecture and vocabulary, random init) with the same steps, batch and schedule, 3 seeds each; the final
   validation metrics of each run;
4. a steps sweep of `remask` (entropy) against `critic` (the fine-tuned replaced_token model of seed 0) with the
   pretrained model, at randomness_strength 0.4 (the default) and 0, scored by the judge.

Prints Markdown tables (mean ± sample std over seeds) and writes WORK/transfer_table.json.

    UNMASK_DATA_MIRROR=DATA_DIR python benchmarks/transfer_table.py [--work=WORK] [--quick]

DATA_DIR is a directory holding tinyshakespeare.txt.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmask.cli import main

BLOCK = 128
MODES = ("feature_extraction", "fine_tuning", "from_scratch")
# Feature extraction trains a linear probe only and tolerates (needs) a larger step size.
LEARNING_RATES = {"feature_extraction": 3e-3, "fine_tuning": 1e-3, "from_scratch": 1e-3}
REFERENCE_KEYS = ("judge_nll", "word_hit_rate", "repeated_4gram_rate", "distinct_2", "char_entropy_bits")
METRICS = ("val_auroc", "val_balanced_accuracy", "val_f1", "val_accuracy", "val_trivial_accuracy", "val_loss")


def run(argv: list[str]) -> None:
    code = main(argv)
    if code != 0:
        raise SystemExit(f"unmask {' '.join(argv)} failed with exit code {code}")


def pretrain(work: Path, iters: int, name: str, *extra: str) -> tuple[Path, dict[str, Any]]:
    """A `cpu`-preset run (reused when its checkpoint exists); returns the checkpoint and its last evaluation."""
    data = work / "data"
    if not (data / "shakespeare_char" / "meta.json").exists():
        run(["prepare", "shakespeare_char", f"--data_dir={data}"])
    out = work / name
    ckpt = out / f"ckpt_unmasking_{iters}.pt"
    if not ckpt.exists():
        run(
            [
                "train",
                "cpu",
                f"--data_dir={data}",
                f"--out_dir={out}",
                f"--block_size={BLOCK}",
                "--batch_size=16",
                f"--max_iters={iters}",
                "--learning_rate=2e-3",
                f"--warmup_iters={max(1, iters // 12)}",
                f"--eval_interval={max(1, iters // 3)}",
                "--eval_iters=8",
                f"--log_interval={max(1, iters // 6)}",
                "--keep_last=1",
                *extra,
            ]
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    return ckpt, {k: last[k] for k in ("iter", "val_loss", "val_bpc")}


def shuffled_passages(work: Path, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """JSONL of passages from the validation split: label 1 = words shuffled within every line."""
    meta = json.loads((work / "data" / "shakespeare_char" / "meta.json").read_text())
    ids = np.fromfile(work / "data" / "shakespeare_char" / "val.bin", dtype=np.uint8)
    text = "".join(meta["itos"][i] for i in ids)
    rng = random.Random(seed)
    passages: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        if not line.strip() or len("\n".join([*current, line])) > BLOCK:
            if len(current) >= 2:
                passages.append(current)
            current = [line] if line.strip() and len(line) <= BLOCK else []
            continue
        current.append(line)
    records = []
    for lines in passages:
        label = rng.randrange(2)
        if label == 1:
            shuffled = []
            for line in lines:
                words = line.split()
                rng.shuffle(words)
                shuffled.append(" ".join(words))
            if shuffled == lines:
                continue  # nothing to shuffle (one-word lines)
            lines = shuffled
        records.append({"text": "\n".join(lines), "label": label})
    path = work / "shuffled_lines.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    stats = {"texts": len(records), "label_1": sum(r["label"] for r in records)}
    stats["mean_chars"] = statistics.mean(len(r["text"]) for r in records)
    return path, stats


def transfer_run(work: Path, pre: Path, task: str, mode: str, seed: int, iters: int, task_file: Path) -> dict[str, Any]:
    out = work / "runs" / f"{task}_{mode}_{seed}"
    flags = [
        "train",
        "--init_from=resume",
        f"--pretrained_checkpoint_path={pre}",
        "--switch_to_binary=True",
        f"--transfer_learning_mode={mode}",
        f"--binary_task={task}",
        f"--out_dir={out}",
        "--device=cpu",
        "--dropout=0.0",
        "--batch_size=8",
        f"--max_iters={iters}",
        f"--learning_rate={LEARNING_RATES[mode]}",
        f"--warmup_iters={max(1, iters // 10)}",
        f"--eval_interval={iters}",
        "--eval_iters=8",
        f"--log_interval={iters}",
        "--keep_last=1",
        f"--seed={seed}",
    ]
    if task == "sequence":
        flags.append(f"--classification_data={task_file}")
    t0 = time.perf_counter()
    run(flags)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    return {"task": task, "mode": mode, "seed": seed, "seconds": seconds, **{k: last[k] for k in METRICS}}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | mode | AUROC | balanced accuracy | F1 (class 1) | accuracy | trivial baseline | val loss | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in ("replaced_token", "sequence"):
        for mode in MODES:
            group = [r for r in rows if r["task"] == task and r["mode"] == mode]
            if not group:
                continue
            cells = [mean_std([r[k] for r in group]) for k in METRICS]
            seconds = statistics.mean(r["seconds"] for r in group)
            lines.append(f"| {task} | {mode} | {' | '.join(cells)} | {seconds:.0f} |")
    return "\n".join(lines)


def critic_sweep(work: Path, pre: Path, critic: Path, judge: Path, steps: str, samples: int) -> list[dict[str, Any]]:
    results = []
    for strength in (0.4, 0.0):
        out = work / f"critic_sweep_s{strength}.json"
        run(
            [
                "sample",
                f"--ckpt={pre}",
                "--remasking=remask,critic",
                f"--critic_ckpt={critic}",
                f"--judge_ckpt={judge}",
                f"--sweep_steps={steps}",
                f"--randomness_strength={strength}",
                f"--num_samples={samples}",
                f"--batch_size={samples}",
                f"--length={BLOCK}",
                "--device=cpu",
                f"--sweep_out={out}",
            ]
        )
        for row in json.loads(out.read_text())["rows"]:
            s = row["samples"]
            results.append(
                {
                    "randomness_strength": strength,
                    "remasking": row["remasking"],
                    "steps": row["steps"],
                    **{k: s.get(k) for k in ("judge_nll", "word_hit_rate", "repeated_4gram_rate", "distinct_2")},
                    "mean_self_logprob": s["mean_self_logprob"],
                    "char_entropy_bits": s["char_entropy_bits"],
                    "chars_per_second": row["speed"]["chars_per_second"],
                    "reference": {k: (row["reference"] or {}).get(k) for k in REFERENCE_KEYS},
                }
            )
    return results


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "transfer_table"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=300, help="training steps of every transfer run")
    parser.add_argument("--pretrain_iters", type=int, default=600)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 steps, 20 pretraining steps (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.iters, args.pretrain_iters = 1, 10, 20
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pre, pre_eval = pretrain(work, args.pretrain_iters, "pretrained", "--use_all_stages_for_training=True")
    judge, judge_eval = pretrain(work, args.pretrain_iters, "judge_ar", "--objective=autoregressive")
    print(f"pretrained: {pre_eval}; judge: {judge_eval}")
    task_file, task_stats = shuffled_passages(work)
    print(f"sequence task: {task_stats}")
    rows = [
        transfer_run(work, pre, task, mode, seed, args.iters, task_file)
        for task in ("replaced_token", "sequence")
        for mode in MODES
        for seed in range(args.seeds)
    ]
    critic = sorted((work / "runs" / "replaced_token_fine_tuning_0").glob("ckpt_unmasking_*.pt"))[-1]
    sweep = critic_sweep(work, pre, critic, judge, "8,16,32" if args.quick else "16,32,64", 4 if args.quick else 16)
    document = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pretrained": {"checkpoint": str(pre), **pre_eval},
        "judge": {"checkpoint": str(judge), **judge_eval},
        "sequence_task": task_stats,
        "iters": args.iters,
        "learning_rates": LEARNING_RATES,
        "runs": rows,
        "critic_sweep": sweep,
        "total_seconds": time.perf_counter() - start,
    }
    (work / "transfer_table.json").write_text(json.dumps(document, indent=2) + "\n")
    print(table(rows))
    print()
    print("| s | remasking | steps | judge NLL | words in corpus | rep-4 | distinct-2 | char entropy | self log-prob |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = ("judge_nll", "word_hit_rate", "repeated_4gram_rate", "distinct_2", "char_entropy_bits")
    for r in sweep:
        cells = " | ".join(f"{r[k]:.3f}" for k in keys)
        print(
            f"| {r['randomness_strength']} | {r['remasking']} | {r['steps']} | {cells} | {r['mean_self_logprob']:.3f} |"
        )
    ref = sweep[0]["reference"]
    print(f"| | real text | | {' | '.join(f'{ref[k]:.3f}' for k in keys)} | |")
    print(f"total {document['total_seconds']:.0f} s; wrote {work / 'transfer_table.json'}")


if __name__ == "__main__":
    main_cli()
