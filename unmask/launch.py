"""`python -m unmask.launch`: torchrun, with the same flags and the same elastic agent, whose exit code keeps the
workers' meaning.

torchrun itself exits 1 whenever anything but a clean finish happened: `torch.distributed.launcher.api` raises
`ChildFailedError` when any worker exits non-zero (a user error's 2, a graceful stop's 143) and re-raises the
`SignalException` of a SIGTERM or SIGINT the launcher received (after forwarding the signal to its workers and
waiting for them), and `torch.distributed.run.main` lets both end the interpreter with status 1 and a traceback.
No torchrun flag changes that. This module runs the same `torch.distributed.run.run` and exits with:

- 0: every worker exited 0;
- 128 + N (143 for SIGTERM, 130 for SIGINT): the launcher received signal N, forwarded it, and its workers
  stopped (with a checkpoint, see unmask.training.preemption);
- the failed workers' common exit code when they agree (a signal N as 128 + N): 2 when every failed worker
  reported a user error (one line in all, see `Runtime.shared_user_errors`), 143 / 130 when the signal went to the
  workers or to another node's launcher; for these three the workers have said what happened and torchrun's
  report is left out;
- 1 otherwise (workers that disagree), with torchrun's "Root Cause" report, as torchrun.

    python -m unmask.launch --standalone --nproc_per_node=2 -m unmask train --device=cpu --out_dir=out/ddp
"""

from __future__ import annotations

import logging
import signal
import sys

from unmask.errors import EXIT_USER_ERROR

# Exit codes whose workers already printed what happened (one line each kind): no torchrun report after them.
REPORTED = frozenset({EXIT_USER_ERROR, 128 + signal.SIGINT, 128 + signal.SIGTERM})
# The agent's logger that announces the first failed worker ("failed (exitcode: 2) local_rank: 0 ...").
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def _not_a_reported_failure(record: logging.LogRecord) -> bool:
    """Drop the agent's "failed (exitcode: N)" line when N is one the worker explained in its own line."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (str(record.msg).startswith("failed (exitcode: %s)") and args and args[0] in REPORTED)


def exit_status(code: int) -> int:
    """A worker's exit code as a shell reports it: a death by signal N (torch's -N) is 128 + N."""
    return 128 - code if code < 0 else code


def failed_code(codes: list[int]) -> int:
    """The launcher's code for failed workers: theirs when they agree, else 1 (torchrun's)."""
    statuses = {exit_status(code) for code in codes}
    return statuses.pop() if len(statuses) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger(AGENT_LOGGER).addFilter(_not_a_reported_failure)
    try:
        record(run)(args)  # torchrun's main: `record` writes the root cause to TORCHELASTIC_ERROR_FILE for schedulers
    except ChildFailedError as exc:
        code = failed_code([failure.exitcode for failure in exc.failures.values()])
        if code not in REPORTED:
            print(exc, file=sys.stderr)
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # SIGINT before the agent installed its handlers (during the rendezvous)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
