"""TLS and mTLS on the gRPC port, with certificates made here (the cryptography package), against real servers.

The server's certificate names 127.0.0.1; clients check it against the test CA.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import EXAMPLES, RunningServer
from cryptography import x509
from pki import HOST, Issued, Pki, make_pki

from costserve import Client, TlsFiles
from costserve.cli import main as costserve_main
from costserve.server.tls import is_loopback


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def _health(server: RunningServer, tls: TlsFiles | None) -> str:
    with Client(server.target, timeout=10, tls=tls) as client:
        return client.health()


def _served_serial(server: RunningServer, ca: Path, client: Issued | None = None) -> int:
    """The serial number of the certificate a new TLS connection to the server is shown."""
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection((HOST, server.server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_tls_answers_every_call_and_refuses_plain_text(start_server: Callable[..., RunningServer], pki: Pki) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key)
    tls = TlsFiles(ca=pki.ca.cert)
    assert _health(server, tls) == "SERVING"
    with Client(server.target, timeout=30, tls=tls) as client:
        assert client.predict([EXAMPLES[7]], precision="fp32").predictions[0].label == 7
    with pytest.raises(grpc.RpcError) as plain:
        _health(server, None)
    assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as unknown_ca:  # the system's roots do not know the test CA
        _health(server, TlsFiles())
    assert unknown_ca.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_clients_without_a_certificate_or_signed_by_another_ca(
    start_server: Callable[..., RunningServer], pki: Pki
) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert)
    assert _health(server, TlsFiles(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)) == "SERVING"
    for refused in (
        TlsFiles(ca=pki.ca.cert),
        TlsFiles(ca=pki.ca.cert, cert=pki.stranger.cert, key=pki.stranger.key),
    ):
        with pytest.raises(grpc.RpcError) as no_entry:
            _health(server, refused)
        assert no_entry.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_rotated_certificate_is_served_without_a_restart(
    start_server: Callable[..., RunningServer], pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """New connections get the new certificate; a half-replaced pair is not served until both files are in."""
    served_cert, served_key = tmp_path / "served.pem", tmp_path / "served.key"
    served_cert.write_bytes(pki.server.cert.read_bytes())
    served_key.write_bytes(pki.server.key.read_bytes())
    server = start_server(tls_cert=served_cert, tls_key=served_key)
    tls = TlsFiles(ca=pki.ca.cert)
    assert _served_serial(server, pki.ca.cert) == pki.server.serial

    rotated = pki.issue_server("rotated")
    served_cert.write_bytes(rotated.cert.read_bytes())  # the certificate first: its key does not match yet
    with caplog.at_level(logging.WARNING, logger="costserve.server.tls"):
        assert _served_serial(server, pki.ca.cert) == pki.server.serial
    assert "cannot be used" in caplog.text
    served_key.write_bytes(rotated.key.read_bytes())
    os.utime(served_key)  # a new stamp even on a filesystem of coarse timestamps
    assert _served_serial(server, pki.ca.cert) == rotated.serial
    assert _health(server, tls) == "SERVING"
    certificates = server.server.certificates
    assert certificates is not None and certificates.reloads == 1


def test_the_cli_and_the_load_generator_speak_tls(
    start_server: Callable[..., RunningServer],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert)
    client_flags = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    assert costserve_main(["--target", server.target, *client_flags, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    monkeypatch.setenv("COSTSERVE_TLS_CA", str(pki.ca.cert))
    monkeypatch.setenv("COSTSERVE_CLIENT_CERT", str(pki.client.cert))
    monkeypatch.setenv("COSTSERVE_CLIENT_KEY", str(pki.client.key))
    report = pki.ca.cert.with_name("loadtest.json")
    loadtest = ["loadtest", "--target", server.target, "--requests", "20", "--warmup", "0", "--protocol", "v2"]
    assert costserve_main([*loadtest, "--json", str(report)]) == 0
    (step,) = json.loads(report.read_text())["steps"]
    assert step["requests"] == 20 and step["errors"] == {}
    assert costserve_main(["--tls-key", str(tmp_missing := pki.ca.cert.with_name("missing.key")), "health"]) == 2
    assert "TLS" in capsys.readouterr().err and not tmp_missing.exists()


def test_tls_settings_come_together_and_loopback_is_told_apart() -> None:
    from pydantic import ValidationError

    from costserve.server.settings import Settings, describe_problems

    with pytest.raises(ValidationError) as lone_cert:
        Settings(tls_cert=Path("server.pem"))
    assert describe_problems(lone_cert.value) == [
        "--tls-cert (COSTSERVE_TLS_CERT): needs --tls-key (COSTSERVE_TLS_KEY) as well"
    ]
    with pytest.raises(ValidationError):
        Settings(tls_client_ca=Path("ca.pem"))
    assert all(is_loopback(host) for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
