"""The server process: gRPC (costserve.v1, health, reflection), /metrics, start-up and drain.

Start-up binds the ports first and reports ``NOT_SERVING`` on the health service
while the model loads and warms (training the default model when the model
directory is empty), then ``SERVING``. SIGTERM or SIGINT drains: health goes
``NOT_SERVING``, new RPCs are refused, every request already accepted is answered
(up to ``--drain-seconds``), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from costserve.server.budgets import TenantLedger, load_budgets
from costserve.server.core import InferenceCore
from costserve.server.cost import CostMeter, load_prices
from costserve.server.metrics import ServiceMetrics
from costserve.server.model_store import LoadedModel, latest_version_dir, load_model
from costserve.server.runtimes import configure_tensorflow_threads
from costserve.server.servicer import SERVICE_NAME, ClassifierServicer
from costserve.server.settings import Settings
from costserve.v1 import classifier_pb2_grpc

log = logging.getLogger(__name__)

#: During a drain, how long no new call may start before new calls are refused, in seconds.
DRAIN_QUIET_S = 0.25


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message size limits and keepalive policy."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Let clients keep idle channels alive with pings every 10 s or more.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def ensure_model(model_dir: Path) -> Path:
    """The newest model version in ``model_dir``; trains the default model when there is none."""
    version_dir = latest_version_dir(model_dir)
    if version_dir is None:
        log.info("no model in %s: training the default model on scikit-learn's digits (about a minute)", model_dir)
        from costserve.server.training import train_and_export

        version_dir = train_and_export(model_dir)
    return version_dir


@dataclass
class CostserveServer:
    """One costserve server. ``await start()`` binds and serves; ``await stop()`` drains.

    Example (tests use port 0 and read the bound ports)::

        server = CostserveServer(Settings(port=0, metrics_port=0, model_dir=Path("models/digits")))
        await server.start()
        print(server.port, server.metrics_port)
        await server.stop()
    """

    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    model: LoadedModel | None = None
    port: int = 0
    metrics_port: int = 0
    core: InferenceCore | None = None

    def __post_init__(self) -> None:
        self.meter = CostMeter(load_prices(self.settings.prices))
        self.ledger = TenantLedger(load_budgets(self.settings.budgets))
        self.metrics = ServiceMetrics(self.registry)
        self.health = health.aio.HealthServicer()
        self.servicer = ClassifierServicer()
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        """Bind gRPC and metrics, load (or train) and warm the model, then report SERVING."""
        self._grpc = grpc.aio.server(options=grpc_options(self.settings))
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._grpc.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {self.settings.host}:{self.settings.port}")
        await self._grpc.start()
        if self.settings.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.registry
            )
            self.metrics_port = self._metrics_http.server_port
        log.info(
            "gRPC on %s:%d (NOT_SERVING until the model is warm)%s",
            self.settings.host,
            self.port,
            f", metrics on http://{self.settings.host}:{self.metrics_port}/metrics" if self._metrics_http else "",
        )
        loop = asyncio.get_running_loop()
        if self.model is None:
            configure_tensorflow_threads(self.settings.inference_threads)
            version_dir = await loop.run_in_executor(None, ensure_model, self.settings.model_dir)
            self.model = await loop.run_in_executor(
                None, load_model, version_dir, self.settings.max_batch_size, self.settings.inference_threads
            )
        self.core = InferenceCore(self.model, self.settings, self.metrics, meter=self.meter, ledger=self.ledger)
        await self.core.start()
        self.servicer.core = self.core
        if not self._stopping:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        metadata = self.model.metadata
        log.info(
            "SERVING %s v%s %s: %s",
            metadata.name,
            metadata.version,
            "x".join(map(str, self.model.input_shape)),
            ", ".join(f"{name} accuracy {info.accuracy:.4f}" for name, info in metadata.variants.items()),
        )

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, answer those accepted (up to ``grace_s``), stop."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace_s = self.settings.drain_seconds if grace_s is None else grace_s
        log.info("draining: answering requests in flight (up to %.0f s)", grace_s)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # Calls clients sent before they saw the drain are still answered: keep serving until
        # nothing is in flight and no call has started for a moment. Stopping the transport
        # earlier would cancel the calls it holds but has not handed to a handler yet.
        while loop.time() < deadline and (
            self.servicer.calls.in_flight > 0 or time.monotonic() - self.servicer.calls.last_call_at < DRAIN_QUIET_S
        ):
            await asyncio.sleep(0.02)
        # Then refuse with UNAVAILABLE (a status clients retry) before closing the transport.
        self.servicer.calls.accepting = False
        await asyncio.sleep(min(DRAIN_QUIET_S, max(0.0, deadline - loop.time())))
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - loop.time()))
        if self.core is not None:
            await self.core.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()


async def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, drain, and return the exit status (0)."""
    server = CostserveServer(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    start = asyncio.ensure_future(server.start())
    await asyncio.wait([start, asyncio.ensure_future(stop_requested.wait())], return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        start.result()  # start-up failures end the process with their traceback
        await stop_requested.wait()
    else:
        start.cancel()
    await server.stop()
    return 0

