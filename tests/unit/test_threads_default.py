"""The --threads default: idle cores judged from /proc/stat now (not the lagging load average), with fallbacks."""

from __future__ import annotations

import pytest

from unmask import runtime
from unmask.runtime import CpuTimes, idle_cores, parse_proc_stat, threads_for_idle

# Two CPUs; fields: user nice system idle iowait irq softirq steal guest guest_nice.
STAT_BEFORE = """cpu  300 10 60 1600 40 0 5 0 0 0
cpu0 100 5 30 800 20 0 5 0 0 0
cpu1 200 5 30 800 20 0 0 0 0 0
intr 1097341 0 0 0
ctxt 123
cpu7x 1 2 3 4
"""


def stat(cpu0: tuple[int, int], cpu1: tuple[int, int]) -> str:
    """STAT_BEFORE with (busy user ticks, idle ticks) added to each CPU."""
    (b0, i0), (b1, i1) = cpu0, cpu1
    return f"cpu0 {100 + b0} 5 30 {800 + i0} 20 0 5 0 0 0\ncpu1 {200 + b1} 5 30 {800 + i1} 20 0 0 0 0 0\n"


def test_parse_proc_stat() -> None:
    cpus = parse_proc_stat(STAT_BEFORE)
    assert cpus == {0: CpuTimes(idle=820, total=960), 1: CpuTimes(idle=820, total=1055)}  # aggregate line skipped
    # Guest time is already inside user/nice: columns past steal do not count twice. Old kernels: fewer columns.
    assert parse_proc_stat("cpu3 1 2 3 4 5 6 7 8 900 900\ncpu4 1 1 1 7\n") == {
        3: CpuTimes(idle=9, total=36),
        4: CpuTimes(idle=7, total=10),
    }
    assert parse_proc_stat("cpu0 1 2 x 4\ncpu1 1 2\nnot a stat file\n") == {}


@pytest.mark.parametrize(
    ("cpu0", "cpu1", "own", "cpus", "expected"),
    [
        ((0, 15), (0, 15), 0.0, {0, 1}, 2.0),  # both idle now (whatever the load average says)
        ((15, 0), (0, 15), 0.0, {0, 1}, 1.0),  # another job keeps one core busy
        ((15, 0), (15, 0), 0.0, {0, 1}, 0.0),  # both busy
        ((15, 0), (0, 15), 15.0, {0, 1}, 2.0),  # the busy core was this process itself: free for its threads
        ((15, 0), (0, 15), 0.0, {1}, 1.0),  # only the CPUs of the affinity mask count
        ((15, 0), (0, 15), 0.0, {0}, 0.0),
        ((6, 9), (0, 15), 0.0, {0, 1}, 1.6),  # a core 40 % busy is 0.6 of an idle one
    ],
)
def test_idle_cores(cpu0: tuple[int, int], cpu1: tuple[int, int], own: float, cpus: set[int], expected: float) -> None:
    before, after = parse_proc_stat(STAT_BEFORE), parse_proc_stat(stat(cpu0, cpu1))
    assert idle_cores(before, after, cpus, own) == pytest.approx(expected)


def test_idle_cores_without_an_interval() -> None:
    before = parse_proc_stat(STAT_BEFORE)
    assert idle_cores(before, before, {0, 1}) is None  # no tick passed
    assert idle_cores(before, parse_proc_stat(stat((1, 1), (1, 1))), {5}) is None  # no CPU of the mask listed


@pytest.mark.parametrize(
    ("cores", "idle", "expected"),
    [(2, 2.0, 2), (2, 1.6, 2), (2, 1.4, 1), (2, 1.0, 1), (2, 0.0, 1), (4, 2.9, 3), (2, 3.5, 2), (1, 1.0, 1)],
)
def test_threads_for_idle(cores: int, idle: float, expected: int) -> None:
    assert threads_for_idle(cores, idle) == expected


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A 2-core machine whose 1-minute load average is 1.9 (a job just ended); returns the sleeps taken."""
    sleeps: list[float] = []
    monkeypatch.setattr(runtime, "_TORCH_THREADS", 2)
    monkeypatch.setattr(runtime, "_usable_cpus", lambda: {0, 1})
    monkeypatch.setattr(runtime.time, "sleep", sleeps.append)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    return sleeps


def test_right_after_another_job_the_idle_cores_count(monkeypatch: pytest.MonkeyPatch, two_cores: list[float]) -> None:
    """The load average (1.9) still counts the finished job; /proc/stat shows both cores idle now: 2 threads.
    The old default (cores minus the load average) took 1 here, and training ran 1.8x slower."""
    readings = iter([parse_proc_stat(STAT_BEFORE), parse_proc_stat(stat((0, 15), (0, 15)))])
    monkeypatch.setattr(runtime, "_read_proc_stat", lambda: next(readings))
    assert runtime.auto_threads() == 2 and two_cores == [runtime.IDLE_SAMPLE_SECONDS]
    readings = iter([parse_proc_stat(STAT_BEFORE), parse_proc_stat(stat((15, 0), (0, 15)))])
    assert runtime.auto_threads() == 1  # one core busy now


def test_without_proc_stat_the_load_average_decides(monkeypatch: pytest.MonkeyPatch, two_cores: list[float]) -> None:
    monkeypatch.setattr(runtime, "_read_proc_stat", lambda: None)
    assert runtime.auto_threads() == 1 and two_cores == []  # 2 - 1.9 idle cores; nothing to wait for

    def no_load_average() -> tuple[float, float, float]:
        raise OSError("not available")

    monkeypatch.setattr(runtime.os, "getloadavg", no_load_average)
    assert runtime.auto_threads() == 2  # nothing to judge by: torch's default


def test_the_real_machine() -> None:
    assert 1 <= runtime.auto_threads(seconds=0.01) <= runtime._TORCH_THREADS
