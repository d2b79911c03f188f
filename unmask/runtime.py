"""Where and how the computation runs: device, dtype/autocast, DDP under torchrun, and what it runs on (versions,
peak FLOP/s for MFU)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import subprocess
import sys
import time
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
        """Mixed precision (autocast to the run's dtype) unless the run is float32; on the CPU too (bfloat16), so the
        autocast path that GPUs take is also what a CPU run and the test suite exercise."""
        if self.dtype == torch.float32:
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
MAX_THREADS = 1024
# How long `auto_threads` watches the CPUs: long enough for 15 clock ticks per CPU at Linux's 100 Hz, short against
# a command's start-up (importing torch alone takes longer). The 1-minute load average it replaces lagged: right
# after another job it still counted that job, and a run on an idle 2-core machine took 1 thread (1.8x slower).
IDLE_SAMPLE_SECONDS = 0.15
# torch's own choice before any --threads changed it (one per physical core, or OMP_NUM_THREADS): the most we use.
_TORCH_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class CpuTimes:
    """One CPU's cumulative time in clock ticks, from a `cpuN` line of /proc/stat."""

    idle: int  # idle + iowait: time the CPU had nothing to run
    total: int  # user + nice + system + idle + iowait + irq + softirq + steal (guest time is inside user/nice)


def parse_proc_stat(text: str) -> dict[int, CpuTimes]:
    """The per-CPU lines (`cpu0 ...`, `cpu1 ...`) of /proc/stat; the aggregate `cpu` line and others are skipped.
    Older kernels have fewer columns (missing ones count as 0); malformed lines are skipped."""
    cpus: dict[int, CpuTimes] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        try:
            ticks = [int(v) for v in rest.split()[:8]]
        except ValueError:
            continue
        if len(ticks) < 4:
            continue
        ticks += [0] * (8 - len(ticks))
        cpus[int(name[3:])] = CpuTimes(idle=ticks[3] + ticks[4], total=sum(ticks))
    return cpus


def idle_cores(
    before: dict[int, CpuTimes], after: dict[int, CpuTimes], cpus: set[int], own_ticks: float = 0.0
) -> float | None:
    """How many of `cpus` were idle between two /proc/stat readings (a fraction: 1.5 is one and a half cores),
    not counting `own_ticks` of this process's own CPU time as busy; None without a usable interval."""
    common = [c for c in cpus if c in before and c in after]
    total = sum(after[c].total - before[c].total for c in common)
    if not common or total <= 0:
        return None
    busy = sum((after[c].total - before[c].total) - (after[c].idle - before[c].idle) for c in common)
    busy_by_others = min(max(0.0, busy - own_ticks), total)
    return len(common) * (1.0 - busy_by_others / total)


def threads_for_idle(cores: int, idle: float) -> int:
    """Threads for `idle` idle cores out of `cores`: the idle cores rounded (a core counts when over half of it is
    free), at least 1, at most `cores`. A thread on a core another job keeps busy makes every other thread wait for
    it at each parallel region, which costs far more than the core it adds."""
    return max(1, min(cores, int(idle + 0.5)))


def _read_proc_stat(path: str = "/proc/stat") -> dict[int, CpuTimes] | None:
    try:
        with open(path, encoding="ascii") as f:
            return parse_proc_stat(f.read()) or None
    except (OSError, UnicodeDecodeError):
        return None


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: every CPU
        return set(range(os.cpu_count() or 1))


def auto_threads(seconds: float = IDLE_SAMPLE_SECONDS) -> int:
    """Threads for a run that did not choose: the cores of this process's CPU set that are idle now, judged from
    /proc/stat over `seconds`, at least 1 and at most torch's default. Without /proc/stat (not Linux), the cores
    minus the 1-minute load average; without that either, torch's default."""
    cpus = _usable_cpus()
    cores = max(1, min(_TORCH_THREADS, len(cpus)))
    before, own = _read_proc_stat(), time.process_time()
    if before is not None:
        time.sleep(seconds)
        after, own = _read_proc_stat(), time.process_time() - own
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        idle = idle_cores(before, after, cpus, own * ticks) if after is not None else None
        if idle is not None:
            return threads_for_idle(cores, idle)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores
    return threads_for_idle(cores, cores - load)


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
    """The compute dtype of --dtype on `device`. 'auto' is bfloat16 (float16 where unsupported) on CUDA, float32
    elsewhere: on the CPU bfloat16 is allowed (autocast runs there, which is how CI tests the GPUs' mixed-precision
    path) but rarely faster, so it is never the default."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        # float16 needs loss scaling and is for CUDA; bfloat16 has float32's range and needs none.
        raise UserError("--dtype=float16 is for GPUs; on the CPU use --dtype=bfloat16 or float32 (or auto)")
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


def check_attention_backend(backend: str, device: torch.device, flag: str = "--attention") -> None:
    """Refuse, in one line, a forced flex path for training where FlexAttention cannot train (its backward needs the
    CUDA kernel of compute capability >= 8.0; on the CPU it is forward-only)."""
    from unmask.model import HAVE_FLEX, flex_supported

    if backend == "flex" and not flex_supported(device):
        where = "PyTorch without FlexAttention" if not HAVE_FLEX else f"device {device}"
        raise UserError(
            f"{flag}=flex: FlexAttention trains only on CUDA GPUs of compute capability 8.0 or more, not on {where}; "
            f"use {flag}=auto (or sdpa)"
        )
