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
from unmask.storage.run_dir import METRICS

_MAX_WARNINGS = 5  # lines named one by one; more are counted in one line


def _read_record(line: str, torn: bool) -> dict[str, Any] | str:
    """The metrics record on `line` (a JSON object whose `iter` is an integer), or what the line is instead."""
    if torn:
        return f"a torn last line ({len(line)} characters of an unfinished record)"
    shown = line if len(line) <= 40 else line[:37] + "..."
    try:
        record = json.loads(line)
    except RecursionError:  # nested deeper than the parser recurses: certainly not a flat record
        return f"a line that is not a metrics record (JSON nested too deep: {shown})"
    except ValueError:
        return f"a line that is not JSON ({shown})"
    it = record.get("iter") if isinstance(record, dict) else None
    if not isinstance(it, int) or isinstance(it, bool):
        return f"a line that is not a metrics record (no integer iter: {shown})"
    return record


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
        self.path = out_dir / METRICS
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
        so a kill at any moment leaves either the old file or the new one. A line that is not a record (a torn last
        line of a write cut short, e.g. by a full disk; or anything else that is not a JSON object with an integer
        `iter`) is dropped with a warning naming it (file:line): the log must never stop a resume. OS errors are one
        line naming the file."""
        if not (self.enabled and self.path.exists()):
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read: {describe_os_error(exc)}; the checkpoints are intact") from None
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the file ends with a newline, as every complete write leaves it
        kept, dropped = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _read_record(line, torn=number == len(lines) and not text.endswith("\n"))
            if isinstance(record, str):
                dropped.append(f"{self.path}:{number}: dropped {record}")
            elif record["iter"] <= iter_num:
                kept.append(line)
        for warning in dropped[:_MAX_WARNINGS]:
            self.print(f"warning: {warning}")
        if len(dropped) > _MAX_WARNINGS:
            self.print(
                f"warning: {self.path}: dropped {len(dropped) - _MAX_WARNINGS} more line(s) that are not records"
            )
        atomic_write_bytes(
            self.path, "".join(line + "\n" for line in kept).encode("utf-8"), kept="the old metrics.jsonl"
        )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
