"""Writing a benchmark's report: Markdown tables, the machine and code it ran on, hand-written notes kept."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.launch import REPO_ROOT

#: Everything after this line of an existing RESULTS.md is kept when the file is rewritten.
NOTES_MARKER = "<!-- Hand-written notes below this line are kept when the benchmark rewrites this file. -->"


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """How the benchmark was run, as the report states it: ``prog`` and its arguments."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def code_version() -> str:
    """The commit the servers ran from, and whether server/ or client/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "client", "protos"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit}{' with uncommitted changes in server/, client/ or protos/' if dirty else ''}"


def machine() -> dict[str, str]:
    """What the run ran on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"

    def version(*names: str) -> str:
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return f"{name} {importlib.metadata.version(name)}"
        return "not installed"

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu", "tensorflow"),
        "litert": version("ai-edge-litert"),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_section(info: dict[str, str], shared_by: str) -> list[str]:
    """The report's "## Machine" section; ``shared_by`` says who shares the cores."""
    return [
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores ({shared_by} share them)",
        f"- Memory: {info['memory']}",
        f"- OS: {info['os']}",
        f"- Python {info['python']}, {info['tensorflow']}, {info['litert']}, {info['grpcio']}, {info['protobuf']}",
        f"- Date: {info['date']}",
        "",
    ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the header, the separator, one line per row (cells as ``str()``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, spec: str = ".1f") -> str:
    """A figure, or "-" when it was not measured (None or NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def counts_text(counts: dict[str, int]) -> str:
    """``OK 12, INVALID_ARGUMENT 3`` (largest first), or "none"."""
    return ", ".join(f"{code} {count:,}" for code, count in sorted(counts.items(), key=lambda item: -item[1])) or "none"


def existing_notes(path: Path) -> str:
    """Whatever follows the notes marker in an existing report."""
    if not path.exists():
        return ""
    text = path.read_text()
    return text.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in text else ""


def write_results(output: Path, json_path: Path | None, results: dict[str, Any], render: Callable[[str], str]) -> None:
    """Write the report ``render(notes)`` to ``output``, keeping its hand-written notes, and the figures as JSON."""
    output.parent.mkdir(parents=True, exist_ok=True)
    notes = existing_notes(output) or "\n(no notes yet)\n"
    output.write_text(render(notes))
    print(f"wrote {output} ({results['elapsed_s']:.0f} s)")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
