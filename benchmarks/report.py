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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks.launch import REPO_ROOT
from costserve.client import PRECISION_NAMES
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

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


#: The CPU flags (``/proc/cpuinfo``) that decide whether int8 or fp32 is cheaper: AVX2 and FMA serve fp32 well;
#: AVX-512, its VNNI and BF16 extensions, AVX-VNNI and AMX give int8 its fast dot products.
INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
#: Those of :data:`INT8_FLAGS` that make int8 fast: without any, int8 often costs more than fp32.
WIDE_INT8_FLAGS = INT8_FLAGS[2:]


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of :data:`INT8_FLAGS` the CPU has, from the first ``flags`` line of ``/proc/cpuinfo`` (or ``cpuinfo``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in INT8_FLAGS if flag in present]
    return []


def cpu_flags_text(present: Sequence[str]) -> str:
    """``avx2, fma; none of AVX-512/VNNI (avx512f, ...)``: the flags of :data:`INT8_FLAGS` present, and the absent."""
    wide = [flag for flag in WIDE_INT8_FLAGS if flag in present]
    has = ", ".join(flag for flag in INT8_FLAGS if flag in present) or "none of them"
    if not wide:
        return f"{has}; none of AVX-512/VNNI ({', '.join(WIDE_INT8_FLAGS)} absent)"
    absent = [flag for flag in INT8_FLAGS if flag not in present]
    return has + (f"; absent: {', '.join(absent)}" if absent else "")


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
        "cpu_flags": cpu_flags_text(cpu_flags()),
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
        f"- CPU flags for int8 vs fp32: {info.get('cpu_flags', 'not read')}",
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


# --------------------------------------------------------------------------- the cost profile


def model_info(target: str, model: str = "", timeout_s: float = 30.0) -> pb.ModelInfo:
    """``GetModelInfo`` of ``model`` (``""``: the server's default model), its latest version."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        return stub.GetModelInfo(pb.GetModelInfoRequest(model_name=model), timeout=timeout_s)


def cost_profile(info: pb.ModelInfo) -> dict[str, Any]:
    """A model's measured cost profile from its ``ModelInfo``, as figures for JSON and :func:`cost_profile_lines`.

    ``variants``: precision name -> ``batch_limit``, ``accuracy`` (None when not measured) and ``sizes``, batch
    size (a string, as JSON keys are) -> CPU and wall µs per image and the live batches folded in.
    """
    variants = {}
    for variant in info.variants:
        if not variant.cost_profile:
            continue
        variants[PRECISION_NAMES.get(variant.precision, str(variant.precision))] = {
            "batch_limit": variant.batch_limit,
            "accuracy": variant.accuracy if variant.HasField("accuracy") else None,
            "sizes": {
                str(cost.batch_size): {
                    "cpu_us": cost.cpu_seconds_per_image * 1e6,
                    "wall_us": cost.seconds_per_image * 1e6,
                    "live_batches": cost.live_batches,
                }
                for cost in variant.cost_profile
            },
        }
    return {"model": info.name, "version": info.version, "verdict": info.cost_verdict, "variants": variants}


def per_image_at_limit(variant: Mapping[str, Any], what: str = "cpu_us") -> float:
    """A variant's CPU (or with ``what`` ``"wall_us"``, wall) µs per image at its batch limit (NaN without it)."""
    size = variant["sizes"].get(str(variant["batch_limit"]))
    return float(size[what]) if size else float("nan")


def cheaper_variant(profile: Mapping[str, Any], margin: float) -> str | None:
    """The variant of ``profile`` with the lower CPU per image at its batch limit, when it beats the other by more
    than ``margin`` (the policy's own rule); None with no clear difference or fewer than two variants."""
    measured = sorted((per_image_at_limit(variant), name) for name, variant in profile["variants"].items())
    if len(measured) < 2 or any(cost != cost for cost, _ in measured):
        return None
    (best, name), (runner_up, _) = measured[0], measured[1]
    return name if best * (1 + margin) < runner_up else None


def cost_profile_table(profile: Mapping[str, Any] | pb.ModelInfo) -> str:
    """The profile as a Markdown table: per variant a CPU and a wall row, µs per image by batch size, the batch
    limit's cell in bold, and the live batches folded in."""
    figures = cost_profile(profile) if isinstance(profile, pb.ModelInfo) else profile
    variants = figures["variants"]
    sizes = sorted({int(size) for variant in variants.values() for size in variant["sizes"]})
    rows = []
    for name, variant in variants.items():
        for what, label in (("cpu_us", "CPU µs / image"), ("wall_us", "wall µs / image")):
            cells = []
            for size in sizes:
                cost = variant["sizes"].get(str(size))
                cell = fmt(cost[what]) if cost else "-"
                cells.append(f"**{cell}**" if size == variant["batch_limit"] else cell)
            live = sum(cost["live_batches"] for cost in variant["sizes"].values())
            rows.append([name, label, *cells, variant["batch_limit"], live])
    return markdown_table(["variant", "per image", *(f"batch {size}" for size in sizes), "batch limit",
                           "live batches"], rows)  # fmt: skip


def cost_profile_lines(profile: Mapping[str, Any] | pb.ModelInfo, margin: float | None = None) -> list[str]:
    """:func:`cost_profile_table`, then its verdict line (``ModelInfo.cost_verdict``) and, with ``margin``, the
    variant cheaper per image at its batch limit by more than that share."""
    figures = cost_profile(profile) if isinstance(profile, pb.ModelInfo) else profile
    if not figures["variants"]:
        return [f"`{figures['model']}` version {figures['version']}: no cost profile measured (an older server?)", ""]
    verdict_line = f"Verdict: **{figures['verdict']}**" if figures["verdict"] else "Verdict: (one variant)"
    if margin is not None and len(figures["variants"]) > 1:
        cheaper = cheaper_variant(figures, margin)
        verdict_line += (
            f"; cheaper per image here: **{cheaper}**"
            if cheaper
            else f"; no variant cheaper by more than {margin:.0%} (the policy then takes int8 as the cheaper)"
        )
    return [cost_profile_table(figures), "", verdict_line + ".", ""]
