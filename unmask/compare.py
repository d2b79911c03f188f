"""`unmask compare`: an autoregressive baseline and a diffusion model, same data, same budget, one number.

Both runs take every `unmask train` flag given (model size, batch, iterations, learning rate, ...); only the
objective differs. The result is val_bpc against epochs for both (the data-constrained comparison of Prabhudesai
et al. 2025, "Diffusion beats autoregressive in data-constrained settings", at small scale), printed as a table and
written to `OUT_DIR/compare.json` and `OUT_DIR/compare.csv`. The runs live in `OUT_DIR/autoregressive/` and
`OUT_DIR/<diffusion objective>/` as ordinary training runs (checkpoints, metrics.jsonl).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from unmask.checkpoint import atomic_write_bytes, atomic_write_json
from unmask.errors import UserError

DIFFUSION_OBJECTIVES = ("mdlm", "unmasking")


def _eval_records(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "eval"]


def comparison_rows(ar: list[dict[str, Any]], diffusion: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation iteration present in both runs."""
    by_iter = {r["iter"]: r for r in diffusion}
    return [
        {
            "iter": r["iter"],
            "epochs": r["epochs"],
            "autoregressive_val_bpc": r["val_bpc"],
            "diffusion_val_bpc": by_iter[r["iter"]]["val_bpc"],
        }
        for r in ar
        if r["iter"] in by_iter
    ]


def main(argv: list[str]) -> int:
    from unmask.config import TrainConfig
    from unmask.flags import format_help
    from unmask.runtime import init_runtime
    from unmask.train import build_train_run
    from unmask.trainer import Trainer

    if "--help" in argv or "-h" in argv:
        print(
            format_help(
                TrainConfig,
                "unmask compare [PRESET] [--diffusion_objective=mdlm|unmasking] [train flags ...]",
                "Train the autoregressive baseline and a diffusion model with the same flags and report val_bpc "
                "against epochs for both.",
            )
        )
        return 0
    diffusion_objective = "mdlm"
    rest = []
    for arg in argv:
        if arg.startswith("--diffusion_objective="):
            diffusion_objective = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if diffusion_objective not in DIFFUSION_OBJECTIVES:
        raise UserError(
            f"--diffusion_objective={diffusion_objective}: expected one of {', '.join(DIFFUSION_OBJECTIVES)}"
        )
    if any(a.startswith(("--objective=", "--init_from=")) for a in rest):
        raise UserError("--objective/--init_from: compare chooses the objectives and always starts from scratch")
    base = build_train_run(rest).cfg
    out = Path(base.out_dir)
    runtime = init_runtime(base.device, base.dtype, base.backend)
    records: dict[str, list[dict[str, Any]]] = {}
    try:
        for objective in ("autoregressive", diffusion_objective):
            cfg = TrainConfig.from_dict({**base.to_dict(), "objective": objective, "out_dir": str(out / objective)})
            if runtime.is_master:
                print(f"=== {objective} -> {cfg.out_dir} ===", flush=True)
            Trainer(cfg, runtime).run()
            records[objective] = _eval_records(Path(cfg.out_dir)) if runtime.is_master else []
    finally:
        runtime.shutdown()
    if not runtime.is_master:
        return 0
    rows = comparison_rows(records["autoregressive"], records[diffusion_objective])
    print(f"\n{'iter':>7} {'epochs':>8} {'AR val_bpc':>11} {diffusion_objective + ' val_bpc':>14}")
    for r in rows:
        print(
            f"{r['iter']:>7} {r['epochs']:>8.3f} {r['autoregressive_val_bpc']:>11.4f} {r['diffusion_val_bpc']:>14.4f}"
        )
    summary = {"diffusion_objective": diffusion_objective, "config": base.to_dict(), "rows": rows}
    atomic_write_json(out / "compare.json", summary)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["iter", "epochs", "autoregressive_val_bpc", "diffusion_val_bpc"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "compare.csv", table.getvalue().encode())
    print(f"wrote {out / 'compare.json'} and {out / 'compare.csv'}")
    return 0
