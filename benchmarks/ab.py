"""Interleaved A/B of the serving path: the working tree against an older commit, side by side.

Two ``make bench`` runs minutes apart drift with the host (a ceiling has moved from 0.83 to
1.40 ms between runs), so "no worse than before" is judged by serving both versions at once
and alternating them under the same load. ``make bench-ab REF=<commit>`` runs
``python -m benchmarks.ab --against REF``, which

1. checks REF out into a temporary git worktree (``git worktree add --detach``) and links a
   package tree to it: ``costserve/`` holds a link to each entry of the worktree's ``client/``
   and ``server`` links to its ``server/``. That tree comes first on the old server's
   PYTHONPATH, ahead of the editable install (whose finder setuptools appends to
   ``sys.meta_path``); the run checks that the old server imports from it;
2. starts both servers on 127.0.0.1 with /metrics off, serving the same model: the new one
   through :mod:`benchmarks.launch` on port 0, the old one likewise when its ``serve --help``
   knows ``--ready-file``. An older server cannot announce the port it bound, so it gets a
   port found free just before (tried again on another port if that one was taken meanwhile);
3. sends each scenario's request to each server once and checks the answer
   (:func:`benchmarks.serving.check_answer`);
4. for each round and each scenario of ``make bench`` that the default server serves (fp32
   and int8 with the cache bypassed, cache hits), saturates old and new in turn, the order
   flipping each round: one connection, 64 concurrent streams, 4 s measured after 1 s of
   warm-up, with h2load, or the Python ``grpc.aio`` client when h2load is missing. The
   event-loop (main) thread's CPU time is read from ``/proc`` inside the measured window;
5. reports per scenario the medians of old and new req/s, the median of the per-round
   ratios new/old with those ratios, and the event-loop CPU per request of each with its
   ratio; writes ``benchmarks/RESULTS-ab.md`` (keeping the notes below the marker) and, with
   ``--json``, every figure.

Both servers are stopped, and the worktree removed and pruned, on the way out whatever happens.

::

    python -m benchmarks.ab --against REF [--rounds N] [--quick] [--model-dir DIR]
                            [--output PATH] [--json PATH] [--tool auto|h2load|python]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from benchmarks.h2load import grpc_frame, h2load_version
from benchmarks.launch import (
    BENCHMARK_FLAGS,
    DEFAULT_MODEL_DIR,
    POLL_S,
    REPO_ROOT,
    ServerFailed,
    ServerProcess,
    costserve_command,
    ensure_model,
    server_env,
    start_costserve,
)
from benchmarks.loadclient import LoadResult, LoadShape
from benchmarks.payloads import request_bytes
from benchmarks.serving import SCENARIOS, check_answer, load_tool, nan_median, saturate
from costserve import Client

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "RESULTS-ab.md"
#: The scenarios of ``make bench`` that its default server serves through costserve.v1, the one API
#: every commit compared against has.
AB_SCENARIOS = tuple(scenario for scenario in SCENARIOS if scenario.server == "default" and scenario.protocol == "v1")
SIDES = ("old", "new")
STREAMS = 64
#: Ports tried for an old server that cannot announce its own (one may be taken meanwhile).
FREE_PORT_ATTEMPTS = 3
#: Prints where the old server's packages import from (they must come from the linked tree).
IMPORT_PROBE = "import costserve, costserve.server.cli as cli; print(costserve.__file__); print(cli.__file__)"
TABLE_HEADER = (
    "scenario", "old req/s", "new req/s", "new/old", "new/old per round",
    "old loop CPU/req (us)", "new loop CPU/req (us)", "new/old CPU",
)  # fmt: skip


@dataclass(frozen=True)
class Revision:
    """The commit the old server runs: its full hash, and ``short-hash subject``."""

    commit: str
    title: str


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m benchmarks.ab``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Interleaved A/B of the serving path, the working tree against an older commit; "
        "writes benchmarks/RESULTS-ab.md.",
    )
    parser.add_argument("--against", required=True, metavar="REF", help="the older commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of old and new alternating (default 4)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s runs (a smoke test of the benchmark)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help=f"model base directory both servers serve (default {DEFAULT_MODEL_DIR}; trained first when empty)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"markdown report (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON to this path")
    parser.add_argument(
        "--tool",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="saturation client: h2load when installed (auto), or the grpc.aio Python client",
    )
    return parser


# --------------------------------------------------------------------------- the old commit


def git(*args: str) -> str:
    """``git ARGS`` in the repository; its output. Exits with git's message when it fails."""
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve(ref: str) -> Revision:
    """The commit ``ref`` names. Exits when it names none."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except SystemExit:
        raise SystemExit(f"--against {ref}: not a commit of {REPO_ROOT}") from None
    return Revision(commit, git("log", "-1", "--format=%h %s", commit))


@contextlib.contextmanager
def old_packages(commit: str, temp: Path) -> Iterator[Path]:
    """Check ``commit`` out into ``temp``; yield a directory holding it as the package ``costserve``.

    The worktree is removed and pruned on exit.
    """
    worktree = temp / "worktree"
    try:
        git("worktree", "add", "--detach", "--force", str(worktree), commit)
        client, server = worktree / "client", worktree / "server"
        if not (client / "__init__.py").is_file() or not (server / "__init__.py").is_file():
            raise SystemExit(f"{commit[:12]} has no client/ and server/ packages to serve from")
        package = temp / "packages" / "costserve"
        package.mkdir(parents=True)
        for entry in client.iterdir():
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        (package / "server").symlink_to(server, target_is_directory=True)
        yield package.parent
    finally:
        for command in (["worktree", "remove", "--force", str(worktree)], ["worktree", "prune"]):
            subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, timeout=300)


def old_env(packages: Path) -> dict[str, str]:
    """The old server's environment beyond :func:`benchmarks.launch.server_env`: ``packages`` first on PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join([str(packages), server_env()["PYTHONPATH"]])}


