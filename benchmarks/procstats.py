"""What server processes use, read from ``/proc``: CPU time per thread, resident memory, sampled in threads.

Processes are named by pid; a group of them (the workers of one server, the load tool's
processes) is summed. A process that is gone counts 0.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

#: The pids of a group of processes, or a function that finds them when the first reading is taken
#: (processes that start with the run, such as the load tool's).
PidSource = Sequence[int] | Callable[[], Sequence[int]]


def memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a process, in bytes (empty once it is gone)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def vm_rss(pid: int) -> int:
    """Resident memory of a process, in bytes (0 once it is gone)."""
    return memory(pid).get("VmRSS", 0)


def _stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name (which may hold spaces): state is [0]."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid`` (user and system)."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by the main thread of ``pid`` and by all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    main_thread = total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        total += seconds
        if int(tid) == pid:
            main_thread = seconds
    return main_thread, total


def cpu_seconds(pids: Iterable[int]) -> dict[int, tuple[float, float]]:
    """:func:`thread_cpu_seconds` of each of ``pids`` still running: pid -> (main thread, all threads)."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            seconds[pid] = thread_cpu_seconds(pid)
    return seconds


def host_busy_seconds() -> float:
    """CPU seconds every core of the host has spent busy so far (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on (from the parent pids in ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents.setdefault(int(_stat_fields(f"/proc/{entry}/stat")[1]), []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def command_name(pid: int) -> str:
    """The process's command name (``/proc/PID/comm``: the executable's name, at most 15 characters); "" once gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def maps_file_containing(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped into the process (a shared library it loaded)."""
    try:
        return any(fragment in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    except OSError:
        return False


class CpuSampler:
    """Reads the CPU time of groups of processes at two moments inside the steady part of a timed run.

    ``groups`` names each group's pids (see :data:`PidSource`). Once the run is over,
    :attr:`usage` holds per group the cores used between the two readings, as
    ``(main threads, all threads)`` summed over the group's processes, :attr:`per_process`
    the same per pid, and :attr:`host_busy` the cores the whole host kept busy (every
    process, and the kernel's own work such as the loopback network); all stay None when a
    reading failed. Use it as a context manager around the run: the readings happen
    ``start_after_s`` and ``stop_after_s`` after entering it.
    """

    def __init__(self, groups: Mapping[str, PidSource], start_after_s: float, stop_after_s: float) -> None:
        self.groups = groups
        self.start_after_s = start_after_s
        self.stop_after_s = stop_after_s
        self.usage: dict[str, tuple[float, float]] | None = None
        self.per_process: dict[int, tuple[float, float]] | None = None
        self.host_busy: float | None = None
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join(timeout=self.stop_after_s + 30)

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            time.sleep(max(0.0, self._began + self.start_after_s - time.monotonic()))
            members = {name: list(pids() if callable(pids) else pids) for name, pids in self.groups.items()}
            every_pid = [pid for pids in members.values() for pid in pids]
            first, first_host, first_at = cpu_seconds(every_pid), host_busy_seconds(), time.monotonic()
            time.sleep(max(0.0, self._began + self.stop_after_s - time.monotonic()))
            second, second_host, second_at = cpu_seconds(every_pid), host_busy_seconds(), time.monotonic()
            elapsed = second_at - first_at
            if elapsed <= 0:
                return
            # A process gone by the second reading counts 0 (its last CPU time is not readable).
            per_process = {
                pid: (
                    (second.get(pid, before)[0] - before[0]) / elapsed,
                    (second.get(pid, before)[1] - before[1]) / elapsed,
                )
                for pid, before in first.items()
            }
            self.usage = {
                name: (
                    sum(per_process.get(pid, (0.0, 0.0))[0] for pid in pids),
                    sum(per_process.get(pid, (0.0, 0.0))[1] for pid in pids),
                )
                for name, pids in members.items()
            }
            self.per_process = per_process
            self.host_busy = (second_host - first_host) / elapsed


class RssSampler:
    """Samples a process's VmRSS every second in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._started, vm_rss(self.pid)))
            self._stop.wait(1.0)

    def stop(self) -> list[tuple[float, int]]:
        """Stop sampling (one last sample) and return (seconds since start, bytes) pairs."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append((time.monotonic() - self._started, vm_rss(self.pid)))
        return self.samples
