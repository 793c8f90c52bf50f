"""Shared fixtures: one trained model per test run, and real servers on port 0 (server processes: benchmarks.launch)."""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO_ROOT / "examples" / "digits").glob("digit_*.png"))

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
