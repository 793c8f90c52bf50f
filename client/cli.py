"""``costserve``: the command-line client.

::

    costserve predict examples/digits/*.png [--precision auto|fp32|int8] [--json]
                      [--tenant NAME] [--min-accuracy 0..1] [--max-cost-usd USD]
                      [--model NAME] [--version V] [--top-k K]
    costserve info [--model NAME] [--version V] [--json]
    costserve models [--json]  # every model, its versions and their states
    costserve health        # exit 0 only when the server is SERVING
    costserve loadtest --sweep-concurrency 1,4,16 --requests 1000 [--model NAME] [--inputs DIR] [--json]
    costserve cost [--metrics-url URL | --prometheus URL [--window 1h]] [--by-model | --by-tenant] [--json]

``--target`` (or ``COSTSERVE_TARGET``) names the server, default 127.0.0.1:50051;
``--token`` (or, better, ``COSTSERVE_TOKEN``) the bearer token every call carries;
``--tls-ca``, ``--tls-cert``, ``--tls-key`` (or ``COSTSERVE_TLS_CA``, ``COSTSERVE_CLIENT_CERT``,
``COSTSERVE_CLIENT_KEY``) connect with TLS;
``--tenant`` (or ``COSTSERVE_TENANT``) the tenant predictions are charged to;
``--model`` (or ``COSTSERVE_MODEL``) the model asked, default the server's default model.
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
from costserve.client import (
    DEFAULT_TIMEOUT_S,
    PRECISION_NAMES,
    PRECISIONS,
    Client,
    TlsFiles,
    token_metadata,
    version_state_name,
)
from costserve.v1 import classifier_pb2 as pb


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


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 (every class) or more")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--version``: which served model version a command asks."""
    parser.add_argument(
        "--model",
        default=os.environ.get("COSTSERVE_MODEL", ""),
        metavar="NAME",
        help="the model to ask (see `costserve models`) [env COSTSERVE_MODEL, default the server's default model]",
    )
    parser.add_argument(
        "--version",
        dest="model_version",
        default="",
        metavar="V",
        help="the model's version (default its latest served version)",
    )


# Not COSTSERVE_TLS_CERT/KEY: those are the server's own certificate, and one shell may set both.
#: The TLS flags: (flag, environment variable, what the file holds).
TLS_FLAGS = (
    ("--tls-ca", "COSTSERVE_TLS_CA", "PEM CA certificates the server's certificate is checked against (TLS)"),
    ("--tls-cert", "COSTSERVE_CLIENT_CERT", "PEM client certificate, for a server that requires one (mTLS)"),
    ("--tls-key", "COSTSERVE_CLIENT_KEY", "PEM private key of --tls-cert"),
)
#: The environment variable ``--token`` defaults to.
TOKEN_ENV = "COSTSERVE_TOKEN"


