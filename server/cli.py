"""``costserve-server``: serve the model, train one, or import one.

::

    costserve-server serve [--host H] [--port P] [--model-dir DIR] ...   # every flag: --help
    costserve-server train [--model-dir DIR] [--data mnist.npz] [--epochs N]
    costserve-server import model.keras --name NAME [--holdout DATA] [--calibration DATA] ...
    costserve-server --version
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from costserve import __version__


def configure_logging(level: str, process: str = "") -> None:
    """Log at ``level`` to stderr; ``process`` (``worker 1``) is written in every line of a worker's log."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    where = f" [{process}]" if process else ""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s" + where + " %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``costserve-server``; needs the server extra (pydantic-settings)."""
    from costserve.server.settings import add_settings_arguments, env_var

    parser = argparse.ArgumentParser(prog="costserve-server", description="costserve: the inference server.")
    parser.add_argument("--version", action="version", version=f"costserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the newest model version (training the default model when there is none)",
        description="Serve costserve.v1.Classifier. Every flag can also be set as COSTSERVE_<FLAG>.",
    )
    add_settings_arguments(serve)
    train = commands.add_parser(
        "train",
        help="train the default CNN and export fp32 + int8 as a new model version",
        description="Train on scikit-learn's bundled digits (default) or a local Keras-layout mnist.npz. "
        "Nothing is downloaded.",
    )
    train.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get(env_var("model_dir")) or _default_repository() / "digits"),
        help=f"model base directory; the new version is written under it (default: <repository>/digits) "
        f"[env {env_var('model_dir')}]",
    )
    train.add_argument("--data", type=Path, default=None, help="a local mnist.npz (x_train, y_train, x_test, y_test)")
    train.add_argument(
        "--epochs", type=int, default=None, help="most epochs (early stopping); default 40 for digits, 6 for MNIST"
    )
    train.add_argument("--log-level", default=os.environ.get(env_var("log_level"), "INFO"))
    _add_import_parser(commands)
    _add_keys_parser(commands)
    metrics_password = commands.add_parser(
        "metrics-password",
        help="make a password for /metrics' basic auth: prints it once, stores only its hash",
        description="Make a random password for USER, print it once, and store USER's line (a salted scrypt hash, "
        "never the password) in FILE, replacing USER's previous one. Serve FILE with --metrics-basic-auth; the "
        "server re-reads it when it changes.",
    )
    metrics_password.add_argument("--user", required=True, help="the user name the scraper sends")
    metrics_password.add_argument(
        "--file",
        type=Path,
        default=Path(os.environ.get(env_var("metrics_basic_auth")) or "metrics-users"),
        help=f"the users file (default: metrics-users) [env {env_var('metrics_basic_auth')}]",
    )
    return parser


def _add_keys_parser(commands: Any) -> None:  # argparse's subparsers action has no public type
    from costserve.server.settings import env_var

    keys = commands.add_parser(
        "keys",
        help="manage API keys: add (prints a new key once, stores its hash), list, revoke",
        description="API keys of --auth-keys FILE. The file holds each key's SHA-256 hash with its tenant and "
        "role, never the key; the server re-reads it when it changes, so a revoked key is refused from the next "
        "call on.",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True)
    default_file = Path(os.environ.get(env_var("auth_keys")) or "keys.toml")
    file_help = f"the API keys file (default: keys.toml) [env {env_var('auth_keys')}]"
    add = actions.add_parser("add", help="make a key for a tenant; prints it once")
    add.add_argument("--tenant", required=True, help="the tenant the key's calls are charged to")
    add.add_argument(
        "--role",
        choices=("user", "gateway"),
        default="user",
        help="user: charges its own tenant only; gateway: may charge the tenant x-costserve-tenant names "
        "(default: user)",
    )
    add.add_argument("--name", default="", help="a note to tell keys apart in `keys list` (e.g. ci-runner)")
    add.add_argument("--file", type=Path, default=default_file, help=file_help)
    listing = actions.add_parser("list", help="list the keys: id, tenant, role, name, created")
    listing.add_argument("--file", type=Path, default=default_file, help=file_help)
    revoke = actions.add_parser("revoke", help="remove a key by its id (from `keys list`)")
    revoke.add_argument("key_id", help="the key's id: the first 12 hex digits of its hash")
    revoke.add_argument("--file", type=Path, default=default_file, help=file_help)


