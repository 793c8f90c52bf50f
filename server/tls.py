"""TLS on the gRPC port: the server's certificate and key, and the client CA that makes it mTLS.

gRPC asks :meth:`ServerCertificates.fetch` for the certificate configuration at each new
TLS handshake. It answers None (keep the current one) until a file changes, then the
new configuration, once the certificate and key are checked to be a pair: a rotated
certificate is served to new connections without a restart, and a half-written one (the
certificate replaced, the key not yet) is not served until both are in place. Open
connections keep the certificate they were made with.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger(__name__)

#: Host names that reach only this machine: plain text on them is not a network exposure.
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the port to this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerCertificates:
    """The files of the gRPC port's TLS, read at start and again whenever one of them changes.

    ``client_ca``, when given, requires every client to present a certificate signed by
    one of its CAs (mTLS). Files that cannot be read or do not fit together raise
    ``ValueError`` at start; later, they are logged and the certificate being served is kept.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        #: How many times new files were loaded after the first.
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._initial = self._configuration()
        self._refused: tuple[tuple[int, int, int], ...] | None = None

    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])

    def _stamp_now(self) -> tuple[tuple[int, int, int], ...]:
        """(modification time, size, inode) of each file: any replacement or rewrite changes it."""
        stamps = []
        for path in self._paths():
            status = os.stat(path)
            stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC's configuration, once Python's own TLS has checked that they fit together."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        where = f"--tls-cert {self.cert} / --tls-key {self.key}"
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"{where}: not a PEM certificate chain and its private key ({error})") from None
        root = None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"--tls-client-ca {self.client_ca}: not PEM CA certificates ({error})") from None
            root = self.client_ca.read_bytes()
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=root
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback at each new handshake: the new configuration when the files changed, else None."""
        with self._lock:
            try:
                stamp = self._stamp_now()
            except OSError:
                return None  # a file is being replaced: keep serving the current one
            if stamp == self._stamp or stamp == self._refused:
                return None
            try:
                configuration = self._configuration()
            except (OSError, ValueError) as error:
                self._refused = stamp
                log.warning("TLS files changed but cannot be used (%s); serving the previous certificate", error)
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.cert)
            return configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials serving these files, reloaded as they change."""
        # gRPC documents None as "keep the current configuration"; its type stubs omit it.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._initial, fetch, require_client_authentication=self.client_ca is not None
        )