def probe_old(packages: Path, env: dict[str, str]) -> bool:
    """Check that the old code imports from ``packages``; whether its ``serve`` knows ``--ready-file``."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO_ROOT, env={**server_env(), **env}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    where = run("-c", IMPORT_PROBE)
    paths = [Path(line) for line in where.stdout.split()]
    if where.returncode != 0 or len(paths) != 2 or not all(path.is_relative_to(packages) for path in paths):
        raise SystemExit(f"the old code does not import from {packages}:\n{where.stdout}{where.stderr[-2000:]}")
    return "--ready-file" in run("-m", "costserve.server.cli", "serve", "--help").stdout


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A port of 127.0.0.1 free right now (for an old server that cannot announce the one it bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_health_serving(server: ServerProcess, timeout_s: float = 300) -> None:
    """Poll gRPC health until ``server`` says SERVING. Raises :class:`ServerFailed` with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise ServerFailed(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        # A fresh channel each time: a refused one backs off for longer and longer before it reconnects.
        with Client(server.target, timeout=2.0) as client, contextlib.suppress(grpc.RpcError):
            if client.health() == "SERVING":
                return
        if time.monotonic() > deadline:
            raise ServerFailed(f"{server.name} never became SERVING within {timeout_s:.0f} s:\n{server.log_tail()}")
        time.sleep(POLL_S * 4)


#: The metadata.json fields every costserve version reads; older ones refuse any other.
LEGACY_METADATA_FIELDS = (
    "name", "version", "input_shape", "labels", "variants", "holdout_examples", "training_data", "created_at",
    "training",
)  # fmt: skip
LEGACY_VARIANT_FIELDS = ("path", "format", "accuracy", "size_bytes")


def legacy_model_copy(model_dir: Path, target: Path) -> Path:
    """A copy of ``model_dir``'s newest version whose ``metadata.json`` holds only what old servers read.

    The same model files: the old and the new server serve the same weights.
    """
    from costserve.server.repository.store import METADATA_FILE, latest_version_dir

    version_dir = latest_version_dir(model_dir)
    assert version_dir is not None, f"no model version in {model_dir}"
    copy = target / version_dir.name
    copy.mkdir(parents=True)
    for entry in version_dir.iterdir():
        if entry.name != METADATA_FILE:
            (copy / entry.name).symlink_to(entry.resolve())
    metadata = json.loads((version_dir / METADATA_FILE).read_text())
    legacy = {key: metadata[key] for key in LEGACY_METADATA_FIELDS if key in metadata}
    legacy["variants"] = {
        name: {key: variant[key] for key in LEGACY_VARIANT_FIELDS} for name, variant in metadata["variants"].items()
    }
    (copy / METADATA_FILE).write_text(json.dumps(legacy, indent=2) + "\n")
    return target


def start_old(model_dir: Path, workdir: Path, env: dict[str, str], announces_ports: bool) -> ServerProcess:
    """The old server, SERVING: on port 0 when it knows ``--ready-file``, else on a port found free."""
    if announces_ports:
        return start_costserve(model_dir, *BENCHMARK_FLAGS, name="old", workdir=workdir, env=env, serving=True)
    for attempt in range(1, FREE_PORT_ATTEMPTS + 1):
        port = free_port()
        command = costserve_command(model_dir, port, -1, *BENCHMARK_FLAGS)
        server = ServerProcess("old", command, workdir, env, ready_file=False)
        server.port = port
        try:
            wait_health_serving(server)
            return server
        except BaseException as error:
            server.kill()
            taken = isinstance(error, ServerFailed) and "bind" in server.log.lower()
            if not taken or attempt == FREE_PORT_ATTEMPTS:
                raise
            print(f"  port {port} was taken meanwhile; trying another", flush=True)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- measuring


def measure(
    servers: dict[str, ServerProcess],
    bodies: dict[str, bytes],
    body_files: dict[str, Path],
    shape: LoadShape,
    tool: str,
    rounds: int,
    workdir: Path,
) -> dict[str, dict[str, list[LoadResult]]]:
    """Old and new in turn on each scenario, ``rounds`` times, the order flipping each round."""
    runs: dict[str, dict[str, list[LoadResult]]] = {
        scenario.key: {side: [] for side in SIDES} for scenario in AB_SCENARIOS
    }
    for round_index in range(rounds):
        order = SIDES if round_index % 2 == 0 else SIDES[::-1]
        for scenario in AB_SCENARIOS:
            for side in order:
                server = servers[side]
                log_path = workdir / f"h2load-{side}.log"
                body, body_file = bodies[scenario.key], body_files[scenario.key]
                result = saturate(server.target, body, body_file, shape, tool, log_path, server.pid)
                runs[scenario.key][side].append(result)
                print(
                    f"  round {round_index + 1}/{rounds} {scenario.key:<5} {side}  {result.rps:8.1f} req/s  "
                    f"loop CPU/req {result.loop_cpu_us:5.0f} us  ({result.succeeded} ok, {result.errors} errors)",
                    flush=True,
                )
    return runs


def ratios(new: Sequence[float], old: Sequence[float]) -> list[float]:
    """Per-round ``new / old``, leaving out rounds where either was not measured."""
    return [n / o for n, o in zip(new, old) if o > 0 and math.isfinite(n / o)]


def summarize(title: str, runs: dict[str, list[LoadResult]]) -> dict[str, Any]:
    """One scenario's figures: medians per side, and the per-round ratios new/old with their median."""
    rps = {side: [result.rps for result in runs[side]] for side in SIDES}
    loop = {side: [result.loop_cpu_us for result in runs[side]] for side in SIDES}
    rps_ratios = ratios(rps["new"], rps["old"])
    loop_ratios = ratios(loop["new"], loop["old"])
    return {
        "title": title,
        **{f"{side}_rps": statistics.median(rps[side]) for side in SIDES},
        "ratio": nan_median(rps_ratios),
        "ratios": rps_ratios,
        **{f"{side}_loop_cpu_us": nan_median(loop[side]) for side in SIDES},
        "loop_cpu_ratio": nan_median(loop_ratios),
        "loop_cpu_ratios": loop_ratios,
        **{f"{side}_requests": sum(result.succeeded for result in runs[side]) for side in SIDES},
        **{f"{side}_errors": sum(result.errors for result in runs[side]) for side in SIDES},
        "runs": {side: [(result.rps, result.loop_cpu_us) for result in runs[side]] for side in SIDES},
    }


# --------------------------------------------------------------------------- report


def render_report(results: dict[str, Any], notes: str) -> str:
    """The whole RESULTS-ab.md."""
    plan, old = results["plan"], results["old"]
    rows = [
        [
            figures["title"],
            report.fmt(figures["old_rps"], ".0f"),
            report.fmt(figures["new_rps"], ".0f"),
            report.fmt(figures["ratio"], ".3f"),
            ", ".join(f"{ratio:.3f}" for ratio in figures["ratios"]) or "-",
            report.fmt(figures["old_loop_cpu_us"], ".0f"),
            report.fmt(figures["new_loop_cpu_us"], ".0f"),
            report.fmt(figures["loop_cpu_ratio"], ".3f"),
        ]
        for figures in results["scenarios"].values()
    ]
    errors = sum(figures[f"{side}_errors"] for figures in results["scenarios"].values() for side in SIDES)
    start = (
        "on port 0 through the launcher" if old["ready_file"] else "on a port found free, as it predates --ready-file"
    )
    lines = [
        "# costserve interleaved A/B: the working tree against an older commit",
        "",
        f"Written by `{results['command']}` on {results['machine']['date']} in {results['elapsed_s']:.0f} s. "
        "Every figure was measured in this run. Do not edit above the notes marker: the next run rewrites it.",
        "",
        f"- new: the working tree, costserve at commit {results['new']}",
        f"- old: {old['title']} (a temporary git worktree; its server started {start})",
        f"- both serve `{results['model_dir']}` on 127.0.0.1 with /metrics off and `{' '.join(BENCHMARK_FLAGS)}`",
        f"- load: {results['tool_version']}, one connection, {plan['streams']} concurrent streams, "
        f"{plan['duration_s']:g} s measured after {plan['warmup_s']:g} s of warm-up per run; {plan['rounds']} "
        "round(s), old and new in turn on each scenario, the order flipping each round",
        "",
        "req/s and loop CPU are medians over the rounds; new/old is the median of the per-round ratios (listed). "
        "Loop CPU/req is the server's main (event-loop) thread's CPU time over the measured window, from "
        f"`/proc`, per answered request, in microseconds. Errors the load tool saw: {errors}.",
        "",
        report.markdown_table(TABLE_HEADER, rows),
        "",
        *report.machine_section(results["machine"], "both servers and the load tool"),
        report.NOTES_MARKER,
        notes.strip("\n"),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole A/B; returns every figure."""
    revision = resolve(args.against)
    tool = load_tool(args.tool)
    rounds = args.rounds or (1 if args.quick else 4)
    shape = LoadShape(STREAMS, 1.0 if args.quick else 4.0, 0.5 if args.quick else 1.0)
    model_dir = args.model_dir.resolve()
    ensure_model(model_dir)
    results: dict[str, Any] = {
        "plan": {"rounds": rounds, "streams": shape.streams, "duration_s": shape.duration_s,
                 "warmup_s": shape.warmup_s, "tool": tool},
        "machine": report.machine(),
        "command": args.command,
        "new": report.code_version(),
        "old": {"commit": revision.commit, "title": revision.title},
        "model_dir": str(model_dir),
        "tool_version": h2load_version() if tool == "h2load" else "python grpc.aio",
    }  # fmt: skip
    print(f"A/B: working tree ({results['new']}) against {revision.title}; {results['tool_version']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="costserve-ab-") as temp, contextlib.ExitStack() as stack:
        workdir = Path(temp)
        packages = stack.enter_context(old_packages(revision.commit, workdir))
        env = old_env(packages)
        results["old"]["ready_file"] = probe_old(packages, env)
        print("starting the old and the new server ...", flush=True)
        old_model_dir = legacy_model_copy(model_dir, workdir / "old-model" / model_dir.name)
        servers = {
            "old": stack.enter_context(start_old(old_model_dir, workdir, env, results["old"]["ready_file"])),
            "new": stack.enter_context(
                start_costserve(model_dir, *BENCHMARK_FLAGS, name="new", workdir=workdir, serving=True)
            ),
        }
        bodies = {scenario.key: request_bytes(scenario.precision, scenario.skip_cache) for scenario in AB_SCENARIOS}
        body_files = {}
        for scenario in AB_SCENARIOS:
            body_files[scenario.key] = workdir / f"{scenario.key}.grpc"
            body_files[scenario.key].write_bytes(grpc_frame(bodies[scenario.key]))
            for server in servers.values():
                check_answer(server, scenario, bodies[scenario.key])
        print(f"saturation: {rounds} round(s), {shape.streams} streams", flush=True)
        runs = measure(servers, bodies, body_files, shape, tool, rounds, workdir)
    results["scenarios"] = {scenario.key: summarize(scenario.title, runs[scenario.key]) for scenario in AB_SCENARIOS}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.ab``."""
    args = build_parser().parse_args(argv)
    args.command = report.command_line("python -m benchmarks.ab", argv)
    # SIGTERM unwinds like Ctrl-C: the servers are stopped and the worktree removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    results = run(args)
    results["elapsed_s"] = time.monotonic() - started
    for figures in results["scenarios"].values():
        print(
            f"{figures['title']:<22} old {figures['old_rps']:7.0f}  new {figures['new_rps']:7.0f} req/s  "
            f"new/old {figures['ratio']:.3f}  loop CPU/req old {figures['old_loop_cpu_us']:.0f} "
            f"new {figures['new_loop_cpu_us']:.0f} us ({figures['loop_cpu_ratio']:.3f})"
        )
    report.write_results(args.output, args.json, results, lambda notes: render_report(results, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
