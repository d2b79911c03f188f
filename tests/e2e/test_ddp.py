"""Two-process DDP on the CPU (gloo) through the real torchrun launcher (and `python -m unmask.launch`, torchrun
with meaningful exit codes): train, checkpoint, resume; exit codes; user errors seen by one rank; graceful stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_flags
from unmask.storage import run_dir

TORCHRUN = ("-m", "torch.distributed.run")
LAUNCH = ("-m", "unmask.launch")
# The one line of torchrun's own agent that may follow a user error: the first worker to exit failed while another
# was still exiting, and the agent stopped that one (torch's glog-style format, "W0515 18:20:01.123000 1234 ...]").
_AGENT_STOPS_A_WORKER = re.compile(r"^W\d{4} [\d:.]+ +\d+ \S+:\d+\] Sending process \d+ closing signal SIGTERM$")


def _command(launcher: tuple[str, ...], args: tuple[str, ...]) -> list[str]:
    return [sys.executable, *launcher, "--standalone", "--nproc_per_node=2", "-m", "unmask", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str, cwd: Path, launcher: tuple[str, ...] = TORCHRUN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(launcher, args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_gloo_train_and_resume(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = _torchrun("train", *tiny_flags(tiny_data, out, max_iters=8), cwd=tmp_path)
    # Exit 0 every time: a worker that aborted at exit (a gloo thread releasing a tensor during interpreter
    # shutdown, see unmask.runtime.exit_process) made this fail in about one run of ten.
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    assert done.stdout.count("step 8: train loss") == 1  # only rank 0 prints
    assert "world size 2" in done.stdout
    ckpt = torch.load(out / "ckpt_unmasking_8.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # every rank's data and masking streams are saved
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])

    # The resume goes through unmask.launch: the same agent and workers, exit 0 too.
    done = _torchrun("train", "--init_from=resume", f"--out_dir={out}", "--max_iters=12", cwd=tmp_path, launcher=LAUNCH)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 4, 8, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # The 12 validation samples are sharded over the ranks and all-reduced: all are counted once.
    assert sum(evals[-1][f"val_stage_{i}_samples"] for i in range(4)) == 12  # the default curriculum: four stages

    # Resuming with a different number of processes would silently change the data streams: refused.
    from unmask.cli import main

    assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=16"]) == 2


def test_a_torchrun_worker_exits_without_finalizing_the_interpreter() -> None:
    """A worker that joined a process group ends through os._exit: its atexit handlers run and its output is
    flushed, but the interpreter never finalizes (an object that would be collected then never is), so no gloo
    thread can release a tensor during shutdown."""
    code = (
        "import atexit, sys\n"
        "from unmask import cli, runtime\n"
        "class Finalized:\n"
        "    def __del__(self): print('finalized', flush=True)\n"
        "kept = Finalized()\n"
        "atexit.register(print, 'atexit ran')\n"
        "runtime._process_group_started = True  # what init_runtime sets under torchrun\n"
        "sys.argv = ['unmask', 'nonsense']\n"
        "print('unbuffered output', end='')\n"
        "cli.entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # the command's own exit code (an unknown command)
    assert done.stdout == "unbuffered outputatexit ran\n"
    assert done.stderr.startswith("unmask nonsense: error: nonsense: unknown command")


# Two torchrun workers: rank 0 hands a tensor to an all_reduce and exits; rank 1 joins that all_reduce only once
# rank 0 is in its last atexit handlers, which run in C with no Python code in between: a marker directory, then a
# sum that holds the GIL. Gloo's thread on rank 0 completes the work meanwhile and waits for the GIL to release it;
# after a normal exit the interpreter is finalizing by the time it gets the GIL, CPython ends the thread with
# pthread_exit and std::terminate aborts the worker (in every trial before the fix). unmask's exit never finalizes.
_LATE_RELEASE = """
import atexit, os, sys
if os.environ["RANK"] == "0":
    atexit.register(sum, range(60_000_000))  # registered first: run last
    atexit.register(os.mkdir, sys.argv[1])
import time
import torch
import torch.distributed as dist
from unmask import cli
from unmask.runtime import init_runtime

