"""The run log: console lines, `metrics.jsonl` (one JSON record per log and eval line), optional wandb.

Only rank 0 writes. Every record carries `time` (Unix seconds, wall clock) and `elapsed_s` (seconds since this
process opened the log). wandb is imported lazily and only when `--wandb_log=True`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from unmask.errors import UserError


def _jsonable(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool, wandb_config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.opened = time.time()
        self.path = out_dir / "metrics.jsonl"
        self._wandb: Any = None
        if enabled and wandb_config is not None:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_log=True needs the wandb package: pip install wandb") from None
            self._wandb = wandb
            wandb.init(
                project=wandb_config["wandb_project"],
                name=wandb_config["wandb_run_name"],
                config=wandb_config,
            )

    def print(self, line: str = "") -> None:
        if self.enabled:
            print(line, flush=True)

    def record(self, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        rec = {
            "kind": kind,
            **{k: _jsonable(v) for k, v in values.items()},
            "time": round(now, 3),
            "elapsed_s": round(now - self.opened, 3),
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=int(values["iter"]))

    def truncate_after(self, iter_num: int) -> None:
        """On resume, drop records written after the checkpoint's iteration (they are about to be redone)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("iter", 0) <= iter_num
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
