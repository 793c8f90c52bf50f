"""Shared fixtures: one trained model per test run, and real servers on port 0 (server processes: benchmarks.launch)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO_ROOT / "examples" / "digits").glob("digit_*.png"))
#: The imported RGB model of the shared repository (see the ``repository`` fixture).
RGB_SHAPE = (32, 32, 3)
RGB_CLASSES = 5

T = TypeVar("T")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, trained once per test run exactly as `costserve-server train` does."""
    from costserve.server.runtimes import configure_tensorflow_threads
    from costserve.server.training import train_and_export

    # As the server does before its first TensorFlow op (its default --inference-threads):
    # runtimes then run each call on the calling thread alone.
    configure_tensorflow_threads(1)

    base = tmp_path_factory.mktemp("models") / "digits"
    train_and_export(base)
    return base


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path):  # -> LoadedModel
    """Both variants of the trained model, loaded once (servers in tests run one at a time)."""
    from costserve.server.repository.store import latest_version_dir, load_model

    version_dir = latest_version_dir(model_dir)
    assert version_dir is not None
    return load_model(version_dir, max_batch_size=32)


class RunningServer:
    """A CostserveServer on 127.0.0.1 port 0, run by an event loop in a background thread."""

    def __init__(self, settings: Any, model: Any) -> None:
        from costserve.server.app import CostserveServer

        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        self.server = CostserveServer(settings, registry=self.registry, model=model)
        self.run(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def core(self) -> Any:
        return self.server.core

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of the samples of ``name`` in the server's registry whose labels include ``labels`` (0 when none)."""
        from helpers import sample_sum

        return sample_sum(self.registry, name, labels)

    def stop(self) -> None:
        try:
            self.run(self.server.stop(grace_s=5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


@pytest.fixture
def start_server(loaded_model: Any, model_dir: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory: start a server with settings overrides; every server is stopped after the test."""
    from costserve.server.settings import Settings

    started: list[RunningServer] = []
    # No drain grace: an in-process test server has no load balancer to tell.
    defaults = dict(
        host="127.0.0.1", port=0, metrics_port=0, model_dir=model_dir, drain_seconds=5, drain_grace_seconds=0
    )

    def start(model: Any = None, **overrides: Any) -> RunningServer:
        settings = Settings(**{**defaults, **overrides})  # validated as it is built
        server = RunningServer(settings, model or loaded_model)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_budgeted_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> Callable[..., RunningServer]:
    """Factory: start a server with ``budgets`` (the text of a budgets TOML file) and settings overrides."""

    def start(budgets: str, **overrides: Any) -> RunningServer:
        path = tmp_path / "budgets.toml"
        path.write_text(budgets)
        return start_server(budgets=path, **overrides)

    return start


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """A server with default settings."""
    return start_server()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Any]:
    """A costserve Client connected to ``server``."""
    from costserve import Client

    with Client(server.target, timeout=30) as connected:
        yield connected


@pytest.fixture(scope="session")
def holdout(model_dir: Path) -> Any:
    """The held-out split the model was never trained on."""
    from costserve.server.training import load_sklearn_digits

    return load_sklearn_digits()


Route = Callable[[str, dict[str, str]], tuple[int, str]]


@pytest.fixture
def http_server() -> Iterator[Callable[[Route], str]]:
    """Factory: a local HTTP server answering GETs with ``route(path, query) -> (status, body)``; yields its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(route: Route) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                status, body = route(url.path, dict(urllib.parse.parse_qsl(url.query)))
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                """Keep the test output quiet."""

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


# --- a repository of two models: the session's digits and an imported RGB model ------------------


def _build_rgb_model(path: Path) -> Any:
    """A small untrained RGB 32x32 classifier that outputs logits (seeded: the same weights every run)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(3)
    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=RGB_SHAPE),
            layers.Conv2D(8, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(RGB_CLASSES),
        ]
    )
    model.save(path)
    return model


@pytest.fixture(scope="session")
def rgb_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """An RGB Keras file, held-out data for it (npz), and the Keras model itself."""
    root = tmp_path_factory.mktemp("rgb-source")
    model = _build_rgb_model(root / "shapes.keras")
    rng = np.random.default_rng(5)
    np.savez(root / "holdout.npz", x=rng.integers(0, 256, (40, *RGB_SHAPE), dtype=np.uint8), y=rng.integers(0, 5, 40))
    return root / "shapes.keras", root / "holdout.npz", model


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, rgb_source: tuple[Path, Path, Any]) -> Path:
    """A repository holding digits (version 1, the session's model) and shapes (RGB, imported, version 1)."""
    from costserve.server.preprocessing import Preprocessing
    from costserve.server.repository.importer import import_model

    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(model_dir / "1", root / "digits" / "1")
    keras_file, holdout, _ = rgb_source
    import_model(
        keras_file,
        "shapes",
        root,
        holdout=holdout,
        preprocessing=Preprocessing(color_mode="rgb", resize="crop", scaling="symmetric", output="logits"),
        max_int8_drop=100.0,
    )
    return root
