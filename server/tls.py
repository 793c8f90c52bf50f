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
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from costserve.server.files import WatchedFiles

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


@dataclass(frozen=True)
class CertificateFiles:
    """A TLS server's files: a PEM certificate chain, its private key and, for mTLS, PEM client CAs.

    ``flags`` name the settings the files come from, for messages: the gRPC port's
    (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``) or /metrics' (``--metrics-tls-*``).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca")

    def paths(self) -> list[Path]:
        """The files, in the order their stamps are taken."""
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side SSLContext of the files as they are now, requiring client certificates with a client CA.

        Raises ``ValueError`` naming the flag when a file cannot be read, is not PEM, or the
        certificate and key do not fit together.
        """
        cert_flag, key_flag, client_ca_flag = self.flags
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(
                f"{cert_flag} {self.cert} / {key_flag} {self.key}: not a PEM certificate chain and its private key "
                f"({error})"
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"{client_ca_flag} {self.client_ca}: not PEM CA certificates ({error})") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class ServerCertificates:
    """The files of the gRPC port's TLS, read at start and again whenever one of them changes.

    gRPC asks :meth:`fetch` at each new handshake. Files that cannot be read or do not fit
    together raise ``ValueError`` at start; later, they are logged and the certificate being
    served is kept (also while a file is being replaced).
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.files = CertificateFiles(cert, key, client_ca)
        self._configuration = WatchedFiles(self.files.paths(), self._load, "the gRPC port's TLS files")
        self._served = self._configuration.generation

    @property
    def reloads(self) -> int:
        """How many times new files were loaded after the first."""
        return self._configuration.generation

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC's configuration, once Python's own TLS has checked that they fit together."""
        self.files.ssl_context()
        files = self.files
        root = files.client_ca.read_bytes() if files.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration(
            [(files.key.read_bytes(), files.cert.read_bytes())], root_certificates=root
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback at each new handshake: the new configuration when the files changed, else None."""
        configuration, generation = self._configuration.snapshot()
        if generation == self._served:
            return None
        self._served = generation
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials serving these files, reloaded as they change."""
        # gRPC documents None as "keep the current configuration"; its type stubs omit it.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._configuration.value, fetch, require_client_authentication=self.files.client_ca is not None
        )
