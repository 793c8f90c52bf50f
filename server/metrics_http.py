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
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

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


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's request handler without its line per request on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class _PooledWSGIServer(WSGIServer):
    """A WSGIServer whose accept loop queues connections for a pool instead of handling them.

    The owner runs ``serve_forever`` on one thread and :meth:`work` on each pool thread.
    """

    def __init__(self, host: str, port: int, app: _App, *, timeout_s: float, max_pending: int) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        # Bursts of connects wait in the kernel's backlog instead of retrying their SYN a second
        # later (then 2 s, 4 s, ...): the accept thread, one Python thread among others, may fall
        # behind a burst, and a backlog of only max_pending dropped the rest. Past max_pending,
        # the accept thread refuses them with a 503 as soon as it takes them up.
        self.request_queue_size = max(max_pending, socket.SOMAXCONN)
        self.timeout_s = timeout_s
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

    def work(self) -> None:
        """A pool thread: handle queued connections until it takes ``None``."""
        while (item := self.pending.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
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
    # shutdown() (unlike close()) wakes a thread blocked in recv or send on this socket.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # Already reset by the client.


def _plain(start_response: _StartResponse, status: str, text: str, headers: list[tuple[str, str]]) -> list[bytes]:
    body = text.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers]
    )
    return [body]


def _metrics_only(metrics_app: _App) -> _App:
    """Route GET and HEAD of /metrics to ``metrics_app``; 404 for other paths, 405 for other methods."""

    def app(environ: _Environ, start_response: _StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
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

    ``port`` is the port actually bound (the one asked for, or the free port picked for 0).
    """

    def __init__(self, httpd: _PooledWSGIServer, threads: int) -> None:
        self._httpd = httpd
        self.port: int = httpd.server_port
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
    threads: int = 4,
    timeout_s: float = 10.0,
    max_pending: int = 64,
) -> MetricsHttpServer:
    """Serve GET /metrics for ``registry`` on host:port from a fixed pool of ``threads`` threads.

    The exposition is prometheus_client's (``Accept`` chooses text or OpenMetrics,
    ``Accept-Encoding: gzip`` compresses, ``?name[]=`` filters). HEAD /metrics
    answers the same headers without the body; any other path answers 404 and any
    other method 405. One request per connection (HTTP/1.0).

    Args:
        registry: The metrics to serve.
        host: Address to listen on (e.g. 127.0.0.1; 0.0.0.0 or :: for every interface).
        port: TCP port; 0 picks a free one (read it from the result's ``port``).
        threads: Handler threads; with the accept thread, the server runs ``threads + 1`` threads.
        timeout_s: Seconds a connection may last from accept to the end of its answer,
            waiting in the queue included; the server then closes it (checked every 0.1 s).
            Also the timeout of each read and write on the socket.
        max_pending: Accepted connections that may wait for a free thread; beyond that a
            new connection is answered 503 and closed at once.

    Raises:
        ValueError: ``threads`` or ``max_pending`` below 1, or ``timeout_s`` not positive.
        OSError: The address cannot be bound.
    """
    if threads < 1 or max_pending < 1 or not timeout_s > 0:
        raise ValueError(
            f"need threads >= 1, max_pending >= 1 and timeout_s > 0, got {threads}, {max_pending}, {timeout_s}"
        )
    app = _metrics_only(make_wsgi_app(registry))
    httpd = _PooledWSGIServer(host, port, app, timeout_s=timeout_s, max_pending=max_pending)
    return MetricsHttpServer(httpd, threads)
