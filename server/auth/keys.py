"""API keys: a file of SHA-256 hashes (never the keys) with each key's tenant and role.

``costserve-server keys add --tenant acme`` makes a key (``csk_`` and 43 characters of
256 random bits), prints it once and stores its hash (:func:`add_key`); ``keys list`` and
``keys revoke ID`` read and rewrite the file, atomically. The server compares a presented
key's hash with every stored one in constant time (:class:`ApiKeys`) and re-reads the file
when it changes.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from costserve.server.auth.identity import Identity, Role, tenant_name
from costserve.server.errors import Unauthenticated
from costserve.server.files import WatchedFiles, existing_status, watched_file, write_atomically

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: How every API key begins: tells it apart from a JWT at a glance (and to secret scanners).
API_KEY_PREFIX = "csk_"
#: Hex digits of a key's hash that name it in the keys file, ``keys list`` and ``keys revoke``.
KEY_ID_DIGITS = 12


@dataclass(frozen=True)
class ApiKey:
    """One entry of the API keys file: a key's hash, never the key."""

    key_id: str
    sha256: bytes
    tenant: str
    role: Role
    name: str = ""
    created: str = ""


def key_digest(key: str) -> bytes:
    """The SHA-256 digest an API key is stored and compared as."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_keys(path: Path) -> list[ApiKey]:
    """The entries of an API keys file; ``ValueError`` naming the entry that is wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not TOML ({error})") from None
    keys = []
    for key_id, entry in document.get("keys", {}).items():
        where = f"{path}: key {key_id!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a table")
        digest = entry.get("sha256", "")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{where}: sha256 must be 64 lower-case hex digits")
        try:
            tenant = tenant_name(str(entry.get("tenant", "")))
            role = Role(entry.get("role", Role.USER.value))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        name, created = str(entry.get("name", "")), str(entry.get("created", ""))
        keys.append(ApiKey(key_id, bytes.fromhex(digest), tenant, role, name, created))
    return keys


def write_keys(path: Path, keys: Iterable[ApiKey]) -> None:
    """Write the keys file whole, atomically: the server reads either the old file or the new one."""
    lines = [
        "# costserve API keys (costserve-server keys add | list | revoke): the SHA-256 hash of each key, never",
        "# the key. A removed entry is refused from the server's next call on.",
    ]
    for key in keys:
        lines += [
            "",
            f"[keys.{json.dumps(key.key_id)}]",
            f"sha256 = {json.dumps(key.sha256.hex())}",
            f"tenant = {json.dumps(key.tenant)}",
            f"role = {json.dumps(key.role.value)}",
            f"name = {json.dumps(key.name)}",
            f"created = {json.dumps(key.created)}",
        ]
    write_atomically(path, "\n".join(lines) + "\n", existing_status(path))


def add_key(path: Path, tenant: str, role: Role = Role.USER, name: str = "") -> tuple[str, ApiKey]:
    """Make a new API key for ``tenant``, store its hash in ``path`` (created if need be); returns (key, entry).

    The key is returned once and stored nowhere: keep it where the caller keeps secrets.
    """
    normal = tenant_name(tenant)
    keys = read_keys(path) if path.exists() else []
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_digest(key)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = ApiKey(digest.hex()[:KEY_ID_DIGITS], digest, normal, role, name, created)
    write_keys(path, [*keys, entry])
    return key, entry


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Remove the key ``key_id`` from ``path``; returns its entry. ``KeyError`` when there is none."""
    keys = read_keys(path)
    kept = [key for key in keys if key.key_id != key_id]
    if len(kept) == len(keys):
        raise KeyError(key_id)
    write_keys(path, kept)
    return next(key for key in keys if key.key_id == key_id)


class ApiKeys:
    """The keys of ``--auth-keys``, re-read when the file changes (a removed file accepts no key)."""

    def __init__(self, path: Path) -> None:
        self.file: WatchedFiles[list[tuple[bytes, Identity]]] = watched_file(
            path, _identities_of_keys, [], "--auth-keys"
        )

    def identify(self, key: str) -> Identity:
        """The identity of ``key``, or :class:`Unauthenticated`.

        Its hash is compared with every stored hash in constant time, and no comparison
        ends the loop early: how long a check takes says nothing about which hash was close.
        """
        digest = key_digest(key)
        found: Identity | None = None
        for stored, identity in self.file.current():
            if hmac.compare_digest(digest, stored):
                found = identity
        if found is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return found


def _identities_of_keys(path: Path) -> list[tuple[bytes, Identity]]:
    return [(key.sha256, Identity(key.tenant, key.role, f"API key {key.key_id}")) for key in read_keys(path)]


def keys_command(args: argparse.Namespace) -> int:
    """``costserve-server keys add | list | revoke``."""
    path: Path = args.file
    try:
        if args.keys_command == "add":
            key, entry = add_key(path, args.tenant, Role(args.role), args.name)
            print(key)
            print(
                f"added key {entry.key_id} for tenant {entry.tenant!r} ({entry.role.value}) to {path}; "
                "the key is not shown again",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            print(f"{'id':<{KEY_ID_DIGITS}}  {'tenant':<20}  {'role':<7}  {'created':<20}  name")
            for entry in read_keys(path):
                print(f"{entry.key_id}  {entry.tenant:<20}  {entry.role.value:<7}  {entry.created:<20}  {entry.name}")
        else:
            entry = revoke_key(path, args.key_id)
            print(f"revoked key {entry.key_id} of tenant {entry.tenant!r} in {path}", file=sys.stderr)
    except KeyError:
        print(f"costserve-server: {path} has no key {args.key_id!r} (see: costserve-server keys list)", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"costserve-server: {error}", file=sys.stderr)
        return 2
    return 0