def _default_repository() -> Path:
    """The model repository the settings name: ``COSTSERVE_MODEL_REPOSITORY``, else its default."""
    from costserve.server.settings import Settings, env_var

    return Path(os.environ.get(env_var("model_repository")) or Settings.model_fields["model_repository"].default)


def _add_import_parser(commands: Any) -> None:  # argparse's subparsers action has no public type
    """The ``import`` subcommand and its flags."""
    from costserve.server.preprocessing import COLOR_MODES, OUTPUTS, RESIZE_MODES, SCALINGS
    from costserve.server.settings import Settings, env_var

    command = commands.add_parser(
        "import",
        help="import a Keras file or SavedModel as a new model version (fp32 + int8, measured)",
        description="Import a Keras file (.keras, .h5) or a SavedModel directory as the next version of "
        "<repository>/<name>: the fp32 SavedModel, an int8 model by full-integer post-training quantization, "
        "and metadata.json with each variant's held-out accuracy, size and latency. DATA is an image folder "
        "(one sub-folder per class, PNG/JPEG) or an .npz with x (images) and y (class indices).",
    )
    command.add_argument("source", type=Path, metavar="SOURCE", help="a .keras/.h5 file or a SavedModel directory")
    command.add_argument("--name", required=True, help="the model's name: its directory in the repository")
    command.add_argument(
        "--repository",
        type=Path,
        default=_default_repository(),
        help=f"model repository; the version is written to <repository>/<name>/<version> "
        f"[env {env_var('model_repository')}]",
    )
    command.add_argument("--holdout", type=Path, metavar="DATA", help="held-out images to measure accuracy on")
    command.add_argument(
        "--calibration",
        type=Path,
        metavar="DATA",
        help="images to calibrate int8 on (up to 500 at random); default: the held-out images",
    )
    command.add_argument("--labels", type=Path, metavar="FILE", help="one label per line, in class order")
    command.add_argument(
        "--input-shape",
        type=_shape,
        metavar="H,W,C",
        help="the input size to serve a model of dynamic height and width at",
    )
    command.add_argument(
        "--color-mode", choices=COLOR_MODES, help="channel order the model takes (default: by its channels)"
    )
    command.add_argument(
        "--resize", choices=RESIZE_MODES, default="stretch", help="how images of another size are fitted"
    )
    command.add_argument(
        "--scaling",
        choices=SCALINGS,
        default="unit",
        help="input range: unit [0,1], symmetric [-1,1], levels [0,255], mean_std (x - mean) / std",
    )
    command.add_argument("--mean", type=_floats, metavar="V[,V,V]", default=(), help="mean_std: mean of [0,1] pixels")
    command.add_argument("--std", type=_floats, metavar="V[,V,V]", default=(), help="mean_std: std of [0,1] pixels")
    command.add_argument(
        "--output", choices=OUTPUTS, default="probabilities", help="what the model outputs (logits get a softmax)"
    )
    command.add_argument(
        "--max-int8-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="drop int8 when its held-out accuracy is more than this many percentage points below fp32's",
    )
    command.add_argument(
        "--max-batch-size",
        type=_positive_int,
        metavar="N",
        default=os.environ.get(env_var("max_batch_size"), str(Settings.model_fields["max_batch_size"].default)),
        help=f"the largest batch, at which latency per image is measured [env {env_var('max_batch_size')}]",
    )
    command.add_argument("--log-level", default=os.environ.get(env_var("log_level"), "INFO"))


