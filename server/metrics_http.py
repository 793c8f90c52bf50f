"""The Prometheus ``/metrics`` endpoint, served by a fixed pool of threads.

``prometheus_client.start_http_server`` starts a thread per connection and never
times a connection out, so idle sockets pile up threads without bound. Here one
accept thread hands connections to ``threads`` handler threads through a queue of
at most ``max_pending`` connections; a connection that finds the queue full is
answered 503 and closed at once. Every connection has ``timeout_s`` seconds in
total, from accept to the end of its response (time in the queue included); the
accept thread hangs up on any connection past that deadline.

The exposition itself is prometheus_client's WSGI app, so the ``Accept`` header
(text or OpenMetrics), ``Accept-Encoding: gzip`` and the ``name[]`` filter behave
exactly as there. Only ``GET`` and ``HEAD`` of ``/metrics`` are answered 200.

With :class:`MetricsTls` the port speaks HTTPS only. The pool thread that takes a
connection up wraps it and runs the handshake, under the connection's deadline like
the rest of its exchange, so a client that never finishes its handshake holds one pool
thread for ``timeout_s`` at most and never the accept thread. The certificate files are
checked at each new connection and reloaded when they changed; a certificate and key
that do not fit together (one of them replaced, not yet the other) are not served. With
``basic_auth`` (:mod:`~costserve.server.metrics_auth`), every request must carry the
credentials of a user of that file, whatever its path: without them it gets ``401``, and
learns nothing of what is served where.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from costserve.server.files import WatchedFiles
from costserve.server.metrics_auth import CHALLENGE, BasicAuth
from costserve.server.tls import CertificateFiles, is_loopback

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"

#: How often the accept thread checks deadlines and whether to stop, in seconds.
_POLL_INTERVAL_S = 0.1

_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 20\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"metrics server busy\n"
)

_Environ = dict[str, Any]
_StartResponse = Callable[..., Any]
_App = Callable[[_Environ, _StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class MetricsTls(CertificateFiles):
    """The files of /metrics' HTTPS (``--metrics-tls-cert``, ``--metrics-tls-key``, ``--metrics-tls-client-ca``).

    ``cert`` is a PEM certificate chain (the server's certificate first) and ``key`` its PEM
    private key; with ``client_ca`` (PEM CA certificates), every scraper must present a
    certificate one of them signed (mTLS).
    """

    flags: tuple[str, str, str] = ("--metrics-tls-cert", "--metrics-tls-key", "--metrics-tls-client-ca")

    def context(self) -> ssl.SSLContext:
        """A server-side SSLContext of the files as they are now.

        Raises:
            ValueError: A file cannot be read, is not PEM, or the certificate and key do not fit
                together; the message names the flag.
        """
        context = self.ssl_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The server answers HTTP/1.0 only: say so rather than let a client hope for h2.
        context.set_alpn_protocols(["http/1.1"])
        return context


def _reloading_context(tls: MetricsTls) -> WatchedFiles[ssl.SSLContext]:
    """The SSLContext of ``tls``, built again at the first connection after its files change and fit together."""
    return WatchedFiles(tls.paths(), tls.context, "/metrics TLS files")


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's request handler without its line per request on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class _PooledWSGIServer(WSGIServer):
    """A WSGIServer whose accept loop queues connections for a pool instead of handling them.

    The owner runs ``serve_forever`` on one thread and :meth:`work` on each pool thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: _App,
        *,
        timeout_s: float,
        max_pending: int,
        tls: WatchedFiles[ssl.SSLContext] | None = None,
    ) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        # Bursts of connects wait in the kernel's backlog instead of retrying their SYN a second
        # later (then 2 s, 4 s, ...): the accept thread, one Python thread among others, may fall
        # behind a burst, and a backlog of only max_pending dropped the rest. Past max_pending,
        # the accept thread refuses them with a 503 as soon as it takes them up.
        self.request_queue_size = max(max_pending, socket.SOMAXCONN)
        self.timeout_s = timeout_s
        self.tls = tls
        self.pending: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(max_pending)
        self._lock = threading.Lock()
        #: Every connection accepted and not yet closed (queued or being handled) -> its deadline (monotonic s).
        self._deadlines: dict[socket.socket, float] = {}
        # An AF_INET or AF_INET6 address: its host part is text (typeshed also admits other families').
        super().__init__((str(sockaddr[0]), port), _QuietHandler)
        self.set_app(app)

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]  # TCP requests are sockets
        """On the accept thread: queue the connection for the pool, or refuse it when the queue is full."""
        # Only this thread puts connections, so the queue cannot fill up between the check and the put.
        if self.pending.full():
            self._refuse(request)
            return
        request.settimeout(self.timeout_s)
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.timeout_s
        self.pending.put_nowait((request, client_address))

    def _refuse(self, request: socket.socket) -> None:
        # Over TLS a plain-text 503 would be garbage to the client, and a handshake is for the
        # pool to run, never the accept thread: the connection is only closed.
        if self.tls is None:
            try:
                # Non-blocking: the accept thread must never wait on a client.
                request.setblocking(False)
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
        self.shutdown_request(request)

    def service_actions(self) -> None:
        """On the accept thread, every poll: hang up on connections past their deadline."""
        # A socket timeout alone restarts with every byte, so a client trickling bytes would
        # keep its thread forever; the deadline bounds the whole connection.
        now = time.monotonic()
        with self._lock:
            expired = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
            for sock in expired:
                del self._deadlines[sock]
                _hang_up(sock)

    def hang_up_all(self) -> None:
        """Hang up on every open connection: queued ones and those being handled."""
        with self._lock:
            for sock in self._deadlines:
                _hang_up(sock)
            self._deadlines.clear()

    def _start_tls(self, request: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """Wrap ``request`` for TLS under the same deadline; the handshake is the caller's to run."""
        with self._lock:
            deadline = self._deadlines.pop(request, None)
            if deadline is None:
                raise ConnectionAbortedError("hung up before its handshake")  # past its deadline already
            # The wrapped socket takes over the descriptor (and the timeout): hang-ups must reach it.
            wrapped = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            self._deadlines[wrapped] = deadline
        return wrapped

    def work(self) -> None:
        """A pool thread: handle queued connections until it takes ``None``."""
        while (item := self.pending.get()) is not None:
            request, client_address = item
            try:
                if self.tls is not None:
                    request = self._start_tls(request, self.tls.current())
                    request.do_handshake()
                self.finish_request(request, client_address)
            except ssl.SSLError as error:
                log.debug("metrics TLS with %s failed: %s", client_address, error)  # scanners, wrong CAs
            except OSError:
                pass  # Timeouts, resets and hang-ups: the client went quiet or away.
            except Exception:
                log.exception("metrics request from %s failed", client_address)
            finally:
                # Forget the socket before closing it, so that no hang-up can reach a reused descriptor.
                with self._lock:
                    self._deadlines.pop(request, None)
                self.shutdown_request(request)


def _hang_up(sock: socket.socket) -> None:
    # shutdown() (unlike close()) wakes a thread blocked in recv or send on this socket. The
    # plain socket's: SSLSocket.shutdown would also drop the TLS state under the pool thread's feet.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # Already reset by the client.


def _plain(start_response: _StartResponse, status: str, text: str, headers: list[tuple[str, str]]) -> list[bytes]:
    body = text.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers]
    )
    return [body]


