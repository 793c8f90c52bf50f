"""The /metrics endpoint (costserve.server.metrics_http): exposition, routing, and bounds on threads and time."""

from __future__ import annotations

import gzip
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from costserve.server.metrics_http import MetricsHttpServer, start_metrics_server

HOST = "127.0.0.1"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("test_requests", "Requests seen by the test.", registry=registry).inc(3)
    Counter("test_errors", "Errors seen by the test.", registry=registry).inc(1)
    return registry


@contextmanager
def _serving(**options: Any) -> Iterator[MetricsHttpServer]:
    server = start_metrics_server(_registry(), HOST, 0, **options)
    try:
        yield server
    finally:
        server.close()


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _open_idle(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=5)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection; TimeoutError if it does not within 5 s."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_metrics_serves_the_registry_as_prometheus_text() -> None:
    with _serving() as server:
        status, headers, body = _request(server.port, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "test_requests_total 3.0\n" in body.decode()


def test_metrics_is_gzipped_when_asked() -> None:
    with _serving() as server:
        status, headers, body = _request(server.port, "GET", "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert "test_requests_total 3.0\n" in gzip.decompress(body).decode()


def test_metrics_is_openmetrics_when_asked() -> None:
    with _serving() as server:
        status, headers, body = _request(server.port, "GET", "/metrics", {"Accept": "application/openmetrics-text"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


def test_metrics_name_filter_keeps_only_the_named_series() -> None:
    with _serving() as server:
        status, _, body = _request(server.port, "GET", "/metrics?name[]=test_errors_total")
    assert status == 200
    assert "test_errors_total 1.0\n" in body.decode()
    assert "test_requests" not in body.decode()


def test_head_metrics_answers_the_headers_of_get_without_a_body() -> None:
    with _serving() as server:
        _, get_headers, get_body = _request(server.port, "GET", "/metrics")
        # A raw socket: http.client never reads a body after HEAD, so it would hide one.
        with _open_idle(server.port) as sock:
            sock.sendall(b"HEAD /metrics HTTP/1.0\r\nAccept-Encoding: identity\r\n\r\n")
            head, _, body = _read_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert body == b""
    assert f"Content-Type: {get_headers['Content-Type']}\r\n".encode() in head + b"\r\n"
    assert f"Content-Length: {len(get_body)}\r\n".encode() in head + b"\r\n"


@pytest.mark.parametrize("path", ["/", "/foo", "/metrics/", "/favicon.ico", "/metricsx?name[]=test_requests_total"])
def test_other_paths_answer_404_naming_metrics(path: str) -> None:
    with _serving() as server:
        status, headers, body = _request(server.port, "GET", path)
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "/metrics" in text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_answer_405(method: str) -> None:
    with _serving() as server:
        status, headers, body = _request(server.port, method, "/metrics")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert b"test_requests" not in body


def test_requests_and_dropped_connections_write_nothing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with _serving(threads=1, timeout_s=0.2) as server:
        for method, path in [("GET", "/metrics"), ("HEAD", "/metrics"), ("GET", "/foo"), ("POST", "/metrics")]:
            _request(server.port, method, path)
        with _open_idle(server.port) as idle:
            assert _read_until_closed(idle) == b""
    assert capfd.readouterr().err == ""


def test_idle_sockets_add_no_threads_and_are_dropped_after_the_timeout() -> None:
    threads = 4
    before = threading.active_count()
    with _serving(threads=threads, timeout_s=0.5, max_pending=64) as server, ExitStack() as stack:
        opened_at = time.monotonic()
        idle = [stack.enter_context(_open_idle(server.port)) for _ in range(400)]
        # The pool threads plus the accept thread, and no thread per connection.
        assert threading.active_count() <= before + threads + 2

        # Each idle socket was either queued and then hung up on (b"") or refused with a 503.
        for sock in idle:
            received = _read_until_closed(sock)
            assert received == b"" or received.startswith(b"HTTP/1.0 503 ")
        assert threading.active_count() <= before + threads + 2

        status, _, body = _request(server.port, "GET", "/metrics")
        assert status == 200
        assert "test_requests_total 3.0\n" in body.decode()
        # Idle connections occupy the pool for about timeout_s, not timeout_s per connection.
        assert time.monotonic() - opened_at < 5.0


def test_a_full_queue_refuses_new_connections_with_503_at_once() -> None:
    # threads + max_pending = 2 connections can wait; timeout_s is far longer than the test.
    with _serving(threads=1, timeout_s=60.0, max_pending=1) as server, ExitStack() as stack:
        idle = [stack.enter_context(_open_idle(server.port)) for _ in range(3)]
        readable, _, _ = select.select(idle, [], [], 5.0)
        assert readable, "no connection was refused"
        for sock in readable:
            assert _read_until_closed(sock).startswith(b"HTTP/1.0 503 Service Unavailable\r\n")


def test_a_half_sent_request_is_dropped_after_the_timeout() -> None:
    with _serving(threads=1, timeout_s=0.5) as server, _open_idle(server.port) as half:
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert b"200 OK" not in _read_until_closed(half)
        status, _, _ = _request(server.port, "GET", "/metrics")
        assert status == 200


def test_a_trickling_client_is_dropped_after_the_timeout() -> None:
    # One byte every 0.1 s would reset a per-read timeout of 0.5 s forever.
    with _serving(threads=1, timeout_s=0.5) as server, _open_idle(server.port) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        closed = False
        while not closed and time.monotonic() - started < 5.0:
            try:
                slow.sendall(b"X")
                readable, _, _ = select.select([slow], [], [], 0.1)
                closed = bool(readable) and slow.recv(4096) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the server kept a trickling connection open for 5 s with timeout_s=0.5"


def test_close_is_prompt_with_idle_connections_and_frees_the_port() -> None:
    before = threading.active_count()
    with _serving(threads=2, timeout_s=10.0, max_pending=4) as server, ExitStack() as stack:
        # One more than threads + max_pending: a 503 shows the others are accepted, held by the pool or queued.
        idle = [stack.enter_context(_open_idle(server.port)) for _ in range(2 + 4 + 1)]
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\n")
        refused, _, _ = select.select(idle, [], [], 5.0)
        assert refused

        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2.0

        for sock in idle:
            sock.settimeout(2.0)
            assert b"200 OK" not in _read_until_closed(sock)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, server.port), timeout=2).close()
        assert threading.active_count() <= before
    # _serving closed it a second time on the way out: close() is idempotent.
