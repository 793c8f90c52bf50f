"""What a server process uses, read from ``/proc``: CPU time per thread, resident memory, sampled in threads."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path


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


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid`` (user and system)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by the main thread of ``pid`` and by all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    main_thread = total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        total += seconds
        if int(tid) == pid:
            main_thread = seconds
    return main_thread, total


class CpuSampler:
    """Reads a server's CPU time at two moments inside the steady part of a timed run."""

    def __init__(self, pid: int, start_after_s: float, stop_after_s: float) -> None:
        self.pid = pid
        self.start_after_s = start_after_s
        self.stop_after_s = stop_after_s
        self.usage: tuple[float, float] | None = None  # cores used: (main thread, process)
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
            first, first_at = thread_cpu_seconds(self.pid), time.monotonic()
            time.sleep(max(0.0, self._began + self.stop_after_s - time.monotonic()))
            second, second_at = thread_cpu_seconds(self.pid), time.monotonic()
            elapsed = second_at - first_at
            if elapsed > 0:
                self.usage = ((second[0] - first[0]) / elapsed, (second[1] - first[1]) / elapsed)


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