def _metrics_only(metrics_app: _App, auth: BasicAuth | None = None) -> _App:
    """Route GET and HEAD of /metrics to ``metrics_app``; 404 for other paths, 405 for other methods.

    With ``auth``, a request without a user's credentials gets 401 first, whatever its path and method.
    """

    def app(environ: _Environ, start_response: _StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if auth is not None and auth.authenticate(environ.get("HTTP_AUTHORIZATION")) is None:
            return _plain(
                start_response,
                "401 Unauthorized",
                "Unauthorized: send the user and password of --metrics-basic-auth (HTTP basic auth)\n",
                [("WWW-Authenticate", CHALLENGE)],
            )
        if environ["PATH_INFO"] != METRICS_PATH:
            return _plain(start_response, "404 Not Found", f"Not found: metrics are served at {METRICS_PATH}\n", [])
        if method not in ("GET", "HEAD"):
            return _plain(
                start_response,
                "405 Method Not Allowed",
                f"Method {method} not allowed: use GET or HEAD\n",
                [("Allow", "GET, HEAD")],
            )
        # prometheus_client's app answers GET only: HEAD runs it as a GET and drops the body.
        answer: list[tuple[str, list[tuple[str, str]]]] = []

        def keep_answer(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer.append((status, headers))

        body = b"".join(metrics_app({**environ, "REQUEST_METHOD": "GET"}, keep_answer))
        status, headers = answer[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body] if method == "GET" else []

    return app


class MetricsHttpServer:
    """A running /metrics endpoint, made by :func:`start_metrics_server`.

    ``port`` is the port actually bound (the one asked for, or the free port picked for 0),
    ``scheme`` is ``https`` with TLS and ``http`` without.
    """

    def __init__(self, httpd: _PooledWSGIServer, threads: int) -> None:
        self._httpd = httpd
        self.port: int = httpd.server_port
        self.scheme = "http" if httpd.tls is None else "https"
        self._closed = False
        self._close_lock = threading.Lock()
        # Daemon threads: a server never closed does not keep the process alive.
        self._accept_thread = threading.Thread(
            target=httpd.serve_forever, args=(_POLL_INTERVAL_S,), name="metrics-http-accept", daemon=True
        )
        self._workers = [
            threading.Thread(target=httpd.work, name=f"metrics-http-{index}", daemon=True) for index in range(threads)
        ]
        for thread in [*self._workers, self._accept_thread]:
            thread.start()

    def close(self) -> None:
        """Stop serving: close the listening socket and every open connection, and join all threads.

        Returns within about 0.1 s plus the time of any exposition already under way;
        calling it again does nothing.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()  # The accept loop has stopped when this returns.
        self._httpd.server_close()
        self._httpd.hang_up_all()
        for _ in self._workers:
            self._httpd.pending.put(None)
        for thread in [self._accept_thread, *self._workers]:
            thread.join()


def start_metrics_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    tls: MetricsTls | None = None,
    basic_auth: Path | None = None,
    threads: int = 4,
    timeout_s: float = 10.0,
    max_pending: int = 64,
) -> MetricsHttpServer:
    """Serve GET /metrics for ``registry`` on host:port from a fixed pool of ``threads`` threads.

    The exposition is prometheus_client's (``Accept`` chooses text or OpenMetrics,
    ``Accept-Encoding: gzip`` compresses, ``?name[]=`` filters). HEAD /metrics
    answers the same headers without the body; any other path answers 404 and any
    other method 405. One request per connection (HTTP/1.0). Listening beyond
    loopback without TLS or without basic auth logs a warning.

    Example::

        server = start_metrics_server(
            registry, "0.0.0.0", 8000,
            tls=MetricsTls(Path("server.pem"), Path("server.key")),
            basic_auth=Path("metrics-users"),
        )
        ...
        server.close()

    Args:
        registry: The metrics to serve.
        host: Address to listen on (e.g. 127.0.0.1; 0.0.0.0 or :: for every interface).
        port: TCP port; 0 picks a free one (read it from the result's ``port``).
        tls: Serve HTTPS only, with these files, reloaded when they change (checked at each
            new connection). None: plain HTTP.
        basic_auth: A users file (:mod:`~costserve.server.metrics_auth`): every request must
            carry the basic-auth credentials of one of its users, or gets 401. Re-read when it
            changes. None: no authentication.
        threads: Handler threads; with the accept thread, the server runs ``threads + 1`` threads.
        timeout_s: Seconds a connection may last from accept to the end of its answer,
            waiting in the queue included; the server then closes it (checked every 0.1 s).
            Also the timeout of each read and write on the socket.
        max_pending: Accepted connections that may wait for a free thread; beyond that a
            new connection is answered 503 and closed at once (over TLS, only closed).

    Raises:
        ValueError: ``threads`` or ``max_pending`` below 1, ``timeout_s`` not positive, or a TLS
            or users file that cannot be used (the message names its flag, e.g. ``--metrics-tls-cert``).
        OSError: The address cannot be bound.
    """
    if threads < 1 or max_pending < 1 or not timeout_s > 0:
        raise ValueError(
            f"need threads >= 1, max_pending >= 1 and timeout_s > 0, got {threads}, {max_pending}, {timeout_s}"
        )
    contexts = _reloading_context(tls) if tls is not None else None
    auth = BasicAuth(basic_auth) if basic_auth is not None else None
    app = _metrics_only(make_wsgi_app(registry), auth)
    httpd = _PooledWSGIServer(host, port, app, timeout_s=timeout_s, max_pending=max_pending, tls=contexts)
    if (warning := exposure_warning(host, tls, basic_auth)) is not None:
        log.warning("%s", warning)
    return MetricsHttpServer(httpd, threads)


def exposure_warning(host: str, tls: MetricsTls | None, basic_auth: Path | None) -> str | None:
    """What is missing when /metrics listens on ``host`` beyond this machine, or None when nothing is."""
    if is_loopback(host) or (tls is not None and basic_auth is not None):
        return None
    missing = [
        *(["plain text (set --metrics-tls-cert and --metrics-tls-key)"] if tls is None else []),
        *(["open to anyone (set --metrics-basic-auth)"] if basic_auth is None else []),
    ]
    return f"/metrics on {host} is {' and '.join(missing)} beyond this machine; see docs/security.md"
