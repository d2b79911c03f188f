"""The run log: console lines, `metrics.jsonl` (one JSON record per log and eval line), optional wandb.

Only rank 0 writes. Every record carries the `run_id`, `time` (Unix seconds, wall clock) and `elapsed_s` (seconds
since this process opened the log). The file is only ever appended to, or replaced atomically on resume. wandb is
imported lazily and only when `--wandb_log=True`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from unmask.errors import UserError
from unmask.storage.checkpoint import atomic_write_bytes, describe_os_error


def _jsonable(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLog:
    def __init__(
        self, out_dir: Path, enabled: bool, wandb_config: dict[str, Any] | None = None, run_id: str | None = None
    ) -> None:
        self.enabled = enabled
        self.run_id = run_id
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
            **({"run_id": self.run_id} if self.run_id else {}),
            "time": round(now, 3),
            "elapsed_s": round(now - self.opened, 3),
        }
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot write: {describe_os_error(exc)}; the checkpoints are intact"
            ) from None
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=int(values["iter"]))

    def truncate_after(self, iter_num: int) -> None:
        """On resume, drop the records written after the checkpoint's iteration (they are about to be redone).

        The file is never rewritten in place: the kept records go to a temporary file that replaces it atomically,
        so a kill at any moment leaves either the old file or the new one. A torn last line (a write cut short,
        e.g. by a full disk) is dropped with a one-line warning; a damaged line elsewhere is an error naming it.
        """
        if not (self.enabled and self.path.exists()):
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
        complete, tail = lines[:-1], lines[-1]  # the text after the last newline: "" unless a write was cut short
        kept = []
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(complete) and not tail:
                    tail = line
                    break
                raise UserError(f"{self.path}:{number}: not a JSON record; repair or remove that line") from None
            if record.get("iter", 0) <= iter_num:
                kept.append(line)
        if tail.strip():
            self.print(
                f"warning: {self.path}: dropped a torn last line ({len(tail)} characters of an unfinished record)"
            )
        atomic_write_bytes(
            self.path, "".join(line + "\n" for line in kept).encode("utf-8"), kept="the old metrics.jsonl"
        )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
