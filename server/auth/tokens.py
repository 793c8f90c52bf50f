"""JWT bearer tokens, checked against local public keys (a PEM key or a JWKS document)."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from costserve.server.auth.identity import Identity, Role, tenant_name
from costserve.server.errors import Unauthenticated
from costserve.server.files import WatchedFiles, watched_file

#: Asymmetric JWT algorithms only: a public key file can never be used as an HMAC secret.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
#: Verified tokens kept, so a client reusing its token is not checked again on every call.
JWT_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _SigningKeys:
    """The public keys of ``--jwt-keys``: by key id (``kid``), and the only key when there is one.

    A token is checked with the key its ``kid`` names; with no ``kid``, or when the only key
    has none (a PEM key), with the only key.
    """

    by_id: dict[str, jwt.PyJWK]
    only: jwt.PyJWK | None


def _algorithm_of(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(public_key.curve.name, "")
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "EdDSA"
    return ""


def read_signing_keys(path: Path) -> _SigningKeys:
    """A PEM public key or a JWKS document (JSON) of public keys; ``ValueError`` for anything else."""
    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"{"):
            jwks = jwt.PyJWKSet.from_json(data.decode("utf-8"))
            keys = list(jwks.keys)
        else:
            public_key = load_pem_public_key(data)
            algorithm = _algorithm_of(public_key)
            if not algorithm:
                raise ValueError(f"{type(public_key).__name__} keys cannot sign JWTs")
            keys = [jwt.PyJWK.from_dict(json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(public_key)))]
    except (jwt.PyJWTError, ValueError, UnicodeDecodeError, TypeError) as error:
        raise ValueError(f"not a PEM public key or a JWKS document of public keys ({error})") from None
    for key in keys:
        if key.algorithm_name not in JWT_ALGORITHMS or not _algorithm_of(key.key):
            raise ValueError(
                f"key {key.key_id or '(no kid)'} is not a public key of "
                f"{', '.join(JWT_ALGORITHMS)} (symmetric and private keys are refused)"
            )
    if not keys:
        raise ValueError("holds no key")
    return _SigningKeys({key.key_id: key for key in keys if key.key_id}, keys[0] if len(keys) == 1 else None)


class JwtVerifier:
    """JWT bearer tokens signed by the keys of ``--jwt-keys``.

    A token must be signed by one of those keys (chosen by its ``kid`` header, or the only
    key), name ``issuer`` and include ``audience``, and carry an expiry not yet passed
    (``leeway_s`` of clock skew allowed); ``tenant_claim`` names its tenant and
    ``role_claim`` its role (``gateway``, or anything else: user). Verified tokens are
    remembered until they expire or the key file changes.
    """

    def __init__(
        self,
        keys: Path,
        issuer: str,
        audience: str,
        tenant_claim: str = "tenant",
        role_claim: str = "role",
        leeway_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys: WatchedFiles[_SigningKeys] = watched_file(
            keys, read_signing_keys, _SigningKeys({}, None), "--jwt-keys"
        )
        self.issuer, self.audience = issuer, audience
        self.tenant_claim, self.role_claim = tenant_claim, role_claim
        self.leeway_s = leeway_s
        self.clock = clock
        self._verified: collections.OrderedDict[str, tuple[Identity, float]] = collections.OrderedDict()
        #: The key file's generation the remembered tokens were verified with.
        self._verified_generation = self.keys.generation

    def identify(self, token: str) -> Identity:
        """The identity a valid ``token`` gives, or :class:`Unauthenticated` saying what is wrong with it."""
        signing_keys, generation = self.keys.snapshot()
        if generation != self._verified_generation:
            self._verified.clear()
            self._verified_generation = generation
        remembered = self._verified.get(token)
        if remembered is not None:
            identity, expires = remembered
            if self.clock() <= expires + self.leeway_s:
                self._verified.move_to_end(token)
                return identity
            del self._verified[token]
            raise Unauthenticated("the bearer token is not valid: Signature has expired")
        identity, expires = self._verify(token, signing_keys)
        self._verified[token] = (identity, expires)
        if len(self._verified) > JWT_CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _verify(self, token: str, signing_keys: _SigningKeys) -> tuple[Identity, float]:
        try:
            key_id = jwt.get_unverified_header(token).get("kid")
            key = signing_keys.by_id.get(key_id) if key_id else None
            if key is None and signing_keys.only is not None and not (key_id and signing_keys.only.key_id):
                key = signing_keys.only  # the one key, when no key id tells another apart
            if key is None:
                raise Unauthenticated(f"the bearer token's key {key_id or '(no kid)'} is not one of --jwt-keys")
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"the bearer token is not valid: {error}") from None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str):
            raise Unauthenticated(f"the bearer token has no {self.tenant_claim!r} claim naming a tenant")
        try:
            normal = tenant_name(tenant)
        except ValueError as error:
            raise Unauthenticated(f"the bearer token's {self.tenant_claim!r} claim: {error}") from None
        role = Role.GATEWAY if claims.get(self.role_claim) == Role.GATEWAY.value else Role.USER
        subject = claims.get("sub")
        via = f"token of {subject!r}" if isinstance(subject, str) else "bearer token"
        return Identity(normal, role, via), float(claims["exp"])
