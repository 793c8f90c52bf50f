"""The /metrics endpoint (costserve.server.metrics_http): exposition, routing, bounds on threads and time, TLS, auth."""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import os
import select
import shutil
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from pki import Issued, Pki, make_pki
from prometheus_client import CollectorRegistry, Counter

from costserve.server.metrics_auth import BasicAuth, add_user, hash_password
from costserve.server.metrics_http import MetricsHttpServer, MetricsTls, exposure_warning, start_metrics_server

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


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def _client_context(pki: Pki, cert: Issued | None = None) -> ssl.SSLContext:
    """A scraper's context: it checks the server against the test CA, and presents ``cert`` when given."""
    context = ssl.create_default_context(cafile=pki.ca.cert)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def _https_request(
    port: int, context: ssl.SSLContext, path: str = "/metrics", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPSConnection(HOST, port, timeout=5, context=context)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection is shown."""
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _install(source: Path, target: Path) -> None:
    """Replace ``target`` with a copy of ``source`` as deployment tools do: written aside, renamed over it."""
    staged = target.with_name(target.name + ".new")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def _served_copy(pki: Pki, directory: Path) -> MetricsTls:
    """The server certificate and key copied to files of their own, for a test to replace."""
    tls = MetricsTls(directory / "served.pem", directory / "served.key")
    shutil.copyfile(pki.server.cert, tls.cert)
    shutil.copyfile(pki.server.key, tls.key)
    return tls


def test_tls_serves_metrics_to_a_scraper_that_checks_the_ca(pki: Pki) -> None:
    with _serving(tls=MetricsTls(pki.server.cert, pki.server.key)) as server:
        assert server.scheme == "https"
        status, headers, body = _https_request(server.port, _client_context(pki))
        assert _served_serial(server.port, _client_context(pki)) == pki.server.serial
        # The system's roots do not know the test CA.
        with pytest.raises(ssl.SSLCertVerificationError):
            _https_request(server.port, ssl.create_default_context())
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "test_requests_total 3.0\n" in body.decode()


def test_plain_http_to_the_tls_port_gets_no_answer(pki: Pki) -> None:
    with _serving(tls=MetricsTls(pki.server.cert, pki.server.key)) as server:
        with _open_idle(server.port) as plain:
            plain.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            received = _read_until_closed(plain)
        # The port still serves TLS after a plain-text client.
        status, _, _ = _https_request(server.port, _client_context(pki))
    assert b"HTTP/" not in received and b"test_requests" not in received
    assert status == 200


@pytest.mark.parametrize("scraper", ["no certificate", "a certificate another CA signed"])
def test_mtls_refuses_a_scraper_without_a_certificate_of_the_client_ca(pki: Pki, scraper: str) -> None:
    presented = None if scraper == "no certificate" else pki.stranger
    with _serving(tls=MetricsTls(pki.server.cert, pki.server.key, client_ca=pki.ca.cert)) as server:
        status, _, body = _https_request(server.port, _client_context(pki, pki.client))
        # TLS 1.3 reports the refusal on the client's first read, as an alert or a reset.
        with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
            _https_request(server.port, _client_context(pki, presented))
    assert status == 200 and "test_requests_total 3.0\n" in body.decode()


def test_a_rotated_certificate_is_served_to_the_next_connection(pki: Pki, tmp_path: Path) -> None:
    tls = _served_copy(pki, tmp_path)
    with _serving(tls=tls) as server:
        assert _served_serial(server.port, _client_context(pki)) == pki.server.serial
        rotated = pki.issue_server("rotated")
        _install(rotated.key, tls.key)
        _install(rotated.cert, tls.cert)
        assert _served_serial(server.port, _client_context(pki)) == rotated.serial
        status, _, _ = _https_request(server.port, _client_context(pki))
    assert status == 200


def test_a_half_replaced_certificate_is_not_served_and_warned_once(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = _served_copy(pki, tmp_path)
    with _serving(tls=tls) as server, caplog.at_level(logging.WARNING, logger="costserve.server.metrics_http"):
        rotated = pki.issue_server("rotated")
        _install(rotated.cert, tls.cert)  # the certificate first: its key does not match yet
        for _ in range(3):
            assert _served_serial(server.port, _client_context(pki)) == pki.server.serial
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot be used" in warnings[0].getMessage()
        assert "--metrics-tls-cert" in warnings[0].getMessage()
        _install(rotated.key, tls.key)
        assert _served_serial(server.port, _client_context(pki)) == rotated.serial


@pytest.mark.parametrize(
    ("case", "flag"),
    [
        ("missing certificate", "--metrics-tls-cert"),
        ("key of another certificate", "--metrics-tls-key"),
        ("client CA not PEM", "--metrics-tls-client-ca"),
    ],
)
def test_unusable_tls_files_at_start_raise_naming_the_flag(pki: Pki, tmp_path: Path, case: str, flag: str) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    tls = {
        "missing certificate": MetricsTls(tmp_path / "absent.pem", pki.server.key),
        "key of another certificate": MetricsTls(pki.server.cert, pki.client.key),
        "client CA not PEM": MetricsTls(pki.server.cert, pki.server.key, client_ca=not_pem),
    }[case]
    with pytest.raises(ValueError, match=flag):
        start_metrics_server(_registry(), HOST, 0, tls=tls)


#: The first bytes of a TLS record (a handshake message of 5 bytes) and nothing more.
_STALLED_HANDSHAKE = b"\x16\x03\x01\x00\x05"


def test_a_stalled_handshake_holds_one_pool_thread_and_never_the_accept_thread(pki: Pki) -> None:
    # timeout_s far longer than the test: the stalled client is still there when the other is answered.
    with (
        _serving(tls=MetricsTls(pki.server.cert, pki.server.key), threads=2, timeout_s=60.0) as server,
        _open_idle(server.port) as stalled,
    ):
        stalled.sendall(_STALLED_HANDSHAKE)
        status, _, _ = _https_request(server.port, _client_context(pki))
        readable, _, _ = select.select([stalled], [], [], 0)
        assert not readable, "the stalled connection was closed before its deadline"
    assert status == 200


def test_a_stalled_handshake_is_dropped_at_the_timeout_and_frees_its_thread(pki: Pki) -> None:
    # One pool thread: the second scraper is answered only once the stalled one let it go.
    with (
        _serving(tls=MetricsTls(pki.server.cert, pki.server.key), threads=1, timeout_s=0.5) as server,
        _open_idle(server.port) as stalled,
    ):
        stalled.sendall(_STALLED_HANDSHAKE)
        assert _read_until_closed(stalled) == b""
        status, _, body = _https_request(server.port, _client_context(pki))
    assert status == 200 and "test_requests_total 3.0\n" in body.decode()


def test_a_full_queue_over_tls_closes_new_connections_without_plain_text(pki: Pki) -> None:
    tls = MetricsTls(pki.server.cert, pki.server.key)
    with _serving(tls=tls, threads=1, timeout_s=60.0, max_pending=1) as server, ExitStack() as stack:
        idle = [stack.enter_context(_open_idle(server.port)) for _ in range(3)]
        readable, _, _ = select.select(idle, [], [], 5.0)
        assert readable, "no connection was refused"
        for sock in readable:
            assert _read_until_closed(sock) == b""


def test_tls_handshake_failures_write_nothing_to_stderr(pki: Pki, capfd: pytest.CaptureFixture[str]) -> None:
    tls = MetricsTls(pki.server.cert, pki.server.key, client_ca=pki.ca.cert)
    with _serving(tls=tls, threads=1, timeout_s=0.2) as server:
        with _open_idle(server.port) as plain:
            plain.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            _read_until_closed(plain)
        with pytest.raises(OSError):
            _https_request(server.port, _client_context(pki))
        with _open_idle(server.port) as stalled:
            stalled.sendall(_STALLED_HANDSHAKE)
            _read_until_closed(stalled)
    assert capfd.readouterr().err == ""


# -------------------------------------------------------------------- basic auth


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def users(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A users file with two users, and their passwords."""
    path = tmp_path / "metrics-users"
    return path, {user: add_user(path, user) for user in ("prometheus", "backup")}


@pytest.mark.parametrize(
    "credentials",
    ["none", "wrong password", "unknown user", "empty password", "not base64", "no colon", "bearer token"],
)
def test_basic_auth_refuses_missing_or_wrong_credentials_with_401(
    users: tuple[Path, dict[str, str]], credentials: str
) -> None:
    path, passwords = users
    headers = {
        "none": {},
        "wrong password": _basic("prometheus", passwords["backup"]),
        "unknown user": _basic("grafana", passwords["prometheus"]),
        "empty password": _basic("prometheus", ""),
        "not base64": {"Authorization": "Basic !!!"},
        "no colon": {"Authorization": "Basic " + base64.b64encode(b"prometheus").decode()},
        "bearer token": {"Authorization": f"Bearer {passwords['prometheus']}"},
    }[credentials]
    with _serving(basic_auth=path) as server:
        status, response_headers, body = _request(server.port, "GET", "/metrics", headers)
    assert status == 401
    assert response_headers["WWW-Authenticate"] == 'Basic realm="costserve metrics", charset="UTF-8"'
    assert b"test_requests" not in body


def test_basic_auth_admits_each_user_of_the_file(users: tuple[Path, dict[str, str]]) -> None:
    path, passwords = users
    with _serving(basic_auth=path) as server:
        for user, password in passwords.items():
            for _ in range(2):  # checked by scrypt, then remembered
                status, _, body = _request(server.port, "GET", "/metrics", _basic(user, password))
                assert status == 200 and "test_requests_total 3.0\n" in body.decode()
        # The scheme's name is case-insensitive (RFC 7617).
        token = base64.b64encode(f"backup:{passwords['backup']}".encode()).decode()
        status, _, _ = _request(server.port, "GET", "/metrics", {"Authorization": f"basic {token}"})
        assert status == 200


def test_basic_auth_comes_before_404_and_405(users: tuple[Path, dict[str, str]]) -> None:
    """Without credentials nothing is revealed, not even which paths exist; with them, routing is as before."""
    path, passwords = users
    with _serving(basic_auth=path) as server:
        for method, path_asked, authenticated in [
            ("GET", "/foo", 404),
            ("POST", "/metrics", 405),
            ("HEAD", "/metrics", 200),
        ]:
            status, headers, _ = _request(server.port, method, path_asked)
            assert status == 401 and "WWW-Authenticate" in headers
            status, _, _ = _request(server.port, method, path_asked, _basic("prometheus", passwords["prometheus"]))
            assert status == authenticated


def test_a_user_removed_from_the_file_is_refused_on_the_next_request(users: tuple[Path, dict[str, str]]) -> None:
    path, passwords = users
    with _serving(basic_auth=path) as server:
        assert _request(server.port, "GET", "/metrics", _basic("prometheus", passwords["prometheus"]))[0] == 200
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("backup:")))
        assert _request(server.port, "GET", "/metrics", _basic("prometheus", passwords["prometheus"]))[0] == 401
        assert _request(server.port, "GET", "/metrics", _basic("backup", passwords["backup"]))[0] == 200


