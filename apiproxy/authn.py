"""Who is calling: a verified client certificate and/or a peer JWT → exactly one Peer, or a refusal.

Rules (fail closed):
- a certificate names the single peer whose own anchor directly issued it, and must be within its
  validity window now (keep-alive connections outlive certificates);
- a bearer token is verified by `tokens.verify` with the key of the peer its `sub` names only;
- a presented credential that fails is a failure, even if the other one would pass;
- both presented → both must name the same peer;
- neither → failure.

The reason code goes to logs, metrics and the audit record; the response body only says 401.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from apiproxy import tokens
from apiproxy.audit import events as ev
from apiproxy.peers import Peer, PeerSet


class AuthnFailure(Exception):
    """`reason` is a short code: `no_credentials`, `certificate_unknown_peer`, `token_expired`..."""

    def __init__(self, reason: str, *, cert_subject: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cert_subject = cert_subject


@dataclass(frozen=True, slots=True)
class Identity:
    peer: Peer
    methods: tuple[str, ...]  # ("mtls",), ("jwt",) or ("mtls", "jwt")
    cert_subject: str | None = None
    token_subject: str | None = None

    def extra(self) -> dict[str, list[str]]:
        """`user.extra` of the audit record."""
        out = {
            ev.EXTRA_AUTHENTICATED_BY: list(self.methods),
            ev.EXTRA_CLUSTER_UUID: [self.peer.cluster_uuid],
        }
        if self.cert_subject is not None:
            out[ev.EXTRA_CERT_SUBJECT] = [self.cert_subject]
        if self.token_subject is not None:
            out[ev.EXTRA_TOKEN_SUBJECT] = [self.token_subject]
        return out


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header; AuthnFailure for any other scheme."""
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthnFailure("unsupported_authorization_scheme")
    value = value.strip()
    if not value or " " in value:
        raise AuthnFailure("malformed_authorization_header")
    return value


def authenticate(
    peers: PeerSet,
    *,
    certificate: x509.Certificate | None,
    authorization: str | None,
    cluster_uuid: str,
    now: float | None = None,
    token_cache: tokens.VerifyCache | None = None,
) -> Identity:
    """`token_cache` (optional) remembers successful token verifications; see
    `tokens.VerifyCache` for why a cached answer is always the answer `tokens.verify` gives."""
    cert_peer: Peer | None = None
    subject: str | None = None
    if certificate is not None:
        subject = certificate.subject.rfc4514_string()
        matches = peers.peers_for_certificate(certificate)
        if not matches:
            raise AuthnFailure("certificate_unknown_peer", cert_subject=subject)
        if len(matches) > 1:
            raise AuthnFailure("certificate_ambiguous_peer", cert_subject=subject)
        moment = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
        if not (certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc):
            raise AuthnFailure("certificate_expired", cert_subject=subject)
        cert_peer = matches[0]
    token = bearer_token(authorization)
    token_peer: Peer | None = None
    token_subject: str | None = None
    if token is not None:
        try:
            check = token_cache.verify if token_cache is not None else tokens.verify
            claims = check(
                token,
                audience=cluster_uuid,
                scope="api",
                key_for_subject=peers.key_for_subject,
                now=now,
            )
        except tokens.TokenError as exc:
            raise AuthnFailure(f"token_{exc.reason}", cert_subject=subject) from None
        token_peer = peers.by_uuid(claims.subject)
        if token_peer is None:  # the peer set cannot change under us, but stay closed anyway
            raise AuthnFailure("token_unknown_subject", cert_subject=subject)
        token_subject = claims.subject
    if cert_peer is None and token_peer is None:
        raise AuthnFailure("no_credentials")
    if cert_peer is not None and token_peer is not None and cert_peer.name != token_peer.name:
        raise AuthnFailure("certificate_token_peer_mismatch", cert_subject=subject)
    peer = cert_peer or token_peer
    assert peer is not None
    methods = tuple(m for m, p in (("mtls", cert_peer), ("jwt", token_peer)) if p is not None)
    return Identity(peer=peer, methods=methods, cert_subject=subject, token_subject=token_subject)
