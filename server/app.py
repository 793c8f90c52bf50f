"""The server process: gRPC (costserve.v1, the standard protocols, health, reflection), /metrics, start-up and drain.

One port speaks every protocol: costserve.v1, the Open Inference Protocol v2
(:mod:`~costserve.server.open_inference`) and TensorFlow Serving's API
(:mod:`~costserve.server.tensorflow_serving`), each a thin front end over the one core.

Start-up binds the ports first and reports ``NOT_SERVING`` on the health service
while the models load and warm (training the default model when the repository is
empty), then ``SERVING``; the repository manager then keeps the served versions in
step with the repository (every ``--poll-seconds``, and on SIGHUP) without leaving
``SERVING``. Every service is registered behind the
:mod:`~costserve.server.rpc_gate`: undecodable messages get ``INVALID_ARGUMENT``, and
prediction calls past ``--max-concurrent-rpcs`` get ``RESOURCE_EXHAUSTED``, counted.

SIGTERM or SIGINT drains: health goes ``NOT_SERVING`` and new calls are still answered
for ``--drain-grace-seconds`` (clients and load balancers need a moment to see it);
then new calls get ``UNAVAILABLE`` (a status clients retry), the calls in flight finish
(up to ``--drain-seconds``), and the process exits 0. No call the server accepted is
cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from costserve.protocols import (
    inference_pb2,
    tensorflow_pb2,
    tensorflow_serving_pb2,
    tensorflow_serving_pb2_grpc,
)
from costserve.server import open_inference, tensorflow_serving
from costserve.server.auth import Access, Authenticator
from costserve.server.budgets import TenantLedger, load_budgets
from costserve.server.core import InferenceCore
from costserve.server.cost import CostMeter, load_prices
from costserve.server.domain import Protocol
from costserve.server.errors import CostserveError, StartupError
from costserve.server.logs import quiet_client_errors
from costserve.server.memory import fix_mmap_threshold
from costserve.server.metrics import ServiceMetrics
from costserve.server.metrics_http import MetricsHttpServer, MetricsTls, start_metrics_server
from costserve.server.repository.manager import RepositoryManager
from costserve.server.repository.store import LoadedModel, latest_version_dir, list_models, list_versions
from costserve.server.rpc_gate import CallerCheck, CallGate, MethodCollector, guard_services
from costserve.server.servicer import SERVICE_NAME, ClassifierServicer, request_parsers
from costserve.server.settings import Settings
from costserve.server.tls import ServerCertificates, is_loopback
from costserve.server.transport import TransportCalls, server_ids
from costserve.v1 import classifier_pb2, classifier_pb2_grpc

if TYPE_CHECKING:
    from costserve.server.machine import MachineState

log = logging.getLogger(__name__)

#: The protocol each front end's calls are counted under, by service name.
PROTOCOL_OF_SERVICE = {
    SERVICE_NAME: Protocol.V1,
    open_inference.SERVICE_NAME: Protocol.V2,
    tensorflow_serving.PREDICTION_SERVICE: Protocol.TFSERVING,
    tensorflow_serving.MODEL_SERVICE: Protocol.TFSERVING,
}
#: Services and methods admitted through the call gate (in-flight bound, loading, drain). The v2
#: liveness and readiness calls are not: they answer while the model loads and under overload.
GATED = {
    SERVICE_NAME,
    tensorflow_serving.PREDICTION_SERVICE,
    tensorflow_serving.MODEL_SERVICE,
    *(f"{open_inference.SERVICE_NAME}/{method}" for method in ("ModelInfer", "ModelMetadata", "RepositoryIndex")),
}

#: The prediction methods of every protocol: their caller check decides the tenant charged.
PREDICTION_METHODS = (
    f"{SERVICE_NAME}/Predict",
    f"{SERVICE_NAME}/PredictStream",
    f"{open_inference.SERVICE_NAME}/ModelInfer",
    f"{tensorflow_serving.PREDICTION_SERVICE}/Predict",
)
#: The methods that describe the served models, open to the callers ``--model-info`` admits. v2
#: ServerLive, ServerReady, ServerMetadata and ModelReady stay open, like health.
MODEL_INFO_METHODS = (
    f"{SERVICE_NAME}/GetModelInfo",
    f"{SERVICE_NAME}/ListModels",
    f"{open_inference.SERVICE_NAME}/ModelMetadata",
    f"{open_inference.SERVICE_NAME}/RepositoryIndex",
    f"{tensorflow_serving.PREDICTION_SERVICE}/GetModelMetadata",
    f"{tensorflow_serving.MODEL_SERVICE}/GetModelStatus",
)

#: How often a worker's health follows the machine's (every worker SERVING or not), in seconds.
HEALTH_SYNC_S = 0.1
#: Where a worker's own /metrics listens: its supervisor merges them into the machine's.
LOOPBACK = "127.0.0.1"

#: The embedded default model's name: trained into the repository when it holds no model.
DEFAULT_MODEL_NAME = "digits"

#: After the drain's calls in flight are done, how long the transport may take to close, in
#: seconds: what it still holds then are refusals (UNAVAILABLE) and health watches.
TRANSPORT_CLOSE_S = 0.5


def grpc_options(settings: Settings, share_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments of the server: message size limits, stream limits and keepalive policy.

    ``share_port``: bind with ``SO_REUSEPORT``, beside the other workers of ``--workers``.
    """
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if share_port else 0),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Count streams as HTTP/2 does, so a client at the limit waits for a stream rather than
        # having new ones refused (RST_STREAM REFUSED_STREAM, UNAVAILABLE and uncounted) while
        # finished ones are still being freed.
        ("grpc.http.overload_protection", 0),
        # Calls gRPC has received but the event loop has not taken up yet. The loop takes them
        # first come first served, so an unbounded backlog under sustained overload holds only
        # calls whose deadline passed while they waited, and nothing gets answered. Past the
        # bound gRPC drops new calls before the loop pays for them (counted by channelz). Soft
        # and hard limit alike: no random early drops, so a burst within the bound is whole.
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_calls),
        # Let clients keep idle channels alive with pings every 10 s or more.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def write_ready_file(path: Path, ready: dict[str, Any]) -> None:
    """Write ``--ready-file``'s JSON whole beside it, then rename it into place: a launcher sees all or nothing."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ready) + "\n")
    os.replace(partial, path)


def start_metrics_endpoint(settings: Settings, registry: CollectorRegistry, host: str) -> MetricsHttpServer:
    """Serve ``registry`` on ``host`` and ``--metrics-port``, with the TLS and basic auth the settings give.

    Warns by itself when /metrics is exposed beyond loopback without TLS or basic auth.
    """
    tls = (
        MetricsTls(settings.metrics_tls_cert, settings.metrics_tls_key, settings.metrics_tls_client_ca)
        if settings.metrics_tls_cert is not None and settings.metrics_tls_key is not None
        else None
    )
    try:
        return start_metrics_server(
            registry, host, settings.metrics_port, tls=tls, basic_auth=settings.metrics_basic_auth
        )
    except OSError as error:
        raise StartupError(
            f"cannot serve /metrics on {host}:{settings.metrics_port}: {error.strerror or error}; choose another "
            "--metrics-port (0 picks a free one, -1 turns /metrics off)"
        ) from error


def ensure_model(model_dir: Path) -> Path:
    """The newest model version in ``model_dir``; trains the default model into it when there is none.

    Training runs as ``costserve-server train`` in a process of its own: in this one, its
    Python would hold the GIL for most of a minute and keep the event loop from answering
    even health checks (NOT_SERVING) on a busy host.
    """
    version_dir = latest_version_dir(model_dir)
    if version_dir is None:
        log.info("no model in %s: training the default model on scikit-learn's digits (about a minute)", model_dir)
        command = [sys.executable, "-m", "costserve.server.cli", "train", "--model-dir", str(model_dir)]
        trained = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)  # its log goes to stderr
        version_dir = latest_version_dir(model_dir)
        if trained.returncode != 0 or version_dir is None:
            raise RuntimeError(f"training the default model into {model_dir} failed (exit {trained.returncode})")
    return version_dir


def prepare_models(settings: Settings) -> None:
    """Train the default model when there is no model to serve.

    With ``--model-dir``, into that directory when it has no version; otherwise into
    ``<repository>/digits`` when no model of the repository has a version. Run off the
    event loop: training waits for a process of its own for most of a minute, during which
    the loop must go on answering health checks. TensorFlow is not imported here: the first
    SavedModel runtime imports and sizes it (see :mod:`costserve.server.runtimes`), and a
    process serving only LiteRT never does.
    """
    if settings.model_dir is not None:
        ensure_model(settings.model_dir)
    elif not any(list_versions(model) for model in list_models(settings.model_repository)):
        ensure_model(settings.model_repository / DEFAULT_MODEL_NAME)


@dataclass
class CostserveServer:
    """One costserve server. ``await start()`` binds and serves; ``await stop()`` drains.

    Example (tests use port 0 and read the bound ports)::

        server = CostserveServer(Settings(port=0, metrics_port=0, model_repository=Path("models")))
        await server.start()
        print(server.port, server.metrics_port)
        await server.stop()
    """

    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: A version already loaded (tests share one): served without loading it again, never closed here.
    model: LoadedModel | None = None
    port: int = 0
    metrics_port: int = 0
    core: InferenceCore | None = None
    #: The machine's shared state when this server is one worker of ``--workers``: its port is shared,
    #: its utilization and budgets are the machine's, its health says SERVING when every worker is.
    machine: MachineState | None = None

    def __post_init__(self) -> None:
        self.meter = CostMeter(load_prices(self.settings.prices), machine=self.machine)
        self.ledger = TenantLedger(load_budgets(self.settings.budgets), machine=self.machine)
        self.metrics = ServiceMetrics(self.registry)
        self.health = health.aio.HealthServicer()
        self.servicer = ClassifierServicer()
        self.open_inference = open_inference.OpenInferenceServicer(ready=self._takes_predictions)
        self.tf_prediction = tensorflow_serving.PredictionServicer()
        self.tf_models = tensorflow_serving.ModelServicer()
        #: Admission of prediction calls: closed while the model loads, the in-flight bound, and the
        #: drain's refusal of new calls. The drain's call tracking is its count of calls in flight.
        self.gate = CallGate(self.settings.max_concurrent_rpcs, on_refused=self._count_refused, ready=False)
        #: Who is calling, and the tenant each call is charged to (files are read now: unusable ones stop here).
        self.authenticator = Authenticator.from_settings(self.settings)
        self.repository: RepositoryManager | None = None
        #: The gRPC port's TLS files, when it speaks TLS.
        self.certificates: ServerCertificates | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._health_sync: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Bind gRPC and metrics, load (or train) and warm the model, then report SERVING."""
        quiet_client_errors(asyncio.get_running_loop())
        servers_before = server_ids()
        self._grpc = grpc.aio.server(options=grpc_options(self.settings, share_port=self.machine is not None))
        transport = TransportCalls.of_new_server(servers_before)
        if transport is not None:
            self.metrics.track_transport(transport.read)
        services = MethodCollector()
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self.servicer, services)
        open_inference.add_to_server(self.open_inference, services)
        tensorflow_serving_pb2_grpc.add_PredictionServiceServicer_to_server(self.tf_prediction, services)
        tensorflow_serving_pb2_grpc.add_ModelServiceServicer_to_server(self.tf_models, services)
        health_pb2_grpc.add_HealthServicer_to_server(
            self.health,
            services,  # type: ignore[arg-type]  # a stand-in Server: only its add_* methods are called
        )
        if self.settings.reflection != Access.OFF.value:
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(
                    (*PROTOCOL_OF_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), pool=reflection_pool()
                ),
                services,
            )
        guard_services(
            self._grpc,
            services,
            self.gate,
            gated=GATED,
            on_refused=self._count_refused,
            parsers={
                **request_parsers(self.settings.max_images_per_request),
                **open_inference.request_parsers(self.settings.max_images_per_request),
                **tensorflow_serving.request_parsers(self.settings.max_images_per_request),
            },
            checks=self._caller_checks(),
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.settings.tls_cert is not None and self.settings.tls_key is not None:
                self.certificates = ServerCertificates(
                    self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca
                )
                self.port = self._grpc.add_secure_port(address, self.certificates.credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as error:  # gRPC's "Failed to bind to address ..."
            raise StartupError(
                f"cannot listen on {address}: the address is in use, or not one of this machine's; choose another "
                "--port or --host (or stop the server using it)"
            ) from error
        if self.certificates is None and not is_loopback(self.settings.host):
            log.warning(
                "gRPC on %s is plain text beyond this machine: anyone on the network can read and send "
                "requests (set --tls-cert and --tls-key; see docs/security.md)",
                self.settings.host,
            )
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {self.settings.host}:{self.settings.port}")
        await self._grpc.start()
        if self.settings.metrics_port >= 0:
            # A worker's /metrics is read by its supervisor only: on this machine's loopback.
            host = LOOPBACK if self.machine is not None else self.settings.host
            self._metrics_http = start_metrics_endpoint(self.settings, self.registry, host)
            self.metrics_port = self._metrics_http.port
        self._write_ready_file(serving=False)
        log.info(
            "gRPC%s on %s:%d (NOT_SERVING until the model is warm)%s",
            "" if self.certificates is None else " (mTLS)" if self.settings.tls_client_ca else " (TLS)",
            self.settings.host,
            self.port,
            f", metrics on {self._metrics_http.scheme}://{self.settings.host}:{self.metrics_port}/metrics"
            if self._metrics_http
            else "",
        )
        loop = asyncio.get_running_loop()
        if self.model is None:
            await loop.run_in_executor(None, prepare_models, self.settings)
        self.core = InferenceCore(None, self.settings, self.metrics, meter=self.meter, ledger=self.ledger)
        self.repository = RepositoryManager(
            self.core, self.settings, self.metrics, preloaded=[self.model] if self.model is not None else None
        )
        await self.repository.start()
        await self.core.start()
        for front_end in (self.servicer, self.open_inference, self.tf_prediction, self.tf_models):
            front_end.core = self.core
        self.gate.ready = True
        if not self._stopping:
            if self.machine is not None:
                self.machine.set_serving(True)
                self._health_sync = asyncio.ensure_future(self._follow_machine_health())
            else:
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self._write_ready_file(serving=True)
        log.info(
            "SERVING %s (default %s)",
            ", ".join(f"{served.name} v{served.version}" for served in self.core.served_versions()),
            self.core.default_model_name(),
        )

    async def _follow_machine_health(self) -> None:
        """A worker's health: SERVING while every worker of the machine is, NOT_SERVING otherwise."""
        assert self.machine is not None
        serving: bool | None = None
        while not self._stopping:
            # Publishes this worker's CPU for the others' utilization, even while it gets no calls.
            self.meter.utilization()
            every_worker = self.machine.all_serving()
            if every_worker != serving:
                serving = every_worker
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self._set_health(status)
            await asyncio.sleep(HEALTH_SYNC_S)

    def _caller_checks(self) -> dict[str, CallerCheck]:
        """Each method's caller check: predictions decide their tenant; model information and reflection
        admit the callers their setting allows. Health and v2 liveness and readiness stay open."""
        authenticator = self.authenticator
        checks: dict[str, CallerCheck] = dict.fromkeys(PREDICTION_METHODS, authenticator.admit_prediction)
        model_info = authenticator.access_check(Access(self.settings.model_info), "model information (--model-info)")
        if model_info is not None:
            checks.update(dict.fromkeys(MODEL_INFO_METHODS, model_info))
        reflection_check = authenticator.access_check(Access(self.settings.reflection), "reflection (--reflection)")
        if reflection_check is not None:
            checks[reflection.SERVICE_NAME] = reflection_check
        return checks

    def _write_ready_file(self, serving: bool) -> None:
        """Announce the bound ports to a launcher (``--ready-file``): written whole, then renamed into place."""
        if self.settings.ready_file is None:
            return
        ready = {
            "pid": os.getpid(),
            "host": self.settings.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "serving": serving,
        }
        write_ready_file(self.settings.ready_file, ready)

    def _count_refused(self, service: str, method: str, error: CostserveError) -> None:
        """Count a call refused before it reached the core (its precision unknown: counted as asked, auto)."""
        protocol = PROTOCOL_OF_SERVICE.get(service)
        self.metrics.count_refused(protocol.value if protocol else "", method, "auto", error)

    def _takes_predictions(self) -> bool:
        """Whether prediction calls are admitted now: the models are warm and the drain has not begun."""
        return self.gate.ready and self.gate.accepting

    async def _set_health(self, status: int) -> None:
        for service in ("", *PROTOCOL_OF_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = None, close_transport: bool = True) -> None:
        """Drain: NOT_SERVING, answer new calls for the drain grace, then refuse them and finish those in flight.

        ``grace_s`` bounds the calls in flight after the grace (default ``--drain-seconds``).
        ``close_transport=False`` leaves gRPC's connections for the process's exit to close
        (see :func:`serve`).
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        grace_s = self.settings.drain_seconds if grace_s is None else grace_s
        log.info(
            "draining: NOT_SERVING; answering new calls for %.1f s more, then finishing those in flight (up to %.0f s)",
            self.settings.drain_grace_seconds,
            grace_s,
        )
        if self._health_sync is not None:
            self._health_sync.cancel()
        if self.machine is not None:
            self.machine.set_serving(False)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.ready_file is not None:
            self.settings.ready_file.unlink(missing_ok=True)
        await asyncio.sleep(self.settings.drain_grace_seconds)
        self.gate.accepting = False  # new calls now get UNAVAILABLE, a status clients retry elsewhere
        deadline = loop.time() + grace_s
        while self.gate.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.gate.in_flight:
            log.warning("%d calls still in flight after %.0f s: stopping anyway", self.gate.in_flight, grace_s)
        if self._grpc is not None and close_transport:
            # What the transport still holds are refusals and health watches: they end at once or may be cut.
            await self._grpc.stop(TRANSPORT_CLOSE_S)
        if self.repository is not None:
            await self.repository.stop()
        if self.core is not None:
            await self.core.stop()
        if self._metrics_http is not None:
            self._metrics_http.close()
        log.info("stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served service's files in one pool, for reflection.

    The standard protocols' messages live apart from protobuf's default pool (see
    :mod:`costserve.protocols.pool`), so reflection reads this pool rather than the default.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (
        any_pb2,
        wrappers_pb2,
        classifier_pb2,
        health_pb2,
        reflection_pb2,
        inference_pb2,
        tensorflow_pb2,
        tensorflow_serving_pb2,
    ):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


async def serve(settings: Settings, machine: MachineState | None = None) -> NoReturn:
    """Run a server until SIGTERM or SIGINT, drain, and exit the process with status 0.

    ``machine``: this server is a worker of ``--workers``, sharing the port and that state.
    """
    fix_mmap_threshold()
    server = CostserveServer(settings, machine=machine)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.repository.poll_now() if server.repository else None)
    start = asyncio.ensure_future(server.start())
    await asyncio.wait([start, asyncio.ensure_future(stop_requested.wait())], return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        try:
            start.result()  # other start-up failures end the process with their traceback
        except StartupError as error:
            print(f"costserve-server: {error}", file=sys.stderr)
            logging.shutdown()
            sys.stderr.flush()
            os._exit(2)  # before gRPC's and asyncio's teardown, as after a drain below
        await stop_requested.wait()
    else:
        start.cancel()
    await server.stop(close_transport=False)
    # Every call costserve accepted is answered. gRPC's own shutdown would now end the calls
    # it has received but not handed over yet with CANCELLED, a status clients do not retry;
    # connections the exiting process closes end them with UNAVAILABLE, which clients retry
    # elsewhere. So the process exits here, before asyncio and gRPC tear down.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