runtime = init_runtime("cpu", "auto", "gloo")
if runtime.rank == 0:
    work = dist.all_reduce(torch.ones(1000), async_op=True)
    del work  # gloo's thread now holds the only reference
else:
    while not os.path.isdir(sys.argv[1]):  # rank 0 is in its atexit handlers
        time.sleep(0.01)
    dist.all_reduce(torch.ones(1000))
sys.argv = ["unmask", "--version"]
cli.entry()
"""


@pytest.mark.slow
def test_a_collective_released_during_exit_cannot_abort_a_worker(tmp_path: Path) -> None:
    script = tmp_path / "late_release.py"
    script.write_text(_LATE_RELEASE)
    cmd = [sys.executable, *TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "exiting")]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("unmask ") == 2  # both workers ran the command (`--version`) and flushed its output


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_graceful_stop_through_the_launcher_exits_128_plus_the_signal(
    tiny_data: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """torchrun exits 1 after any stop; unmask.launch (the same agent) exits 143 for SIGTERM, 130 for SIGINT."""
    out = tmp_path / "run"
    cmd = _command(LAUNCH, ("train", *tiny_flags(tiny_data, out, max_iters=100_000)))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # rank 0's log: training is under way
        if line.startswith("iter "):
            break
    proc.send_signal(signum)  # to the launcher, as a scheduler or Ctrl-C would: torchrun forwards it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "terminate called" not in stderr
    stops = re.findall(rf"received {signum.name}: stopped after iteration (\d+), saved checkpoint (\S+);", stderr)
    assert len(stops) == 1, stderr[-3000:]  # rank 0 names the checkpoint, the other rank says rank 0 wrote it
    step, path = stops[0]
    assert torch.load(path, weights_only=True)["iter_num"] == int(step)
    assert json.loads(Path(path).with_suffix(".json").read_text())["stopped_by"] == signum.name


def _occupy(out: Path, case: str) -> str:
    """Prepare `out` so that the run fails with a user error; returns a part of the expected line."""
    out.mkdir(parents=True)
    if case == "locked":  # another run holds out_dir: rank 0 alone takes the lock, so rank 0 alone sees it
        run_dir.RunLock(out).acquire("elsewhere")  # held by this test process until it ends
        return f"--out_dir={out}: in use by run elsewhere"
    if case == "occupied":  # another run's files: every rank sees them
        run_dir.write_manifest(out, "previous")
        return f"--out_dir={out}: holds run previous"
    # The sidecar of the first checkpoint cannot be written (a directory under its name): rank 0 alone fails,
    # in the middle of training.
    (out / "ckpt_unmasking_4.json").mkdir()
    return f"{out / 'ckpt_unmasking_4.json'}: cannot write"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["locked", "occupied", "checkpoint_write"])
def test_a_user_error_under_ddp_is_one_line_and_exit_2(tiny_data: Path, tmp_path: Path, case: str) -> None:
    """Whether one rank or every rank sees a user error, the run prints its one line once and every rank exits 2
    (no rank fails in a collective the others left); unmask.launch then exits 2 without torchrun's report."""
    out = tmp_path / "run"
    expected = _occupy(out, case)
    done = _torchrun("train", *tiny_flags(tiny_data, out, max_iters=8), cwd=tmp_path, launcher=LAUNCH)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if not _AGENT_STOPS_A_WORKER.match(line)]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("unmask train: error: ") and expected in lines[0], lines


def test_the_launcher_keeps_the_workers_exit_code_when_they_agree() -> None:
    import logging

    from unmask.launch import _not_a_reported_failure, failed_code

    assert failed_code([2, 2]) == 2  # a user error on every rank
    assert failed_code([143]) == 143  # a stop signalled to the workers (or to another node's launcher)
    assert failed_code([-9, -9]) == 128 + 9  # killed by SIGKILL, as a shell reports it
    assert failed_code([2, 143]) == failed_code([1]) == 1  # they disagree, or crashed: torchrun's code
    line = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
    agent = [logging.LogRecord("a", logging.ERROR, "f", 1, line, (code, 0, 1, "python"), None) for code in (2, 1)]
    assert [_not_a_reported_failure(record) for record in agent] == [False, True]  # only the explained one is dropped
