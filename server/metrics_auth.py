"""HTTP basic auth for /metrics: a users file of salted scrypt hashes, re-read when it changes.

The users file (``--metrics-basic-auth``) holds one ``user:hash`` line per user; ``#``
lines and blank lines are ignored. The hash is self-describing,
``scrypt$<N>$<r>$<p>$<salt, base64>$<key, base64>`` (:func:`hash_password`), so a file
may mix costs and a future default costs no migration. ``costserve-server
metrics-password --user NAME --file FILE`` (:func:`add_user`) makes a random password,
prints it once and stores only its hash::

    $ costserve-server metrics-password --user prometheus --file metrics-users
    3q2L...                                  # give this to Prometheus (basic_auth.password_file)
    $ cat metrics-users
    prometheus:scrypt$16384$8$1$Jx3o...$d1Vh...

:class:`BasicAuth` checks ``Authorization: Basic ...`` headers against the file. scrypt is
slow on purpose (about 50 ms at the default cost), so a check that succeeded is
remembered, keyed by a SHA-256 of the user and password, until the file changes: a
scrape every 15 s pays scrypt once, not every time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from costserve.server.files import WatchedFiles, watched_file, write_atomically

log = logging.getLogger(__name__)

#: scrypt's cost parameters for new hashes: N (CPU and memory cost), r (block size), p (parallelism).
#: 128 * N * r = 16 MiB of memory and about 50 ms of one core per hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: Bytes of salt and of derived key in new hashes.
SALT_BYTES, KEY_BYTES = 16, 32
#: Most memory a hash in the file may ask scrypt for (128 * N * r), in bytes: a typo of N
#: must not let one request take gigabytes.
MAX_SCRYPT_MEMORY_BYTES = 256 * 2**20
#: The realm of the 401's ``WWW-Authenticate`` challenge.
REALM = "costserve metrics"
#: The ``WWW-Authenticate`` header of a 401: basic auth, user and password sent as UTF-8 (RFC 7617).
CHALLENGE = f'Basic realm="{REALM}", charset="UTF-8"'
_SCHEME = "scrypt"


@dataclass(frozen=True)
class _Hash:
    """A parsed ``scrypt$N$r$p$salt$key``."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def matches(self, password: str) -> bool:
        derived = hashlib.scrypt(
            password.encode(),
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=2 * MAX_SCRYPT_MEMORY_BYTES,
            dklen=len(self.key),
        )
        return hmac.compare_digest(derived, self.key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password`` (UTF-8), as text: ``scrypt$16384$8$1$<salt b64>$<key b64>``.

    Takes about 50 ms of one core and 16 MiB of memory. Every call draws a new 16-byte salt,
    so hashing one password twice gives two different strings.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES)
    return f"{_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def _parse_hash(text: str) -> _Hash:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("the hash is not scrypt$N$r$p$salt$key (make lines with `costserve-server metrics-password`)")
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt, key = (base64.b64decode(part, validate=True) for part in parts[4:6])
    except (ValueError, binascii.Error):
        raise ValueError("the hash's N, r and p must be integers and its salt and key base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError(f"scrypt needs N a power of 2 above 1 and r, p at least 1, got N={n}, r={r}, p={p}")
    if 128 * n * r > MAX_SCRYPT_MEMORY_BYTES:
        raise ValueError(f"scrypt N={n}, r={r} needs more than {MAX_SCRYPT_MEMORY_BYTES // 2**20} MiB")
    if not salt or len(key) < 16:
        raise ValueError("the hash's salt is empty or its key shorter than 16 bytes")
    return _Hash(n, r, p, salt, key)


def check_user_name(user: str) -> None:
    """Raise ``ValueError`` unless ``user`` can start a line: not empty, no ``:`` or whitespace, no leading ``#``."""
    if not user or ":" in user or any(char.isspace() for char in user) or not user.isprintable():
        raise ValueError(f"user name {user!r}: must be non-empty, without ':' or whitespace")
    if user.startswith("#"):
        raise ValueError(f"user name {user!r}: must not start with '#' (that line would be a comment)")


def _parse_users(text: str) -> dict[str, _Hash]:
    """The users of a users file's text; ``ValueError`` naming the first bad line's number."""
    users: dict[str, _Hash] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        try:
            if not colon:
                raise ValueError("expected user:hash")
            check_user_name(user)
            if user in users:
                raise ValueError(f"user {user!r} is already on line {first_line[user]}")
            users[user] = _parse_hash(hashed)
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
        first_line[user] = number
    return users


def add_user(path: Path, user: str) -> str:
    """Give ``user`` a new random password in the users file ``path``, and return the password.

    The password is ``secrets.token_urlsafe(24)`` (32 characters, 192 bits); only its hash
    is stored. ``user``'s line is replaced where it was, or appended; other lines (comments
    included) are kept. The file is written whole beside itself and renamed over the old one,
    so a server reading it never sees half of it; a new file is made readable by its owner only,
    an existing one keeps its permissions.

    Raises:
        ValueError: ``user`` contains ``:`` or whitespace (or is empty), or the file has a bad line.
        OSError: The file cannot be read or written.
    """
    check_user_name(user)
    try:
        text = path.read_text(encoding="utf-8")
        status: os.stat_result | None = path.stat()
    except FileNotFoundError:
        text, status = "", None
    try:
        _parse_users(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    password = secrets.token_urlsafe(24)
    line = f"{user}:{hash_password(password)}"
    lines = text.splitlines()
    mine = [index for index, old in enumerate(lines) if old.strip().partition(":")[0] == user]
    if mine:
        lines[mine[0]] = line
    else:
        lines.append(line)
    write_atomically(path, "".join(f"{kept}\n" for kept in lines), status)
    return password


def _read_users(path: Path) -> dict[str, _Hash]:
    return _parse_users(path.read_text(encoding="utf-8"))


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against a users file; safe to call from many threads.

    The file's (mtime, size, inode) is checked at each call and the file re-read when it
    changed: the new users apply from that call on, and every remembered check is forgotten.
    A file that becomes unreadable or invalid keeps the previous users (logged once per
    change); a deleted file lets no one in until it is back.

    Example::

        auth = BasicAuth(Path("metrics-users"))
        auth.authenticate(environ.get("HTTP_AUTHORIZATION"))  # -> "prometheus", or None

    Raises ``ValueError`` at construction when the file cannot be read or has a bad line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: WatchedFiles[dict[str, _Hash]] = watched_file(path, _read_users, {}, "--metrics-basic-auth")
        self._lock = threading.Lock()
        #: SHA-256 of "user:password" -> user, for checks that succeeded with the users of generation
        #: ``_accepted_generation`` of the file.
        self._accepted: dict[bytes, str] = {}
        self._accepted_generation = self._users.generation
        # Unknown users cost a scrypt too: the time of a refusal does not tell which users exist.
        self._decoy = _parse_hash(hash_password(secrets.token_urlsafe(24)))
        # One scrypt at a time: a stream of wrong guesses takes one core, not one per pool thread.
        # Remembered checks (the scrapers') do not wait for it.
        self._scrypt_lock = threading.Lock()

    @property
    def users(self) -> frozenset[str]:
        """The user names accepted now (after re-reading the file if it changed)."""
        return frozenset(self._users.current())

    def authenticate(self, authorization: str | None) -> str | None:
        """The user an ``Authorization`` header's value proves to be, or None (missing, malformed or wrong).

        About 50 ms of CPU (scrypt) the first time a user and password are checked, and for every
        wrong one (one such check at a time); microseconds for a remembered one while the file is
        unchanged.
        """
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return None
        user, password = credentials
        fingerprint = hashlib.sha256(f"{user}:{password}".encode()).digest()
        users, generation = self._users.snapshot()
        with self._lock:
            if generation != self._accepted_generation:
                self._accepted.clear()  # the users changed: what was accepted before is checked again
                self._accepted_generation = generation
            if (known := self._accepted.get(fingerprint)) is not None:
                return known
        hashed = users.get(user)
        # scrypt outside the lock: one slow check must not hold up the scrapers already remembered.
        with self._scrypt_lock:
            matched = (hashed if hashed is not None else self._decoy).matches(password)
        if hashed is None or not matched:
            return None
        with self._lock:
            if self._accepted_generation == generation:
                self._accepted[fingerprint] = user
        return user


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of a ``Basic`` header's value (RFC 7617, UTF-8), or None when it is not one."""
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None