def test_a_new_password_replaces_the_old_one_on_the_next_request(users: tuple[Path, dict[str, str]]) -> None:
    path, passwords = users
    with _serving(basic_auth=path) as server:
        assert _request(server.port, "GET", "/metrics", _basic("prometheus", passwords["prometheus"]))[0] == 200
        new = add_user(path, "prometheus")
        assert _request(server.port, "GET", "/metrics", _basic("prometheus", passwords["prometheus"]))[0] == 401
        assert _request(server.port, "GET", "/metrics", _basic("prometheus", new))[0] == 200


def test_a_deleted_users_file_admits_no_one_until_it_is_back(users: tuple[Path, dict[str, str]]) -> None:
    path, passwords = users
    saved = path.read_text()
    auth = BasicAuth(path)
    assert auth.authenticate(_basic("backup", passwords["backup"])["Authorization"]) == "backup"
    path.unlink()
    assert auth.authenticate(_basic("backup", passwords["backup"])["Authorization"]) is None
    assert auth.users == frozenset()
    path.write_text(saved)
    assert auth.authenticate(_basic("backup", passwords["backup"])["Authorization"]) == "backup"


def test_an_invalid_users_file_keeps_the_previous_users_and_warns_once(
    users: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    path, passwords = users
    auth = BasicAuth(path)
    header = _basic("prometheus", passwords["prometheus"])["Authorization"]
    with caplog.at_level(logging.WARNING, logger="costserve.server.metrics_auth"):
        path.write_text(path.read_text() + "grafana\n")
        for _ in range(3):
            assert auth.authenticate(header) == "prometheus"
    assert auth.users == {"prometheus", "backup"}
    (warning,) = caplog.records
    assert "line 3" in warning.getMessage() and "keeping the previous one" in warning.getMessage()


def test_add_user_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics-users"
    path.write_text("# scrapers of /metrics\n\nbackup:" + hash_password("old backup") + "\n")
    password = add_user(path, "prometheus")
    assert len(password) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # an existing file keeps its permissions
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# scrapers of /metrics", ""]
    assert lines[3].startswith("prometheus:scrypt$16384$8$1$")
    assert password not in path.read_text()
    auth = BasicAuth(path)
    assert auth.authenticate(_basic("prometheus", password)["Authorization"]) == "prometheus"
    assert auth.authenticate(_basic("backup", "old backup")["Authorization"]) == "backup"

    again = add_user(path, "backup")  # replaced where it was, not appended
    lines = path.read_text().splitlines()
    assert [line.partition(":")[0] for line in lines] == ["# scrapers of /metrics", "", "backup", "prometheus"]
    assert auth.authenticate(_basic("backup", "old backup")["Authorization"]) is None
    assert auth.authenticate(_basic("backup", again)["Authorization"]) == "backup"
    assert not [leftover for leftover in tmp_path.iterdir() if leftover.name.startswith(".")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_add_user_makes_a_new_file_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics-users"
    add_user(path, "prometheus")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BasicAuth(path).users == {"prometheus"}


@pytest.mark.parametrize("user", ["", "pro:metheus", "pro metheus", "tab\there", "#prometheus", "new\nline"])
def test_add_user_refuses_names_that_cannot_be_a_line(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError, match="user name"):
        add_user(tmp_path / "metrics-users", user)
    assert not (tmp_path / "metrics-users").exists()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("prometheus", "expected user:hash"),
        ("prometheus:plaintext-password", "scrypt"),
        ("prometheus:scrypt$16384$8$1$not base64$AAAA", "base64"),
        ("prometheus:scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "power of 2"),
        ("prometheus:scrypt$1048576$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "MiB"),
        ("backup:" + hash_password("again"), "already on line 2"),
    ],
)
def test_a_bad_users_file_line_is_an_error_naming_its_number(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "metrics-users"
    path.write_text(f"# users\nbackup:{hash_password('backup')}\n\n{line}\n")
    with pytest.raises(ValueError, match="--metrics-basic-auth") as at_start:
        start_metrics_server(_registry(), HOST, 0, basic_auth=path)
    assert "line 4" in str(at_start.value) and problem in str(at_start.value)
    before = path.read_text()
    with pytest.raises(ValueError, match="line 4"):  # nothing is written into a broken file
        add_user(path, "prometheus")
    assert path.read_text() == before


def test_a_missing_users_file_at_start_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--metrics-basic-auth"):
        start_metrics_server(_registry(), HOST, 0, basic_auth=tmp_path / "absent")


def test_hash_password_is_salted_scrypt_in_text() -> None:
    first, second = hash_password("secret"), hash_password("secret")
    assert first != second
    scheme, n, r, p, salt, key = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32


def test_tls_with_basic_auth(pki: Pki, users: tuple[Path, dict[str, str]]) -> None:
    path, passwords = users
    with _serving(tls=MetricsTls(pki.server.cert, pki.server.key), basic_auth=path) as server:
        refused, headers, _ = _https_request(server.port, _client_context(pki))
        status, _, body = _https_request(
            server.port, _client_context(pki), headers=_basic("prometheus", passwords["prometheus"])
        )
    assert refused == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert status == 200 and "test_requests_total 3.0\n" in body.decode()


@pytest.mark.parametrize(
    ("host", "tls", "auth", "missing"),
    [
        ("127.0.0.1", False, False, None),
        ("localhost", False, True, None),
        ("::1", True, False, None),
        ("0.0.0.0", True, True, None),
        ("0.0.0.0", False, True, "--metrics-tls-cert"),
        ("::", True, False, "--metrics-basic-auth"),
        ("10.1.2.3", False, False, "--metrics-tls-cert and --metrics-tls-key) and open to anyone"),
    ],
)
def test_exposure_beyond_loopback_without_tls_or_auth_is_warned(
    host: str, tls: bool, auth: bool, missing: str | None
) -> None:
    warning = exposure_warning(
        host, MetricsTls(Path("cert.pem"), Path("key.pem")) if tls else None, Path("users") if auth else None
    )
    if missing is None:
        assert warning is None
    else:
        assert warning is not None and missing in warning and host in warning
