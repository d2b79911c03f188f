"""Graceful stops: SIGTERM (a scheduler's preemption) or Ctrl-C ends training with a checkpoint, not lost work.

The first SIGTERM or SIGINT only sets a flag; the trainer finishes the optimizer step in progress, writes a
checkpoint of that exact state (no evaluation, so the curriculum sees the same evaluations as an uninterrupted run)
and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention. A second signal
gets the default behaviour back, so a stuck run can still be killed. Under DDP the flag is all-reduced after every
step: a signal delivered to one rank stops every rank at the same step, and nobody waits in a collective for a rank
that has left (docs/origin.md §4.1; Lightning's and torchtitan's preemption handling do the same).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of `unmask --help` (the CLI imports TrainingInterrupted)
    from unmask.runtime import Runtime

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Raised by the trainer after it saved the state of an interrupted run."""

    def __init__(self, signum: int, iteration: int, path: str | None) -> None:
        self.signum, self.iteration, self.path = signum, iteration, path
        name = signal.Signals(signum).name
        where = f"saved checkpoint {path}" if path else "checkpoint written by rank 0"
        super().__init__(
            f"received {name}: stopped after iteration {iteration}, {where}; continue with --init_from=resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignal:
    """Context manager: while active, SIGTERM/SIGINT set `received` instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it does nothing and signals act as usual.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        # Acknowledge at once (an evaluation can take minutes): the stop itself waits for the next safe point.
        name = signal.Signals(signum).name
        sys.stderr.write(
            f"unmask: received {name}: stopping with a checkpoint after the current step or evaluation; "
            f"send {name} again to stop at once\n"
        )
        sys.stderr.flush()
        # A second signal acts as if we had never intervened (SIGINT: KeyboardInterrupt; SIGTERM: terminate).
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, runtime: Runtime) -> int | None:
        """The signal to stop for, the same on every rank (one small all-reduce per step under DDP)."""
        if not runtime.ddp:
            return self.received
        import torch

        flag = torch.tensor([self.received or 0], dtype=torch.long, device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
