"""``costserve``: the command-line client.

::

    costserve predict examples/digits/*.png [--precision auto|fp32|int8] [--json]
                      [--tenant NAME] [--min-accuracy 0..1] [--max-cost-usd USD]
    costserve info
    costserve health        # exit 0 only when the server is SERVING
    costserve loadtest --sweep-concurrency 1,4,16 --requests 1000 [--json] [--plot sweep.png]
    costserve cost [--metrics-url URL | --prometheus URL [--window 1h]] [--json]

``--target`` (or ``COSTSERVE_TARGET``) names the server, default 127.0.0.1:50051;
``--tenant`` (or ``COSTSERVE_TENANT``) the tenant predictions are charged to.
``costserve --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from costserve import __version__, cost_report, loadtest
from costserve.client import DEFAULT_TIMEOUT_S, PRECISION_NAMES, PRECISIONS, Client


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _usd(text: str) -> float:
    value = _number(text)
    if not value >= 0.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is not a cost of 0 USD or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``costserve``."""
    parser = argparse.ArgumentParser(prog="costserve", description="Client of a costserve server.")
    parser.add_argument("--version", action="version", version=f"costserve {__version__}")
    parser.add_argument(
        "--target",
        default=os.environ.get("COSTSERVE_TARGET", "127.0.0.1:50051"),
        help="server address HOST:PORT [env COSTSERVE_TARGET, default 127.0.0.1:50051]",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds per call (default {DEFAULT_TIMEOUT_S:g})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify image files (PNG or JPEG)")
    predict.add_argument("files", nargs="+", type=Path)
    predict.add_argument("--precision", choices=sorted(PRECISIONS), default="auto")
    predict.add_argument("--skip-cache", action="store_true", help="compute even if the server has the answer cached")
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument(
        "--tenant",
        default=os.environ.get("COSTSERVE_TENANT") or None,
        help="tenant the predictions are charged to [env COSTSERVE_TENANT, default none]",
    )
    predict.add_argument(
        "--min-accuracy",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="only a variant with at least this held-out accuracy (0..1) may answer (default 0: any)",
    )
    predict.add_argument(
        "--max-cost-usd",
        type=_usd,
        default=0.0,
        metavar="USD",
        help="refuse the request when the server predicts it costs more than this (default 0: no ceiling)",
    )
    info = commands.add_parser("info", help="describe the served model and its variants")
    info.add_argument("--json", action="store_true")
    commands.add_parser("health", help="exit 0 when the server is SERVING, 1 otherwise")
    loadtest.add_arguments(
        commands.add_parser(
            "loadtest",
            help="load the server; report throughput, latency percentiles, errors, hit ratio, accuracy and cost",
            description="Closed-loop (--concurrency) or open-loop (--rate) load with held-out digits, "
            "one report row per step.",
        )
    )
    cost_report.add_parser(commands)
    return parser


def _predict(client: Client, args: argparse.Namespace) -> int:
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"costserve: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    response = client.predict(
        args.files,
        precision=args.precision,
        skip_cache=args.skip_cache,
        tenant=args.tenant,
        min_accuracy=args.min_accuracy,
        max_cost_usd=args.max_cost_usd,
    )
    # JSON objects: the --json output as is, and the table's cells.
    rows: list[dict[str, Any]] = [
        {
            "file": str(path),
            "label": prediction.label_name or str(prediction.label),
            "score": round(prediction.score, 4),
            "precision": PRECISION_NAMES.get(prediction.precision, str(prediction.precision)),
            "cache_hit": prediction.cache_hit,
        }
        for path, prediction in zip(args.files, response.predictions)
    ]
    cost_per_image = response.cost.usd / max(len(rows), 1)
    if args.json:
        print(
            json.dumps(
                {"model_version": response.model_version, "cost_usd": response.cost.usd, "predictions": rows},
                indent=2,
            )
        )
        return 0
    width = max(len(row["file"]) for row in rows)
    print(f"{'file':<{width}}  label  score   variant  cache  cost_usd")
    for row in rows:
        print(
            f"{row['file']:<{width}}  {row['label']:<5}  {row['score']:.4f}  {row['precision']:<7}  "
            f"{'hit' if row['cache_hit'] else 'miss':<5}  {cost_per_image:.3e}"
        )
    print(f"model version {response.model_version}, request cost ${response.cost.usd:.3e}")
    return 0


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))
        return 0
    print(f"model {info.name} version {info.version}, input {'x'.join(map(str, info.input_shape))}")
    print(f"labels: {' '.join(info.labels)}")
    print(f"trained on {info.training_data}, created {info.created_at}")
    print(f"{'variant':<8} {'format':<12} {'accuracy':>9} {'size':>12}")
    for variant in info.variants:
        print(
            f"{PRECISION_NAMES.get(variant.precision, '?'):<8} {variant.format:<12} "
            f"{variant.accuracy * 100:>8.2f}% {variant.size_bytes:>12,d} B"
        )
    print(
        f"accuracy measured on {info.holdout_examples} held-out images; "
        f"up to {info.max_images_per_request} images per request"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``costserve``."""
    args = build_parser().parse_args(argv)
    if args.command == "cost":
        return cost_report.run(args)
    try:
        if args.command == "loadtest":
            # Its inputs are scikit-learn's bundled digits; the client alone does not install it.
            if importlib.util.find_spec("sklearn") is None:
                print(
                    "costserve loadtest: needs scikit-learn, which comes with the `loadtest` extra: "
                    "pip install 'costserve[loadtest]'",
                    file=sys.stderr,
                )
                return 2
            return loadtest.main(args)
        with Client(args.target, timeout=args.timeout) as client:
            if args.command == "health":
                status = client.health()
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "info":
                return _info(client, args)
            return _predict(client, args)
    except grpc.RpcError as error:
        print(f"costserve: {error.code().name}: {error.details()} (server {args.target})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