def add_tls_arguments(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Add ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (defaults from the variables of :data:`TLS_FLAGS`).

    ``suppress``: a subcommand's copy, which overrides the global flag only when given.
    """
    for name, env, what in TLS_FLAGS:
        default = argparse.SUPPRESS if suppress else os.environ.get(env) or None
        parser.add_argument(name, type=Path, default=default, metavar="FILE", help=f"{what} [env {env}]")


def add_token_argument(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Add ``--token`` (default from ``COSTSERVE_TOKEN``): the bearer token every gRPC call carries.

    ``suppress``: a subcommand's copy, which overrides the global flag only when given.
    """
    default = argparse.SUPPRESS if suppress else os.environ.get(TOKEN_ENV) or None
    parser.add_argument(
        "--token",
        default=default,
        metavar="TOKEN",
        help="bearer token sent as 'authorization: Bearer TOKEN' with every call, for a server that "
        f"authenticates its callers: an API key (csk_...) or a JWT [env {TOKEN_ENV}, better than the flag, "
        "which other users can see in the process list]. Plain text unless --tls-ca is given",
    )


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the flags name; None (plain text) when none is given."""
    return TlsFiles.of(args.tls_ca, args.tls_cert, args.tls_key)


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
    add_tls_arguments(parser)
    add_token_argument(parser)
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
    _add_model_arguments(predict)
    predict.add_argument(
        "--top-k",
        type=_top_k,
        default=0,
        metavar="K",
        help="also show the K most probable classes of each image, highest first (default 0: the top one only)",
    )
    info = commands.add_parser("info", help="describe a served model version and its variants")
    _add_model_arguments(info)
    info.add_argument("--json", action="store_true")
    models = commands.add_parser("models", help="list the server's models, their versions and each one's state")
    models.add_argument("--json", action="store_true", help="print the ListModelsResponse as JSON")
    commands.add_parser("health", help="exit 0 when the server is SERVING, 1 otherwise")
    loadtest.add_arguments(
        commands.add_parser(
            "loadtest",
            help="load the server; report throughput, latency percentiles, errors, hit ratio, accuracy and cost",
            description="Closed-loop (--concurrency) or open-loop (--rate) load with held-out digits "
            "or your own images (--inputs DIR), one report row per step.",
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
        model=args.model,
        version=args.model_version,
        top_k=args.top_k,
    )
    labels = _labels_of(client, response) if args.top_k else []
    # JSON objects: the --json output as is, and the table's cells.
    rows: list[dict[str, Any]] = []
    for path, prediction in zip(args.files, response.predictions):
        row: dict[str, Any] = {
            "file": str(path),
            "label": prediction.label_name or str(prediction.label),
            "score": round(prediction.score, 4),
            "precision": PRECISION_NAMES.get(prediction.precision, str(prediction.precision)),
            "cache_hit": prediction.cache_hit,
        }
        if args.top_k:
            row["top"] = [
                {
                    "class": index,
                    "label": labels[index] if 0 <= index < len(labels) else str(index),
                    "probability": round(probability, 4),
                }
                for index, probability in zip(prediction.classes, prediction.probabilities)
            ]
        rows.append(row)
    cost_per_image = response.cost.usd / max(len(rows), 1)
    if args.json:
        document = {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "cost_usd": response.cost.usd,
            "predictions": rows,
        }
        print(json.dumps(document, indent=2))
        return 0
    width = max(len(row["file"]) for row in rows)
    label_width = max(5, *(len(row["label"]) for row in rows))
    print(
        f"{'file':<{width}}  {'label':<{label_width}}  score   variant  cache  cost_usd{'   top' if args.top_k else ''}"
    )
    for row in rows:
        top = ", ".join(f"{entry['label']} {entry['probability']:.4f}" for entry in row.get("top", []))
        print(
            f"{row['file']:<{width}}  {row['label']:<{label_width}}  {row['score']:.4f}  {row['precision']:<7}  "
            f"{'hit' if row['cache_hit'] else 'miss':<5}  {cost_per_image:.3e}{'   ' + top if top else ''}"
        )
    model = f"{response.model_name} version" if response.model_name else "version"
    print(f"model {model} {response.model_version}, request cost ${response.cost.usd:.3e}")
    return 0


def _labels_of(client: Client, response: pb.PredictResponse) -> list[str]:
    """The class names of the model version that answered, or none if it cannot be described any more."""
    try:
        return list(client.model_info(response.model_name, response.model_version).labels)
    except grpc.RpcError:  # e.g. that version was unloaded meanwhile: class indices stand in for names
        return []


def _preprocessing(info: pb.ModelInfo) -> str:
    """``ModelInfo.preprocessing`` in one line: colour mode, resize, scaling, output."""
    steps = info.preprocessing
    scaling = steps.scaling or "?"
    if steps.mean or steps.std:
        scaling += f" (mean {' '.join(f'{m:g}' for m in steps.mean)}; std {' '.join(f'{s:g}' for s in steps.std)})"
    return f"{steps.color_mode or '?'}, resize {steps.resize or '?'}, scaling {scaling}, output {steps.output or '?'}"


def _latency_ms(value: float) -> str:
    return f"{value:.3f}" if value > 0 else "-"


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info(args.model, args.model_version)
    if args.json:
        print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))
        return 0
    print(f"model {info.name} version {info.version}, input {'x'.join(map(str, info.input_shape))}")
    print(f"labels: {' '.join(info.labels)}")
    print(f"training data: {info.training_data or 'not recorded'}; created {info.created_at or 'at an unknown time'}")
    if info.HasField("preprocessing"):
        print(f"preprocessing: {_preprocessing(info)}")
    print(f"{'variant':<8} {'format':<12} {'accuracy':>9} {'size':>14} {'ms/img b1':>10} {'ms/img max':>11}")
    for variant in info.variants:
        accuracy = f"{variant.accuracy * 100:.2f}%" if variant.HasField("accuracy") else "unknown"
        print(
            f"{PRECISION_NAMES.get(variant.precision, '?'):<8} {variant.format:<12} {accuracy:>9} "
            f"{variant.size_bytes:>12,d} B {_latency_ms(variant.latency_ms_batch_1):>10} "
            f"{_latency_ms(variant.latency_ms_per_image_max_batch):>11}"
        )
    if info.holdout_examples:
        held_out = f"accuracy measured on {info.holdout_examples} held-out images"
    else:
        held_out = "no held-out data: accuracy unknown"
    if info.HasField("int8_agreement"):
        agreement = f"int8 agrees with fp32 on {info.int8_agreement:.2%} of them"
    else:
        agreement = "int8/fp32 agreement not measured"
    print(f"{held_out}; {agreement}")
    print(f"up to {info.max_images_per_request} images per request")
    _print_cost_profile(info)
    return 0


def _print_cost_profile(info: pb.ModelInfo) -> None:
    """The measured CPU per image by batch size on the server's host, the batch limits and the verdict."""
    measured = [variant for variant in info.variants if variant.cost_profile]
    if not measured:
        return
    sizes = sorted({cost.batch_size for variant in measured for cost in variant.cost_profile})
    print(
        "CPU per image on the server's host, in µs, by batch size, measured at load (* the batch limit: "
        "batches stop there; live: recent batches, under the load of the moment):"
    )
    print(f"{'variant':<8}" + "".join(f"{size:>9}" for size in sizes))
    for variant in measured:
        by_size = {cost.batch_size: cost for cost in variant.cost_profile}
        name = PRECISION_NAMES.get(variant.precision, "?")
        cells = []
        for size in sizes:
            cost = by_size.get(size)
            mark = "*" if size == variant.batch_limit else ""
            cells.append(f"{mark}{cost.cpu_seconds_per_image * 1e6:.1f}" if cost else "-")
        print(f"{name:<8}" + "".join(f"{cell:>9}" for cell in cells))
        if any(cost.live_batches for cost in variant.cost_profile):
            live = [by_size.get(size) for size in sizes]
            cells = [
                f"{cost.live_cpu_seconds_per_image * 1e6:.1f}" if cost and cost.live_batches else "-" for cost in live
            ]
            print(f"{'  live':<8}" + "".join(f"{cell:>9}" for cell in cells))
    if info.cost_verdict:
        print(info.cost_verdict)


def _models(client: Client, args: argparse.Namespace) -> int:
    response = client.list_models()
    if args.json:
        print(json_format.MessageToJson(response, always_print_fields_with_no_presence=True))
        return 0
    if not response.models:
        print("the server has no models")
        return 0
    rows = [("model", "default", "version", "state", "note")]
    for model in response.models:
        mark = "*" if model.is_default else ""
        rows += [
            (
                model.name,
                mark,
                version.version,
                version_state_name(version.state),
                version.reason or version.cost_verdict,
            )
            for version in model.versions
        ] or [(model.name, mark, "-", "-", "no versions")]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[4]]).rstrip())
    print("* the default model: requests that name no model go to it")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``costserve``."""
    args = build_parser().parse_args(argv)
    if args.command == "cost":
        return cost_report.run(args)
    try:
        tls = tls_from_args(args)
        if tls is not None:
            tls.credentials()  # read now: a missing or unreadable file is a usage error
    except (OSError, ValueError) as error:
        print(f"costserve: TLS: {error}", file=sys.stderr)
        return 2
    try:
        token_metadata(args.token)  # its message never quotes the token
    except ValueError as error:
        print(f"costserve: --token ({TOKEN_ENV}): {error}", file=sys.stderr)
        return 2
    try:
        if args.command == "loadtest":
            # Its default inputs are scikit-learn's bundled digits; the client alone does not install it.
            if args.inputs is None and importlib.util.find_spec("sklearn") is None:
                print(
                    "costserve loadtest: needs scikit-learn, which comes with the `loadtest` extra: "
                    "pip install 'costserve[loadtest]' (or send your own images with --inputs DIR)",
                    file=sys.stderr,
                )
                return 2
            return loadtest.main(args)
        with Client(args.target, timeout=args.timeout, tls=tls, token=args.token) as client:
            if args.command == "health":
                status = client.health()
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "info":
                return _info(client, args)
            if args.command == "models":
                return _models(client, args)
            return _predict(client, args)
    except grpc.RpcError as error:
        print(f"costserve: {error.code().name}: {error.details()} (server {args.target})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
