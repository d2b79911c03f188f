"""Zero-masking (--zero_masking=True: the [MASK] logit dropped from the training softmax) against the full softmax,
per objective, at two configurations, two seeds each; and a probe of why it slows autoregressive training down.

Configurations (both 2 layers, 4 heads, 64 wide, block 64, batch 16, lr 2e-3, 50 warmup iterations, cosine to
2e-4 at --iters, dropout 0, windows anywhere in the text, one thread on the CPU):
- `markov`: an order-2 Markov source over 16 characters, P(. | a, b) ~ Dirichlet(0.22) per context, 300,000
  characters drawn with a seeded generator (numpy, seed 0), whose exact NLL on the validation split is printed:
  the floor any model can reach. Written to OUT/markov.txt and prepared with `unmask prepare --input=...`.
- `shakespeare`: tiny Shakespeare (`unmask prepare shakespeare_char`: the mirror, the URL, or --shakespeare=FILE).

Every run is an ordinary `unmask train` in OUT/runs/CONFIG/OBJECTIVE/zmZ_sS; val_bpc (exact NLL for
autoregressive, the ELBO for mdlm and block_diffusion; always scored with [MASK] dropped) is printed at every
evaluation, then the means over seeds with the difference "zero-masking minus full softmax" (negative: zero-masking
is better). OUT/zero_masking.json holds every number.

--probe instead trains the autoregressive model in-process with loss variants no flag offers (PROBE_VARIANTS: a
constant extra logit in the normaliser, the two parts of its gradient, a frozen [MASK] row, a fixed temperature)
and prints val bpc, how much of the final residual stream is common to all positions, and the attention on the
previous position (OUT/zero_masking_probe_CONFIG.json); docs/likelihood.md explains what they show.

    python benchmarks/zero_masking.py --out=OUT [--objectives=autoregressive,mdlm,block_diffusion]
        [--configs=markov,shakespeare] [--seeds=1,2] [--iters=600] [--eval_interval=200] [--diffusion_block=4]
        [--shakespeare=FILE] [--probe]

The default 24 runs took 29 minutes on a 2-core VM with a load average of about 6 (10 CPU minutes; block
diffusion costs twice the others); --probe about 3 minutes per configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unmask.config.train_config import TrainConfig
from unmask.data.dataset import load_dataset
from unmask.likelihood.elbo import real_char_log_probs
from unmask.model import ModelConfig, Transformer, apply_rope
from unmask.training.schedule import lr_at

MARKOV_CHARS = "etaoinshrdlucmfw"  # 16 characters
MARKOV_ALPHA = 0.22
MARKOV_LENGTH = 300_000
DATASETS = {"markov": "markov", "shakespeare": "shakespeare_char"}  # configuration -> prepared dataset
VAL_FRACTION = 0.1  # `unmask prepare`'s default: the last 10 % is the validation split

TRAIN_FLAGS = [
    "--device=cpu",
    "--threads=1",
    "--dtype=float32",
    "--compile=False",
    "--n_layer=2",
    "--n_head=4",
    "--n_embd=64",
    "--block_size=64",
    "--batch_size=16",
    "--dropout=0",
    "--learning_rate=2e-3",
    "--warmup_iters=50",
    "--eval_iters=20",
    "--use_paragraph_boundaries=False",
    "--keep_last=1",
    "--overwrite=True",
]
OBJECTIVES = ("autoregressive", "mdlm", "block_diffusion")


def markov_text(seed: int = 0) -> tuple[str, float]:
    """(text, exact NLL in bits per character of its validation split under the source).

    An order-2 Markov chain: each of the 16 x 16 contexts (a, b) has its own next-character distribution drawn
    from a symmetric Dirichlet(MARKOV_ALPHA), sparse enough that context matters (about 2.4 bits against 4 for
    the unigram).
    """
    V = len(MARKOV_CHARS)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([MARKOV_ALPHA] * V, size=(V, V))  # (V, V, V): P(c | a, b)
    cdf = probs.cumsum(-1)
    u = rng.random(MARKOV_LENGTH)
    ids = np.empty(MARKOV_LENGTH, dtype=np.int64)
    ids[:2] = (0, 1)
    for i in range(2, MARKOV_LENGTH):
        ids[i] = min(int(np.searchsorted(cdf[ids[i - 2], ids[i - 1]], u[i])), V - 1)
    val = ids[int(round(MARKOV_LENGTH * (1 - VAL_FRACTION))) :]
    nll = float(-np.log2(probs[val[:-2], val[1:-1], val[2:]]).mean())
    return "".join(MARKOV_CHARS[i] for i in ids), nll


def unmask(*args: str) -> list[str]:
    return [sys.executable, "-m", "unmask", *args]


def prepare(out: Path, configs: list[str], shakespeare: str | None) -> dict[str, float]:
    """Prepare each configuration's dataset in OUT/data (once); returns the Markov source's exact NLL."""
    data, floors = out / "data", {}
    if "markov" in configs:
        text, floors["markov"] = markov_text()
        if not (data / "markov" / "meta.json").exists():
            (out / "markov.txt").write_text(text)
            subprocess.run(unmask("prepare", f"--input={out / 'markov.txt'}", f"--data_dir={data}"), check=True)
    if "shakespeare" in configs and not (data / "shakespeare_char" / "meta.json").exists():
        extra = [f"--input={shakespeare}"] if shakespeare else []
        subprocess.run(unmask("prepare", "shakespeare_char", f"--data_dir={data}", *extra), check=True)
    return floors


def val_bpc(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval" and r["iter"] > 0:
            out[int(r["iter"])] = float(r["val_bpc"])
    return out


def summarise(rows: list[dict[str, Any]], config: str, objective: str) -> list[dict[str, Any]]:
    """Per evaluation: the mean val_bpc over seeds with and without zero-masking, their difference, and in how
    many seeds zero-masking was lower."""
    picked = [r for r in rows if r["config"] == config and r["objective"] == objective]
    by = {(r["zero_masking"], r["seed"]): r["val_bpc"] for r in picked}
    seeds = sorted({r["seed"] for r in picked})
    out = []
    for it in sorted(picked[0]["val_bpc"]):
        zm, full = (sum(by[(z, s)][it] for s in seeds) / len(seeds) for z in (True, False))
        wins = sum(by[(True, s)][it] < by[(False, s)][it] for s in seeds)
        out.append(
            dict(config=config, objective=objective, iter=it, zero_masking=zm, full_softmax=full, diff=zm - full,
                 zero_masking_wins=wins)
        )  # fmt: skip
    return out


# --- the mechanism probe (--probe) ------------------------------------------------------------------------------
# An in-process copy of the autoregressive training step (the same Transformer, AdamW groups, learning-rate schedule
# and clipping as `unmask train` with TRAIN_FLAGS) whose loss can be changed in ways no flag offers. Each variant
# isolates one candidate cause of the gap.
PROBE_VARIANTS = {
    "full": "full softmax: the [MASK] logit in the normaliser, trained (--zero_masking=False)",
    "zero": "zero-masking (--zero_masking=True), by slicing the logits",
    "zero_inf": "zero-masking as `unmask train` computes it: the [MASK] logit set to -inf on a float32 clone",
    "full_noclip": "full softmax without gradient clipping",
    "zero_noclip": "zero-masking without gradient clipping",
    "full_frozen_row": "full softmax, but the tied [MASK] row gets no gradient (only weight decay)",
    "zero_x1.5": "zero-masking with every logit multiplied by 1.5 (a fixed temperature)",
    "zero_sink": "zero-masking plus a constant logit 0 in the normaliser (no parameter, no [MASK] row)",
    "zero_level": "zero-masking plus only the part of the sink's gradient that raises every real logit alike",
    "zero_shape": "zero-masking plus only the zero-sum rest of the sink's gradient (sharpening)",
}


def probe_loss(variant: str, logits: torch.Tensor, y: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Training loss of a probe variant; logits (N, V) with [MASK] = mask_id the last id, targets y (N,)."""
    real = logits[:, :mask_id]  # (N, V - 1): the real characters
    if variant in ("full", "full_frozen_row", "full_noclip"):
        return F.cross_entropy(logits, y)
    if variant in ("zero", "zero_x1.5", "zero_noclip"):
        return F.cross_entropy(real, y)
    if variant == "zero_inf":
        return F.nll_loss(real_char_log_probs(logits, mask_id), y)
    if variant == "zero_sink":
        return F.cross_entropy(torch.cat((real, torch.zeros_like(real[:, :1])), dim=1), y)
    # A sink at 0 adds log(1 + exp(-LSE)) to the loss, whose gradient on real logit v is -p_sink * p_v. Split it
    # into -p_sink / (V - 1) for every v (a uniform push, invisible to the zero-masked loss) and the zero-sum rest.
    lse = torch.logsumexp(real, dim=1)  # (N,)
    p_sink = torch.sigmoid(-lse).detach()  # (N,): the probability a sink at logit 0 would take
    extra = -real.mean(dim=1) if variant == "zero_level" else -(lse - real.mean(dim=1))
    return F.cross_entropy(real, y) + (p_sink * extra).mean()


