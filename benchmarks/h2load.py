"""h2load (Debian ``nghttp2-client``) as a gRPC load tool: run it on one request file and parse what it printed."""

from __future__ import annotations

import contextlib
import re
import struct
import subprocess
from pathlib import Path

from benchmarks.loadclient import LoadResult, LoadShape
from benchmarks.payloads import PREDICT


def h2load_version() -> str:
    """The first line of ``h2load --version``."""
    output = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=30).stdout
    return output.strip().splitlines()[0] if output.strip() else "h2load"


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def run_h2load(target: str, body_file: Path, plan: LoadShape, log_path: Path, method: str = PREDICT) -> LoadResult:
    """h2load: one connection, ``plan.streams`` concurrent streams posting ``body_file`` (a gRPC frame) to ``method``.

    For a duration after a warm-up, or a request count; per-request latencies come from its ``log_path``.
    """
    command = [
        "h2load", "-c", "1", "-t", "1", "-m", str(plan.streams),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(body_file), "--log-file", str(log_path),
    ]  # fmt: skip
    if plan.requests:
        command += ["-n", str(plan.requests)]
        time_limit = 120 + plan.requests / 100
    else:
        command += ["-D", f"{plan.duration_s:g}", "--warm-up-time", f"{int(plan.warmup_s * 1000)}ms"]
        time_limit = plan.duration_s + plan.warmup_s + 60
    command.append(f"http://{target}{method}")
    with contextlib.suppress(FileNotFoundError):
        log_path.unlink()
    done = subprocess.run(command, capture_output=True, text=True, timeout=time_limit)
    output = done.stdout + done.stderr
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", output)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if done.returncode != 0 or not (finished and counts and statuses):
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{output}")
    succeeded = int(counts.group(4))
    errors = int(counts.group(5)) + int(counts.group(6)) + int(counts.group(7))
    errors += sum(int(statuses.group(index)) for index in (2, 3, 4))
    latencies = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]) / 1000.0)
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    if not plan.requests:
        seconds = plan.duration_s  # h2load's req/s is over the measured window, warm-up excluded
    return LoadResult("h2load", succeeded, errors, seconds, float(finished.group(3)), latencies)
