"""Who is calling, and which tenant a call is charged to.

Credentials give an :class:`Identity`: a tenant and a role. Three kinds are accepted,
each turned on by its setting (any of them turns authentication on):

* **API keys** (``--auth-keys FILE``): ``authorization: Bearer csk_...``. The file holds
  each key's SHA-256 hash with its tenant and role, never the key
  (:func:`add_key`, ``costserve-server keys add``); it is re-read when it changes.
* **JWT bearer tokens** (``--jwt-keys FILE``): ``authorization: Bearer <JWT>``, checked
  against a local PEM public key or JWKS document for signature, issuer, audience and
  expiry; a claim names the tenant (:class:`JwtVerifier`).
* **Client certificates** (``--tls-client-tenant``, with mTLS): the certificate's
  common name or one of its subject alternative names gives the tenant
  (:class:`CertificateTenants`).

A bearer token, when the call carries one, is the caller's identity; otherwise its
client certificate is. With authentication on, a call without valid credentials gets
``UNAUTHENTICATED``. The tenant charged (:meth:`Authenticator.tenant_of`) is the
identity's; ``x-costserve-tenant`` may name another tenant only for an identity with
the gateway role (else ``PERMISSION_DENIED``). With authentication off, the call is
charged to the tenant ``x-costserve-tenant`` names, as before: anyone may name anyone.

Tenant names are normalised one way everywhere (metadata, keys, tokens, certificates,
the budgets file): Unicode NFKC, surrounding whitespace dropped, case folded; what
remains must be 1 to 64 of ``a-z 0-9 . _ @ -``, starting with a letter or digit
(:func:`normalize_tenant`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc

from costserve.server.auth.certificates import CertificateTenants
from costserve.server.auth.identity import Identity, Role, normalize_tenant, tenant_name
from costserve.server.auth.keys import API_KEY_PREFIX, ApiKeys, add_key, keys_command, read_keys, revoke_key
from costserve.server.auth.tokens import JwtVerifier
from costserve.server.errors import InvalidInput, PermissionDenied, Unauthenticated

__all__ = [
    "API_KEY_PREFIX",
    "AUTHORIZATION_METADATA_KEY",
    "TENANT_METADATA_KEY",
    "Access",
    "ApiKeys",
    "Authenticator",
    "CertificateTenants",
    "Identity",
    "JwtVerifier",
    "Role",
    "add_key",
    "call_tenant",
    "keys_command",
    "metadata_values",
    "normalize_tenant",
    "read_keys",
    "revoke_key",
    "tenant_name",
]

#: Request metadata naming the tenant a call is charged to.
TENANT_METADATA_KEY = "x-costserve-tenant"
#: Request metadata carrying the caller's credentials: ``Bearer <API key or JWT>``.
AUTHORIZATION_METADATA_KEY = "authorization"

#: The tenant the current call is charged to, set by the call's admission (see :func:`call_tenant`).
_CALL_TENANT: ContextVar[str] = ContextVar("costserve_call_tenant", default="")


def call_tenant() -> str:
    """The tenant the call being handled is charged to ("" for none), as its admission decided.

    Every prediction call passes :meth:`Authenticator.admit_prediction` before its handler
    runs, in the handler's own task; the protocol front ends read the result here.
    """
    return _CALL_TENANT.get()


class Access(enum.Enum):
    """Who may call a group of methods (``--reflection``, ``--model-info``)."""

    #: Anyone who reaches the port.
    ON = "on"
    #: Callers with valid credentials (anyone when authentication is off).
    AUTHENTICATED = "authenticated"
    #: Nobody.
    OFF = "off"


class Authenticator:
    """Credentials -> :class:`Identity`, and the tenant each call is charged to.

    With no kind of credentials configured, authentication is off: :meth:`identify`
    answers None and every call is charged to the tenant its metadata names.
    """

    def __init__(
        self,
        keys: ApiKeys | None = None,
        tokens: JwtVerifier | None = None,
        certificates: CertificateTenants | None = None,
    ) -> None:
        self.keys, self.tokens, self.certificates = keys, tokens, certificates
        #: Whether callers must present credentials.
        self.enabled = keys is not None or tokens is not None or certificates is not None

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator:
        """The authenticator ``settings`` (a :class:`~costserve.server.settings.Settings`) describe.

        Raises ``ValueError`` for files that cannot be used, naming the flag.
        """
        keys = tokens = certificates = None
        if settings.auth_keys is not None:
            keys = ApiKeys(settings.auth_keys)
        if settings.jwt_keys is not None:
            tokens = JwtVerifier(
                settings.jwt_keys,
                settings.jwt_issuer,
                settings.jwt_audience,
                settings.jwt_tenant_claim,
                settings.jwt_role_claim,
                settings.jwt_leeway_seconds,
            )
        if settings.tls_client_tenant != "off":
            try:
                certificates = CertificateTenants(
                    settings.tls_client_tenant,
                    settings.tls_client_tenant_pattern,
                    settings.tls_client_gateways.split(","),
                )
            except re.error as error:
                raise ValueError(f"--tls-client-tenant-pattern: not a regular expression ({error})") from None
            except ValueError as error:
                raise ValueError(f"--tls-client-gateways: {error}") from None
        return cls(keys, tokens, certificates)

    def identify(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """The caller's identity; None when authentication is off; :class:`Unauthenticated` without valid
        credentials."""
        if not self.enabled:
            return None
        return self._identify(context, metadata_values(context, AUTHORIZATION_METADATA_KEY))

    def _identify(self, context: grpc.aio.ServicerContext, authorization: list[str]) -> Identity:
        if len(authorization) > 1:
            raise Unauthenticated("the call carries more than one authorization metadata")
        if authorization:
            scheme, _, token = authorization[0].strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization must be 'Bearer <API key or token>'")
            if token.startswith(API_KEY_PREFIX):
                if self.keys is None:
                    raise Unauthenticated("this server takes no API keys (--auth-keys is not set)")
                return self.keys.identify(token)
            if self.tokens is None:
                raise Unauthenticated("this server takes no JWT bearer tokens (--jwt-keys is not set)")
            return self.tokens.identify(token)
        if self.certificates is not None:
            identity = self.certificates.identify(context)
            if identity is not None:
                return identity
        raise Unauthenticated(f"the call carries no credentials: send {self._accepted()}")

    def _accepted(self) -> str:
        kinds = []
        if self.keys is not None:
            kinds.append("'authorization: Bearer <API key>'")
        if self.tokens is not None:
            kinds.append("'authorization: Bearer <JWT>'")
        if self.certificates is not None:
            kinds.append("a client certificate naming a tenant")
        return " or ".join(kinds)

    def tenant_of(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant the call is charged to ("" for none).

        With authentication on: the identity's tenant, or the tenant ``x-costserve-tenant``
        names when the identity is a gateway's (another tenant named by anyone else:
        :class:`PermissionDenied`). Off: the tenant the metadata names. A name that is not a
        tenant name, or two names, are :class:`InvalidInput`.
        """
        identity = self.identify(context)  # first: a caller without credentials learns nothing else
        named_values = metadata_values(context, TENANT_METADATA_KEY)
        if len(named_values) > 1:
            raise InvalidInput(f"the call names {len(named_values)} tenants ({TENANT_METADATA_KEY}); name one")
        try:
            named = normalize_tenant(named_values[0]) if named_values else ""
        except ValueError as error:
            raise InvalidInput(f"{TENANT_METADATA_KEY}: {error}") from None
        if identity is None:
            return named
        if not named or named == identity.tenant or identity.role is Role.GATEWAY:
            return named or identity.tenant
        raise PermissionDenied(
            f"{identity.via} may charge only its own tenant {identity.tenant!r}, not {named!r} "
            f"({TENANT_METADATA_KEY} names another tenant for gateways only)"
        )

    def admit_prediction(self, context: grpc.aio.ServicerContext) -> None:
        """A prediction call's check: decide its tenant (:meth:`tenant_of`) for :func:`call_tenant`."""
        _CALL_TENANT.set(self.tenant_of(context))

    def access_check(self, access: Access, what: str) -> Callable[[grpc.aio.ServicerContext], None] | None:
        """The check of a method group under ``access`` (None: nothing to check); ``what`` names the group
        and its setting in the refusal, e.g. ``"model information (--model-info)"``."""
        if access is Access.ON or (access is Access.AUTHENTICATED and not self.enabled):
            return None
        if access is Access.OFF:

            def refuse(context: grpc.aio.ServicerContext) -> None:
                raise PermissionDenied(f"{what} is turned off on this server")

            return refuse

        def authenticated(context: grpc.aio.ServicerContext) -> None:
            self.identify(context)

        return authenticated


def metadata_values(context: grpc.aio.ServicerContext, wanted: str) -> list[str]:
    """Every value of request metadata ``wanted``, bytes decoded as UTF-8."""
    return [
        value if isinstance(value, str) else value.decode("utf-8", "replace")
        for key, value in context.invocation_metadata() or ()
        if key == wanted
    ]
