"""Tenants from mTLS client certificates: the common name or a subject alternative name."""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc

from costserve.server.auth.identity import Identity, Role, normalize_tenant
from costserve.server.errors import Unauthenticated

#: gRPC's auth-context property holding each kind of certificate name.
CERTIFICATE_PROPERTY = {
    "common-name": "x509_common_name",
    "dns-san": "peer_dns",
    "uri-san": "peer_uri",
    "email-san": "peer_email",
}


class CertificateTenants:
    """Tenants from mTLS client certificates: the ``source`` name (``common-name``, ``dns-san``, ...) that
    fits ``pattern`` whole; its first group, or the whole name, is the tenant. Certificates of the
    tenants in ``gateways`` have the gateway role."""

    def __init__(self, source: str, pattern: str = "", gateways: Iterable[str] = ()) -> None:
        self.source = source
        self.property = CERTIFICATE_PROPERTY[source]
        self.pattern = re.compile(pattern) if pattern else None
        self.gateways = frozenset(normalize_tenant(name) for name in gateways if name.strip())

    def identify(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """The identity of the call's client certificate; None when the connection has none."""
        auth = context.auth_context()
        if not auth.get("x509_pem_cert"):
            return None
        for raw in auth.get(self.property, ()):
            name = raw.decode("utf-8", "replace")
            if self.pattern is not None:
                match = self.pattern.fullmatch(name)
                if match is None:
                    continue
                name = (match.group(1) or "") if self.pattern.groups else name  # an optional group may match nothing
            try:
                tenant = normalize_tenant(name)
            except ValueError:
                continue
            if tenant:
                role = Role.GATEWAY if tenant in self.gateways else Role.USER
                return Identity(tenant, role, f"certificate {self.source} {name!r}")
        raise Unauthenticated(
            f"the client certificate has no {self.source} that names a tenant (--tls-client-tenant "
            f"{self.source}{', --tls-client-tenant-pattern' if self.pattern else ''})"
        )