def _shape(text: str) -> tuple[int, int, int]:
    try:
        height, width, channels = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not H,W,C (three whole numbers, e.g. 224,224,3)") from None
    if min(height, width, channels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    return height, width, channels


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated numbers") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _import(args: argparse.Namespace) -> int:
    """``costserve-server import``: 0 once the version is published, 2 when the import is refused."""
    configure_logging(args.log_level)
    with _needs_server_extra():
        from costserve.server.preprocessing import Preprocessing

    fields = dict(resize=args.resize, scaling=args.scaling, mean=args.mean, std=args.std, output=args.output)
    try:
        # Checked before the model is read; the colour mode, when not given, follows the model's channels.
        Preprocessing(color_mode=args.color_mode or "rgb", **fields)
    except ValueError as error:
        print(f"costserve-server import: {error}", file=sys.stderr)
        return 2
    with _needs_server_extra():
        from costserve.server.repository.importer import ImportRefused, default_color_mode, import_model
        from costserve.server.runtimes import configure_tensorflow_threads

    try:
        # As the server by default (--inference-threads 1), so the measured latency is what it will see.
        configure_tensorflow_threads(1)
    except RuntimeError:  # TensorFlow already started in this process (an in-process caller): it keeps its pool
        pass
    try:
        report = import_model(
            args.source,
            args.name,
            args.repository,
            holdout=args.holdout,
            calibration=args.calibration,
            labels=args.labels,
            preprocessing=lambda channels: Preprocessing(
                color_mode=args.color_mode or default_color_mode(channels), **fields
            ),
            input_shape=args.input_shape,
            max_int8_drop=args.max_int8_drop,
            max_batch_size=args.max_batch_size,
        )
    except ImportRefused as error:
        print(f"costserve-server import: {error}", file=sys.stderr)
        return 2
    metadata = report.metadata
    print(f"imported {report.version_dir}")
    print(
        f"  input {'x'.join(map(str, metadata.input_shape))}, {len(metadata.labels)} classes, "
        f"held-out images: {metadata.holdout_examples or 'none'}"
    )
    for precision, info in metadata.variants.items():
        accuracy = "unknown" if info.accuracy is None else f"{info.accuracy:.2%}"
        print(
            f"  {precision}  {info.path:<18} accuracy {accuracy:>8}  {info.size_bytes:>12,} bytes  "
            f"{info.latency_ms_batch_1:.3f} ms/image alone, {info.latency_ms_per_image_max_batch:.3f} ms/image "
            f"in batches of {args.max_batch_size}"
        )
    fp32 = metadata.variants.get("fp32")
    if fp32 is not None and fp32.litert_path is not None:
        print(
            f"  fp32 is served by LiteRT from {fp32.litert_path}: the SavedModel's top-1 class on every image checked, "
            f"probabilities within {fp32.litert_max_abs_diff:.1e}"
        )
    agreement = "unknown" if metadata.int8_agreement is None else f"{metadata.int8_agreement:.2%}"
    print(f"  fp32/int8 top-1 agreement: {agreement}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``costserve-server``."""
    # pydantic-settings comes with the server extra: a client-only install gets a clear exit.
    with _needs_server_extra():
        from pydantic import ValidationError

        from costserve.server.cost import PriceFileError, load_prices
        from costserve.server.settings import describe_problems, settings_from_args, unknown_env_vars

        parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "import":
        return _import(args)
    if args.command == "keys":
        from costserve.server.auth import keys_command

        return keys_command(args)
    if args.command == "metrics-password":
        from costserve.server.metrics_auth import add_user

        try:
            password = add_user(args.file, args.user)
        except (OSError, ValueError) as error:
            print(f"costserve-server: {error}", file=sys.stderr)
            return 2
        print(password)
        print(f"stored {args.user}'s hash in {args.file}; the password is not shown again", file=sys.stderr)
        return 0
    if args.command == "train":
        configure_logging(args.log_level)
        if args.data is not None and not args.data.is_file():
            print(f"costserve-server: --data {args.data} does not exist", file=sys.stderr)
            return 2
        with _needs_server_extra():
            from costserve.server.training import train_and_export

        version_dir = train_and_export(args.model_dir, data_path=args.data, epochs=args.epochs)
        print(f"exported {version_dir}")
        return 0
    for warning in unknown_env_vars(os.environ):
        print(f"costserve-server: warning: {warning}", file=sys.stderr)
    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        for problem in describe_problems(error):
            print(f"costserve-server: {problem}", file=sys.stderr)
        return 2
    try:
        load_prices(settings.prices)
    except PriceFileError as error:
        raise SystemExit(f"costserve-server: {error}") from None
    configure_logging(settings.log_level)
    with _needs_server_extra():
        from costserve.server.app import serve
        from costserve.server.supervisor import supervise, worker_count

    workers = worker_count(settings.workers)
    if workers > 1:
        return supervise(settings, workers)
    return asyncio.run(serve(settings))


@contextlib.contextmanager
def _needs_server_extra() -> Iterator[None]:
    """Turn a missing server dependency (a client-only ``pip install costserve``) into a clear exit."""
    try:
        yield
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"costserve-server: {missing.name} is not installed; the server needs the server extra: "
            "pip install 'costserve[server]'"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
