"""Certificates made in the tests (the cryptography package): a CA, server and client certificates as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: The address test servers listen on: every server certificate names it.
HOST = "127.0.0.1"


@dataclass
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path
    serial: int


@dataclass
class Authority:
    """A CA that issues certificates into ``directory``."""

    directory: Path
    issued: Issued
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def issue(self, name: str, server: bool = False, names: Sequence[x509.GeneralName] = ()) -> Issued:
        """A certificate for common name ``name`` (a server's also names :data:`HOST`), with SANs ``names``."""
        return _issue(self.directory, name, (self.certificate, self.private_key), server, names)[0]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    server: bool = False,
    names: Sequence[x509.GeneralName] = (),
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (no issuer) or a certificate the issuer signs; PEM files named after ``name`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer[0].subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    alternative_names = [*([x509.IPAddress(ipaddress.ip_address(HOST))] if server else []), *names]
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path, certificate.serial_number), certificate, key


def authority(directory: Path, name: str = "ca") -> Authority:
    """A new self-signed CA whose files and certificates live in ``directory``."""
    issued, certificate, key = _issue(directory, name)
    return Authority(directory, issued, certificate, key)


@dataclass
class Pki:
    """A CA, a server certificate and a client certificate it signed, and a client certificate another CA signed."""

    authority: Authority
    server: Issued
    client: Issued
    stranger: Issued

    @property
    def ca(self) -> Issued:
        return self.authority.issued

    def issue_server(self, name: str) -> Issued:
        """Another server certificate the CA signs (a rotation)."""
        return self.authority.issue(name, server=True)


def make_pki(directory: Path) -> Pki:
    """A CA with a server certificate (``server``) and a client one (``client``, CN ``client``), and a stranger."""
    ca = authority(directory)
    other = authority(directory, "other-ca")
    return Pki(ca, ca.issue("server", server=True), ca.issue("client"), other.issue("stranger"))
