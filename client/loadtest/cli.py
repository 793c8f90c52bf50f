"""The ``costserve loadtest`` command: its options, and running it with parsed arguments."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from costserve.client import PRECISIONS
from costserve.loadtest.config import DEFAULT_CATALOG, LoadtestConfig, RepeatSpec
from costserve.loadtest.protocols import PROTOCOLS
from costserve.loadtest.report import (
    LoadReport,
    MissingPlotExtra,
    format_table,
    plot_report,
    require_matplotlib,
    write_csv,
    write_json,
)
from costserve.loadtest.runner import LoadGeneratorFailed, run_loadtest


def _numbers(kind: Callable[[str], float], text: str) -> tuple[float, ...]:
    values = tuple(kind(value) for value in text.split(",") if value.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 1,4,16")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``costserve loadtest`` options to ``parser``."""
    parser.add_argument(
        "--target", default=argparse.SUPPRESS, help="server address HOST:PORT (same as costserve --target)"
    )
    from costserve.cli import add_tls_arguments, add_token_argument

    add_tls_arguments(parser, suppress=True)
    add_token_argument(parser, suppress=True)
    load = parser.add_argument_group("load (one of; default --concurrency 1)").add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, metavar="N", help="closed loop: N callers, each waits for its answer")
    load.add_argument("--rate", type=float, metavar="R", help="open loop: R requests/s whatever the answers")
    load.add_argument(
        "--sweep-concurrency", type=functools.partial(_numbers, int), metavar="LIST", help="closed-loop steps: 1,4,16"
    )
    load.add_argument(
        "--sweep-rate", type=functools.partial(_numbers, float), metavar="LIST", help="open-loop steps (req/s): 50,100"
    )
    shape = parser.add_argument_group("length and timing")
    shape.add_argument(
        "--arrivals", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals (default poisson)"
    )
    shape.add_argument(
        "--duration", type=float, metavar="S", help="seconds measured per step (default 10 unless --requests)"
    )
    shape.add_argument(
        "--requests", type=int, metavar="N", help="requests measured per step (with --duration: what comes first)"
    )
    shape.add_argument(
        "--warmup", type=float, default=1.0, metavar="S", help="seconds of unmeasured load before each step (default 1)"
    )
    inputs = parser.add_argument_group("requests")
    inputs.add_argument(
        "--repeat",
        type=RepeatSpec.parse,
        default=RepeatSpec(),
        metavar="F|zipf:S",
        help="share of images that repeat an answered input (0..1, default 0: all distinct), "
        "or zipf:S for Zipf popularity with exponent S over --catalog inputs",
    )
    inputs.add_argument(
        "--catalog", type=int, default=DEFAULT_CATALOG, metavar="N",
        help=f"distinct inputs Zipf draws from (default {DEFAULT_CATALOG:,})",
    )  # fmt: skip
    inputs.add_argument(
        "--inputs",
        metavar="DIR",
        help="send your own PNG/JPEG files instead of the held-out digits: one sub-folder per class (the folder "
        "names are the class names; the report's accuracy compares them with each answer's label_name), "
        "or a flat folder (no labels, no accuracy)",
    )
    inputs.add_argument("--images-per-request", type=int, default=1, metavar="K", help="images per request (default 1)")
    inputs.add_argument(
        "--model",
        default=os.environ.get("COSTSERVE_MODEL", ""),
        metavar="NAME",
        help="the model every request asks [env COSTSERVE_MODEL, default the server's default model]",
    )
    inputs.add_argument(
        "--version", dest="model_version", default="", metavar="V", help="its version (default the latest served)"
    )
    inputs.add_argument("--precision", choices=sorted(PRECISIONS), default="auto")
    inputs.add_argument("--deadline-ms", type=float, metavar="MS", help="deadline per call in ms (default --timeout)")
    inputs.add_argument("--skip-cache", action="store_true", help="ask the server to compute every answer")
    inputs.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v1",
        help="the API every request goes by: v1 (costserve.v1 Predict, the default), v2 (the Open Inference "
        "Protocol's ModelInfer, raw tensors) or tfserving (TensorFlow Serving's Predict)",
    )
    inputs.add_argument(
        "--stream", action="store_true", help="pipeline requests on PredictStream calls, not Predict (v1 only)"
    )
    inputs.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds input choices and Poisson arrivals, and picks the inputs: distinct ones start at SEED x 360, "
        "so a new seed meets a cold cache (default 0: the held-out digits first); with --inputs it only "
        "shuffles the files' order",
    )
    client = parser.add_argument_group("load generator")
    client.add_argument("--processes", type=int, default=1, metavar="N", help="processes sharing the load (default 1)")
    client.add_argument("--channels", type=int, default=4, metavar="N", help="gRPC connections per process (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write the report as JSON (to stdout without FILE)"
    )
    output.add_argument(
        "--csv", nargs="?", const="-", metavar="FILE", help="write one CSV row per step (to stdout without FILE)"
    )
    output.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="plot latency and throughput against the load (plot extra)"
    )


def config_from_args(args: argparse.Namespace) -> LoadtestConfig:
    """The :class:`LoadtestConfig` of parsed ``costserve loadtest`` arguments."""
    concurrency = args.sweep_concurrency or ((args.concurrency,) if args.concurrency is not None else ())
    rate = args.sweep_rate or ((args.rate,) if args.rate is not None else ())
    return LoadtestConfig(
        target=args.target,
        tls_ca=str(args.tls_ca) if args.tls_ca else None,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
        token=args.token or None,
        concurrency=tuple(concurrency),
        rate=tuple(rate),
        arrivals=args.arrivals,
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
        repeat=args.repeat,
        catalog=args.catalog,
        images_per_request=args.images_per_request,
        precision=args.precision,
        deadline_ms=args.deadline_ms,
        skip_cache=args.skip_cache,
        stream=args.stream,
        processes=args.processes,
        channels=args.channels,
        timeout_s=args.timeout,
        seed=args.seed,
        model=args.model,
        model_version=args.model_version,
        inputs=args.inputs,
        protocol=args.protocol,
    )


def _write(destination: str, writer: Callable[[LoadReport, TextIO], None], report: LoadReport) -> None:
    if destination == "-":
        writer(report, sys.stdout)
        return
    with open(destination, "w", newline="", encoding="utf-8") as output:
        writer(report, output)


def main(args: argparse.Namespace) -> int:
    """Run ``costserve loadtest`` with parsed arguments; print the report; exit code 0, or 2 on bad settings."""
    if args.json == "-" and args.csv == "-":
        print("costserve loadtest: --json and --csv cannot both go to stdout; give one a FILE", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        config.validate()
        if args.plot is not None:
            require_matplotlib()
    except (ValueError, MissingPlotExtra) as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 2
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        report = run_loadtest(config, progress=progress)
    except ValueError as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 2
    except LoadGeneratorFailed as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 1
    if "-" not in (args.json, args.csv):
        sys.stdout.write(format_table(report))
    if args.json is not None:
        _write(args.json, write_json, report)
    if args.csv is not None:
        _write(args.csv, write_csv, report)
    if args.plot is not None:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
