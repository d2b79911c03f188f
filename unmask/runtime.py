"""Where and how the computation runs: device, dtype/autocast, DDP under torchrun, and what it runs on (versions,
peak FLOP/s for MFU)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from unmask.errors import ReportedByAnotherRank, UserError, report

# Set once this process has joined a torchrun process group: `unmask.cli.entry` then ends it with `exit_process`.
_process_group_started = False


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision on GPUs only: float32 runs (and CPU) use no autocast."""
        if self.dtype == torch.float32 or self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def shutdown(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def shared_user_errors(self) -> Iterator[None]:
        """Run a block on every rank, then agree on its user errors before any rank goes on to a collective.

        A user error that only some ranks see (rank 0 alone takes the out_dir lock) would otherwise end those ranks
        with one line while the others fail in their next collective with a backend traceback. Here every rank
        finishes the block and the ranks exchange their error messages (one all_gather_object). If any rank has
        one, the lowest rank holding each distinct message prints it (an error every rank sees is one line, not
        one per rank), all ranks pass a barrier, and only then does every rank raise (the others
        `ReportedByAnotherRank`: exit 2, silent). The barrier makes the line safe by construction: no rank exits
        before it is written, so torchrun, which stops the remaining workers when the first one fails, cannot stop
        the reporting rank before it printed. Only `UserError` is shared: any other exception ends its rank, and
        torchrun then stops the rest.
        """
        error: UserError | None = None
        try:
            yield
        except UserError as exc:
            if not self.ddp:
                raise
            error = exc
        if not self.ddp:
            return
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        if all(message is None for message in messages):
            return
        if error is not None and str(error) not in messages[: self.rank]:
            report(error)
        dist.barrier()
        if error is not None and error.reported:
            raise error
        reporter = next(rank for rank, message in enumerate(messages) if message is not None)
        raise ReportedByAnotherRank(f"rank {reporter} reported a user error")


DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
THREADS_HELP = (
    "CPU threads for torch. 0 (default): as many as the cores that are idle now (the cores minus the 1-minute load "
    "average, at least 1): threads that wait for each other on cores other jobs keep busy spin, and one thread can "
    "then be many times faster than torch's one per core."
)
MAX_THREADS = 1024


def auto_threads() -> int:
    """Threads for a run that did not choose: the idle cores now, at least 1, at most torch's default."""
    cores = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def set_threads(requested: int, flag: str = "--threads") -> int:
    """Apply --threads (0: `auto_threads`) to torch's intra-op pool; returns the number used."""
    if not 0 <= requested <= MAX_THREADS:
        raise UserError(f"{flag}={requested}: must be in [0, {MAX_THREADS}] (0: the idle cores)")
    threads = requested or auto_threads()
    torch.set_num_threads(threads)
    return threads


def check_device_name(name: str, flag: str = "--device") -> None:
    """One line for a device name torch would not understand (before torch turns it into a traceback)."""
    index = name.removeprefix("cuda:")
    if name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and index.isdigit()):
        return
    raise UserError(f"{flag}={name}: expected {DEVICE_NAMES}")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device of a --device value; every command resolves its device here."""
    check_device_name(name, flag)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag}={name}: CUDA is not available on this machine (use {flag}=cpu)")
    if name.startswith("cuda:") and int(name.removeprefix("cuda:")) >= torch.cuda.device_count():
        raise UserError(f"{flag}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag}=mps: MPS is not available on this machine (use {flag}=cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32 and device.type == "cpu":
        raise UserError(f"--dtype={name} is for GPUs; use --dtype=float32 (or auto) on the CPU")
    return dtype


def init_runtime(device_name: str, dtype_name: str, backend: str) -> Runtime:
    """Single process, or one DDP process per `torchrun` worker (RANK/LOCAL_RANK/WORLD_SIZE set)."""
    if "RANK" not in os.environ:
        device = resolve_device(device_name)
        return Runtime(device=device, dtype=resolve_dtype(dtype_name, device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    global _process_group_started
    dist.init_process_group(backend=backend)
    _process_group_started = True
    return Runtime(device, resolve_dtype(dtype_name, device), rank, local_rank, world_size)


def process_group_started() -> bool:
    """Whether this process joined a torchrun process group (it must then end through `exit_process`)."""
    return _process_group_started


def exit_process(code: int) -> NoReturn:
    """End a torchrun worker with `code` once all its output is written, without finalizing the interpreter.

    Why not a normal exit: the process group's worker threads (gloo's) are not joined by destroy_process_group,
    and one of them can still hold the last reference to a finished collective's work and the tensors Python
    handed to it. Gloo completes a work (which is all that wait(), a barrier or destroy_process_group can observe)
    inside the thread's `execute` and drops its own references to it only afterwards, so no wait, barrier or `del`
    on the Python side orders that release before interpreter shutdown; waiting longer (gc, sleep) only makes it
    rarer. When that release needs the GIL (a Python-created tensor) just as the interpreter starts finalizing,
    CPython ends the thread with pthread_exit once it gets the GIL, and the unwind through a noexcept destructor
    calls std::terminate: SIGABRT after a run that trained, saved and printed its summary.

    `os._exit` makes that impossible rather than unlikely: the interpreter never starts finalizing, so any
    release before this call takes the GIL normally, and any later one never happens (the kernel ends every thread
    at once). Everything a normal exit does before finalizing still happens: the atexit handlers run here (they
    run with the interpreter intact on a normal exit too: logging's flush, wandb's cleanup after an error), then
    stdout and stderr are flushed. The run's own files are already complete: checkpoints and config.json are
    written atomically, metrics.jsonl is closed after every record, and the out_dir lock is a flock the kernel
    releases; unmask starts no non-daemon thread that a normal exit would wait for. Single-process runs never get
    here: they exit normally.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more can be written
            stream.flush()
    os._exit(code)


# Dense bf16/fp16 tensor-core peaks (vendor data sheets), for MFU; matched against torch's device name.
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s at the run's dtype when known (CUDA GPUs in the table, bf16/fp16); else None."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_FLOPS if key in name), None)


@functools.cache
def _git_commit() -> str | None:
    """The commit of the checkout this package runs from (with "-dirty" for local changes), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment_record() -> dict[str, Any]:
    """What produced a run, recorded in config.json and checkpoints: unmask and torch versions, the git commit."""
    from unmask import __version__

    return {"versions": {"unmask": __version__, "torch": str(torch.__version__), "git_commit": _git_commit()}}