def shared_fraction(x: torch.Tensor) -> float:
    """|mean over positions of x|^2 / mean |x|^2 for x (..., C): the part of the residual stream common to all."""
    flat = x.reshape(-1, x.shape[-1])
    return float(flat.mean(0).pow(2).sum() / flat.pow(2).sum(1).mean())


@torch.no_grad()
def previous_token_attention(model: Transformer, idx: torch.Tensor) -> float:
    """The largest mean attention weight on the previous position, over every layer and head."""
    inputs: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for b in model.blocks]
    model(idx)
    for h in hooks:
        h.remove()
    T, best = idx.shape[1], 0.0
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for block, x in zip(model.blocks, inputs, strict=True):
        B, _, C = x.shape
        q, k, _ = block.attn.qkv(x).split(C, dim=-1)
        q, k = (apply_rope(t.view(B, T, block.attn.n_head, -1).transpose(1, 2), cos, sin) for t in (q, k))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        weights = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
        i = torch.arange(1, T)
        best = max(best, float(weights[:, :, i, i - 1].mean((0, 2)).max()))
    return best


def probe_run(data_dir: Path, dataset: str, variant: str, seed: int, iters: int) -> dict[str, float]:
    data = load_dataset(data_dir / dataset)
    train, val = (torch.from_numpy(np.asarray(s, dtype=np.int64)) for s in (data.train, data.val))
    mask_id, T, B = data.vocab.n_chars, 64, 16
    cfg = TrainConfig(learning_rate=2e-3, warmup_iters=50, max_iters=iters, objective="autoregressive")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=mask_id + 1, block_size=T, n_layer=2, n_head=4, n_embd=64, causal=True))
    opt = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val) - T - 1, (160,), generator=torch.Generator().manual_seed(42))
    val_windows = torch.stack([val[i : i + T + 1] for i in starts])  # (160, T + 1)
    scale = 1.5 if variant == "zero_x1.5" else 1.0
    residual: list[torch.Tensor] = []
    model.ln_f.register_forward_pre_hook(lambda _m, a: residual.append(a[0]))
    out: dict[str, float] = {}
    for it in range(iters + 1):
        if it in (50, 200, 400, iters):
            with torch.no_grad():
                residual.clear()
                logits = model(val_windows[:, :-1]) * scale  # (160, T, V)
                nll = F.cross_entropy(logits[..., :mask_id].flatten(0, 1), val_windows[:, 1:].flatten())
            out[f"p_mask_{it}"] = float(logits.softmax(-1)[..., mask_id].mean())  # what the full softmax spends
            out[f"bpc_{it}"] = float(nll) / math.log(2)
            out[f"shared_{it}"] = shared_fraction(residual[0])
            out[f"prev_attn_{it}"] = previous_token_attention(model, val_windows[:32, :-1])
        if it == iters:
            return out
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg)
        windows = torch.stack([train[i : i + T + 1] for i in torch.randint(0, len(train) - T - 1, (B,), generator=gen)])
        logits = model(windows[:, :-1]).flatten(0, 1) * scale  # (B * T, V)
        loss = probe_loss(variant, logits, windows[:, 1:].flatten(), mask_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "full_frozen_row":
            model.tok_emb.weight.grad[mask_id].zero_()
        if not variant.endswith("_noclip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    raise AssertionError("unreachable")


def probe(out: Path, config: str, variants: list[str], seeds: list[int], iters: int) -> None:
    torch.set_num_threads(1)
    print(f"\nprobe: autoregressive on {config}, {iters} iterations; bpc: val bits per character; shared: "
          "the part of the final residual stream common to all positions (|mean|^2 / mean |x|^2); prev attn: the "
          "largest mean attention weight on the previous position (any layer, any head)")  # fmt: skip
    for name in variants:
        print(f"  {name}: {PROBE_VARIANTS[name]}")
    rows = []
    for variant in variants:
        for seed in seeds:
            r = probe_run(out / "data", DATASETS[config], variant, seed, iters)
            rows.append(dict(variant=variant, seed=seed, **r))
            bpc = "  ".join(f"{k.removeprefix('bpc_')}: {v:.4f}" for k, v in r.items() if k.startswith("bpc_"))
            shared, attn, p_mask = (r.get(k, math.nan) for k in ("shared_50", "prev_attn_200", "p_mask_200"))
            print(f"{variant:16s} seed {seed}  bpc {bpc}  shared at 50 {shared:.3f}  prev attn at 200 {attn:.3f}  "
                  f"P([MASK]) at 200 {p_mask:.4f}, at {iters} {r[f'p_mask_{iters}']:.4f}", flush=True)  # fmt: skip
    (out / f"zero_masking_probe_{config}.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working directory (datasets, runs, zero_masking.json)")
    p.add_argument("--objectives", default="autoregressive,mdlm,block_diffusion")
    p.add_argument("--configs", default="markov,shakespeare")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--eval_interval", type=int, default=200)
    p.add_argument("--diffusion_block", type=int, default=4, help="block length K of the block_diffusion runs")
    p.add_argument("--shakespeare", default=None, help="a tiny Shakespeare text file (default: fetched or mirror)")
    p.add_argument("--probe", action="store_true", help="run the mechanism probe (autoregressive) instead")
    p.add_argument("--variants", default=None, help="--probe: these variants only (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    objectives, configs = args.objectives.split(","), args.configs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in objectives:
        if name not in OBJECTIVES:
            p.error(f"--objectives: unknown objective {name!r}; expected some of {', '.join(OBJECTIVES)}")
    for name in configs:
        if name not in DATASETS:
            p.error(f"--configs: unknown configuration {name!r}; expected markov and/or shakespeare")
    floors = prepare(out, configs, args.shakespeare)
    for name, bits in floors.items():
        print(f"{name}: the source's exact NLL on the validation split is {bits:.4f} bits per character")
    if args.probe:
        variants = args.variants.split(",") if args.variants else list(PROBE_VARIANTS)
        for name in variants:
            if name not in PROBE_VARIANTS:
                p.error(f"--variants: unknown variant {name!r}; expected some of {', '.join(PROBE_VARIANTS)}")
        for config in configs:
            probe(out, config, variants, seeds, args.iters)
        return

    rows = []
    start = time.time()
    for config in configs:
        for objective in objectives:
            for zm in (True, False):
                for seed in seeds:
                    run = out / "runs" / config / objective / f"zm{int(zm)}_s{seed}"
                    cmd = unmask(
                        "train",
                        *TRAIN_FLAGS,
                        *([f"--diffusion_block={args.diffusion_block}"] if objective == "block_diffusion" else []),
                        f"--data_dir={out / 'data'}",
                        f"--dataset={DATASETS[config]}",
                        f"--objective={objective}",
                        f"--zero_masking={zm}",
                        f"--seed={seed}",
                        f"--max_iters={args.iters}",
                        f"--eval_interval={args.eval_interval}",
                        f"--log_interval={args.eval_interval}",
                        f"--out_dir={run}",
                    )
                    t0 = time.time()
                    env = {**os.environ, "OMP_NUM_THREADS": "1"}
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
                    bpc = val_bpc(run)
                    rows.append(dict(config=config, objective=objective, zero_masking=zm, seed=seed, val_bpc=bpc))
                    shown = "  ".join(f"{it}: {v:.4f}" for it, v in sorted(bpc.items()))
                    print(f"{config:11s} {objective:15s} zero_masking={zm!s:5s} seed {seed}  {shown}  "
                          f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip

    print("\nmean val_bpc over seeds; diff = zero-masking minus full softmax (negative: zero-masking is better)")
    summary = [row for config in configs for objective in objectives for row in summarise(rows, config, objective)]
    for r in summary:
        print(
            f"{r['config']:11s} {r['objective']:15s} iter {r['iter']:5d}: zero-masking {r['zero_masking']:.4f}  "
            f"full softmax {r['full_softmax']:.4f}  diff {r['diff']:+.4f}  "
            f"(zero-masking lower in {r['zero_masking_wins']}/{len(seeds)} seeds)"
        )
    minutes = (time.time() - start) / 60
    print(f"\n{len(rows)} runs in {minutes:.1f} minutes")
    record = dict(
        runs=rows,
        summary=summary,
        source_nll_bits=floors,
        train_flags=TRAIN_FLAGS,
        iters=args.iters,
        diffusion_block=args.diffusion_block,
        minutes=minutes,
        torch=torch.__version__,
        machine=f"{platform.machine()} {os.cpu_count()} cores",
    )
    (out / "zero_masking.json").write_text(json.dumps(record, indent=1) + "\n")
    if any(math.isnan(v) for r in rows for v in r["val_bpc"].values()):
        sys.exit("a run produced NaN")


if __name__ == "__main__":
    main()
