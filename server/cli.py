"""``costserve-server``: serve the model, or train one.

::

    costserve-server serve [--host H] [--port P] [--model-dir DIR] ...   # every flag: --help
    costserve-server train [--model-dir DIR] [--data mnist.npz] [--epochs N]
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

from costserve import __version__


def _configure_logging(level: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``costserve-server``; needs the server extra (pydantic-settings)."""
    from costserve.server.settings import Settings, add_settings_arguments, env_var

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
        default=Path(os.environ.get(env_var("model_dir"), Settings.model_fields["model_dir"].default)),
        help=f"model base directory; the new version is written under it [env {env_var('model_dir')}]",
    )
    train.add_argument("--data", type=Path, default=None, help="a local mnist.npz (x_train, y_train, x_test, y_test)")
    train.add_argument(
        "--epochs", type=int, default=None, help="most epochs (early stopping); default 40 for digits, 6 for MNIST"
    )
    train.add_argument("--log-level", default=os.environ.get(env_var("log_level"), "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``costserve-server``."""
    # pydantic-settings comes with the server extra: a client-only install gets a clear exit.
    with _needs_server_extra():
        from pydantic import ValidationError

        from costserve.server.cost import PriceFileError, load_prices
        from costserve.server.settings import describe_problems, settings_from_args, unknown_env_vars

        parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        _configure_logging(args.log_level)
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
    _configure_logging(settings.log_level)
    with _needs_server_extra():
        from costserve.server.app import serve

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
