"""Identities and tenant names: who a caller is, in the one form tenants are compared in."""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass

#: What a tenant name may be once normalised.
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")


def normalize_tenant(name: str) -> str:
    """``name`` in the one form tenants are compared in; "" for a blank name.

    Raises ``ValueError`` when what remains is not 1 to 64 of ``a-z 0-9 . _ @ -`` starting
    with a letter or digit.
    """
    normal = unicodedata.normalize("NFKC", name).strip().casefold()
    if normal and not TENANT_PATTERN.fullmatch(normal):
        raise ValueError(
            f"tenant {name[:80]!r} is not a tenant name: 1 to 64 of a-z 0-9 . _ @ - starting with a letter or digit"
        )
    return normal


def tenant_name(name: str) -> str:
    """``name`` normalised (:func:`normalize_tenant`); ``ValueError`` when it is blank or no tenant name."""
    normal = normalize_tenant(name)
    if not normal:
        raise ValueError("the tenant name is blank")
    return normal


class Role(enum.Enum):
    """What an identity may do beyond calling for its own tenant."""

    #: Calls are charged to the identity's own tenant only.
    USER = "user"
    #: May charge calls to the tenant ``x-costserve-tenant`` names (a trusted front end or batch runner).
    GATEWAY = "gateway"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    tenant: str
    role: Role
    #: How the caller proved it, for messages and logs (never a secret): ``API key 3f2a9c01d4e5``.
    via: str
