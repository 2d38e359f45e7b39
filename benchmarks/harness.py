"""What the performance scripts measure with, in one place.

- `run_child`: a command in a child process: exit code, output, wall time, CPU time and the peak
  RSS of its whole process tree.
- `load_average` / `load_text`: the machine's 1/5/15-minute load, printed next to every figure
  because the cores are shared and the load changes between runs.
- `compare`: ours and the baselines in the same invocation, best of N each, and their speed ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

# The peak RSS of a tree is the larger of two lower bounds of it:
# (a) the largest sum of the RSS of all processes of the tree, sampled every RSS_INTERVAL_S with
#     psutil: sees workers side by side, but misses a spike shorter than the interval (and a
#     child that lives a tenth of a second is nearly all spike);
# (b) the kernel's high-water mark for the child (wait4's ru_maxrss, which covers the child and
#     the descendants it waited for): exact, spikes included, but of the largest single process
#     only, so a parent with two workers reads as one worker.
# For a single process the result is exact. The kernel carries the high-water mark of the
# forking process over fork + exec into the child's figure, so (b) is only right for a child
# forked from a small process: every command therefore runs under LAUNCHER, a bare interpreter
# (`python -S -I`, about 10 MB) that spawns it, reaps it with wait4 and reports the figures, so a
# parent that holds gigabytes still measures its children correctly. RUSAGE_CHILDREN is not used:
# it covers every child this process ever reaped, so it cannot tell one child from the one before.
# Pages shared after fork count once per process, so for a forking tree (a) overstates physical memory.
RSS_INTERVAL_S = 0.05

# argv: report_fd command...; writes "status wall_s cpu_s maxrss_kib" (or "error errno strerror")
# to report_fd. Times are the command's alone: the launcher's own start-up is not in them.
LAUNCHER = """
import os, sys, time
report, argv = int(sys.argv[1]), sys.argv[2:]
started = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as e:
    os.write(report, f"error {e.errno} {e.strerror}".encode())
    sys.exit(1)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
os.write(report, f"{status} {wall!r} {usage.ru_utime + usage.ru_stime!r} {usage.ru_maxrss}".encode())
"""


@dataclass(frozen=True)
class ChildRun:
    """One finished child process. `cpu_s` is user + system time of the child and of the
    descendants it waited for; `stderr` is empty when it was merged into `stdout`."""

    command: tuple[str, ...]
    exit_code: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def last_stdout_line(self) -> str:
        """The last line the child printed (the scripts' children print their figure last)."""
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


def tree_rss_bytes(pid: int, include_root: bool = True) -> int:
    """The summed RSS of a process (unless not `include_root`) and all its descendants right
    now; 0 once they are gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root] if include_root else []
        tree += root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for proc in tree:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited (or became a zombie) between the listing and the reading
            continue
    return total


@dataclass
class _PeakSampler:
    """Samples the RSS of `pid`'s descendants on a thread until `stop()`; keeps the largest sum."""

    pid: int
    interval_s: float
    peak_bytes: int = 0

    def __post_init__(self) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid, include_root=False))
            if self._stopped.wait(self.interval_s):
                return

    def stop(self) -> int:
        self._stopped.set()
        self._thread.join()
        return self.peak_bytes


def run_child(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    merge_stderr: bool = False,
    rss_interval_s: float = RSS_INTERVAL_S,
) -> ChildRun:
    """Run `command` to its end and measure it; a non-zero exit is reported, not raised (a
    command that cannot be started raises OSError, as subprocess does)."""
    report_read, report_write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", LAUNCHER, str(report_write), *command],
            env=None if env is None else dict(env), cwd=cwd, pass_fds=(report_write,), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(report_write)
    sampler = _PeakSampler(proc.pid, rss_interval_s)
    stdout, stderr = proc.communicate()
    sampled_peak = sampler.stop()
    with os.fdopen(report_read) as report:
        text = report.read()
    if text.startswith("error "):
        _, errno, strerror = text.split(" ", 2)
        raise OSError(int(errno), strerror, command[0])
    fields = text.split()
    if len(fields) != 4:
        raise RuntimeError(f"the launcher of {command[0]} exited {proc.returncode} without a report:\n"
                           f"{(stderr or stdout)[-3000:]}")
    status, wall_s, cpu_s, maxrss_kib = fields
    return ChildRun(
        command=tuple(command), exit_code=os.waitstatus_to_exitcode(int(status)),
        wall_s=float(wall_s), cpu_s=float(cpu_s),
        peak_rss_bytes=max(sampled_peak, int(maxrss_kib) * 1024),  # ru_maxrss is in KiB on Linux
        stdout=stdout, stderr=stderr or "",
    )  # fmt: skip


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages."""
    return os.getloadavg()


def load_text(load: tuple[float, float, float] | None = None) -> str:
    """The load averages as /proc/loadavg prints them: `0.52 0.61 0.70` (now, unless given)."""
    return " ".join(f"{x:.2f}" for x in (load if load is not None else load_average()))


Result = TypeVar("Result")


@dataclass(frozen=True)
class Comparison(Generic[Result]):
    """The fastest run of each measurement, all taken in one invocation.

    `speed` maps a result to a higher-is-better figure (MB/s, 1 / seconds)."""

    best: dict[str, Result]
    speed: Callable[[Result], float]
    repeats: int

    def ratio(self, ours: str, baseline: str, speed: Callable[[Result], float] | None = None) -> float:
        """speed(ours) / speed(baseline) of the best runs: above 1, ours is faster. `speed` may
        name another figure of the same runs (MB per CPU-second next to MB per second)."""
        figure = speed or self.speed
        return figure(self.best[ours]) / figure(self.best[baseline])


def compare(
    measurements: Mapping[str, Callable[[], Result]],
    speed: Callable[[Result], float],
    repeats: int = 1,
    on_result: Callable[[str, Result], None] | None = None,
) -> Comparison[Result]:
    """Run every measurement `repeats` times and keep the fastest run of each.

    The runs go round by round, each round all measurements in the given order, so a change of
    load during the invocation falls on ours and on the baselines alike. `on_result(name, result)`
    is called after every run (to print figures as they come)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best: dict[str, Result] = {}
    for _ in range(repeats):
        for name, measure in measurements.items():
            result = measure()
            if on_result is not None:
                on_result(name, result)
            if name not in best or speed(result) > speed(best[name]):
                best[name] = result
    return Comparison(best=best, speed=speed, repeats=repeats)
