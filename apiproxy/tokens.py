"""Peer JWTs in the Deckhouse multicluster convention: minting and strict verification.

Claims: `iss`, `sub` = issuer's cluster UUID, `aud` = receiver's cluster UUID, `scope`
(`api`, `private-multicluster`, ...), `nbf`/`iat`/`exp`. Unlike the reference implementation we
verify the signature before trusting any claim, require `exp`, honour `nbf`/`iat`, and bind the
algorithm to the key type so a public key can never be used as an HMAC secret.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from apiproxy import uuids

ISSUER = "apiproxy"
LEEWAY_SECONDS = 30
ALLOWED_ALGORITHMS = ("EdDSA", "ES256", "RS256")

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class TokenError(Exception):
    """A token that must be refused. `reason` is a short machine-readable code for logs/audit."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str
    audience: str
    scope: str
    issuer: str
    expires_at: float
    raw: Mapping[str, Any]


def algorithm_for(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise TokenError("unsupported_key", f"EC curve {key.curve.name}")
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise TokenError("unsupported_key", "RSA key shorter than 2048 bits")
        return "RS256"
    raise TokenError("unsupported_key", type(key).__name__)


def load_public_key(pem: str | bytes) -> PublicKey:
    """Parse a PKIX public key PEM (`PUBLIC KEY` or Deckhouse's `ED25519 PUBLIC KEY` label)."""
    data = pem.encode() if isinstance(pem, str) else pem
    data = data.replace(b"ED25519 PUBLIC KEY", b"PUBLIC KEY")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise TokenError("bad_key", "not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TokenError("unsupported_key", type(key).__name__)
    algorithm_for(key)
    return key


def load_private_key(pem: str | bytes) -> PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    data = data.replace(b"ED25519 PRIVATE KEY", b"PRIVATE KEY")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TokenError("bad_key", "not an unencrypted PEM private key") from exc
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise TokenError("unsupported_key", type(key).__name__)
    algorithm_for(key)
    return key


def public_key_pem(key: PublicKey | PrivateKey) -> str:
    pub = (
        key.public_key()
        if isinstance(
            key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        )
        else key
    )
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def private_key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def mint(
    key: PrivateKey,
    *,
    subject: str,
    audience: str,
    scope: str,
    ttl_seconds: float,
    issuer: str = ISSUER,
    now: float | None = None,
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "scope": scope,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_seconds),
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=algorithm_for(key))


def verify(
    token: str,
    *,
    audience: str,
    scope: str,
    key_for_subject: Callable[[str], PublicKey | None],
    now: float | None = None,
    leeway: float = LEEWAY_SECONDS,
) -> Claims:
    """Verify `token` or raise TokenError. The unverified `sub` only selects which key to try."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", type(exc).__name__) from exc
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenError("algorithm_not_allowed", str(alg))
    subject = unverified.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("missing_subject")
    subject = uuids.key(subject)  # a cluster UUID, whatever its case, names one peer
    key = key_for_subject(subject)
    if key is None:
        raise TokenError("unknown_subject", subject)
    if algorithm_for(key) != alg:
        raise TokenError("algorithm_mismatch", f"{alg} token for a {algorithm_for(key)} key")
    try:
        # Time claims are checked below against `now`, so clock skew is testable and explicit.
        # So is the audience, below: a cluster UUID is compared in canonical form.
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            options={
                "require": ["exp", "sub", "aud"],
                "verify_aud": False,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenError("bad_signature") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError("missing_claim", exc.claim) from exc
    except jwt.PyJWTError as exc:
        raise TokenError("invalid", type(exc).__name__) from exc
    if not _audience_matches(claims["aud"], audience):
        raise TokenError("wrong_audience")
    current = time.time() if now is None else now
    for claim in ("exp", "nbf", "iat"):
        if claim in claims and not isinstance(claims[claim], int | float):
            raise TokenError("invalid", f"{claim} is not a number")
    _check_times(claims, current, leeway)
    if claims.get("scope") != scope:
        raise TokenError("wrong_scope", str(claims.get("scope")))
    return Claims(
        subject=subject,
        audience=audience,
        scope=scope,
        issuer=str(claims.get("iss", "")),
        expires_at=float(claims["exp"]),
        raw=claims,
    )


def _audience_matches(aud: Any, audience: str) -> bool:
    """RFC 7519 `aud`: one string or a list of strings, one of which must be `audience`."""
    values = aud if isinstance(aud, list) else [aud]
    want = uuids.key(audience)
    return any(isinstance(v, str) and uuids.key(v) == want for v in values)


def _check_times(raw: Mapping[str, Any], current: float, leeway: float) -> None:
    """The time checks of `verify` (claims already known to be numbers)."""
    if current >= raw["exp"] + leeway:
        raise TokenError("expired")
    if "nbf" in raw and current + leeway < raw["nbf"]:
        raise TokenError("not_yet_valid")
    if "iat" in raw and current + leeway < raw["iat"]:
        raise TokenError("issued_in_future")


class VerifyCache:
    """Successful `verify` results, so a peer re-sending the same token skips the signature check.

    An entry is keyed by the exact token string together with `audience`, `scope` and `leeway`,
    and remembers the key object the signature was checked with. A hit is only accepted when,
    *now*, `key_for_subject(sub)` returns that very same key object (a peers reload builds new key
    objects, so any reload, a removed peer or a changed key sends the token through a full
    `verify` again) and the time claims still pass against the current time. Everything else
    `verify` checks (header, algorithm, signature, audience, scope, required claims) depends only
    on the token string, the key and the arguments that make up the cache key. So a hit never
    accepts a token that `verify` would refuse at that moment. Failures are never cached: every
    refused token costs a full verification, and a token refused only for its time (not yet
    valid) or an unknown peer (not yet reloaded) is re-judged on its next use.

    Bounded: at most `max_entries` tokens; the least recently used one is dropped first.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str, float], tuple[Claims, PublicKey]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def verify(
        self,
        token: str,
        *,
        audience: str,
        scope: str,
        key_for_subject: Callable[[str], PublicKey | None],
        now: float | None = None,
        leeway: float = LEEWAY_SECONDS,
    ) -> Claims:
        """`tokens.verify` with the cache in front (same arguments, same result, same errors)."""
        ck = (token, audience, scope, leeway)
        entry = self._entries.get(ck)
        if entry is not None:
            claims, key = entry
            if key_for_subject(claims.subject) is key:
                current = time.time() if now is None else now
                try:
                    _check_times(claims.raw, current, leeway)
                except TokenError:
                    pass  # a full verify below gives the reason (and nothing is cached)
                else:
                    self._entries.move_to_end(ck)
                    self.hits += 1
                    return claims
            del self._entries[ck]
        self.misses += 1
        used: list[PublicKey | None] = []

        def lookup(subject: str) -> PublicKey | None:
            key = key_for_subject(subject)
            used.append(key)
            return key

        claims = verify(
            token, audience=audience, scope=scope, key_for_subject=lookup, now=now, leeway=leeway
        )
        # Remember the exact key object the signature was checked with.
        if len(used) == 1 and used[0] is not None:
            self._entries[ck] = (claims, used[0])
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return claims
