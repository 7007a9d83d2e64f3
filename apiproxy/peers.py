"""The `--peers` file: who may call us, and with which credentials.

```yaml
peers:
  - name: cluster-b                      # DNS-1123 name; the audit username is `peer:cluster-b`
    clusterUUID: 5f0c...                 # the peer's cluster UUID: `sub` of its JWTs (any case)
    clientCA: |                          # PEM bundle: anchors for the peer's client certificates
      -----BEGIN CERTIFICATE-----
    jwtPublicKey: |                      # PEM public key (Ed25519, P-256 or RSA >= 2048)
      -----BEGIN PUBLIC KEY-----
```

Either credential may be absent, not both. The file is validated strictly: a file with any error is
refused as a whole, so a reload never half-applies.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from apiproxy import tokens, uuids
from apiproxy.audit.events import peer_username
from apiproxy.errors import UserError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_FIELDS = {"name", "clusterUUID", "clientCA", "jwtPublicKey"}


class PeersError(UserError):
    """The peers file is unreadable or invalid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    cluster_uuid: str
    client_ca: tuple[x509.Certificate, ...] = ()
    jwt_key: tokens.PublicKey | None = None

    @property
    def username(self) -> str:
        return peer_username(self.name)

    def issued(self, leaf: x509.Certificate) -> bool:
        """True when one of this peer's own anchors directly signed `leaf`."""
        for anchor in self.client_ca:
            if anchor.subject != leaf.issuer:
                continue
            try:
                leaf.verify_directly_issued_by(anchor)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return True
        return False


def same_credentials(a: Peer | None, b: Peer | None) -> bool:
    """Whether two peer entries accept exactly the same certificates and tokens."""
    if a is None or b is None:
        return False

    def creds(p: Peer) -> tuple[object, ...]:
        anchors = tuple(c.fingerprint(hashes.SHA256()) for c in p.client_ca)
        key = tokens.public_key_pem(p.jwt_key) if p.jwt_key is not None else None
        return (p.name, p.cluster_uuid, anchors, key)

    return creds(a) == creds(b)


@dataclass(frozen=True, slots=True)
class PeerSet:
    peers: tuple[Peer, ...]
    source: str = "<string>"
    warnings: tuple[str, ...] = ()
    _by_uuid: dict[str, Peer] = field(default_factory=dict, repr=False, compare=False)
    # Signature checks per certificate, memoised for this (immutable) peer set.
    _by_cert: dict[bytes, list[Peer]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_uuid.update({p.cluster_uuid: p for p in self.peers})

    def by_name(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def by_uuid(self, cluster_uuid: str) -> Peer | None:
        return self._by_uuid.get(uuids.key(cluster_uuid))

    def key_for_subject(self, subject: str) -> tokens.PublicKey | None:
        peer = self.by_uuid(subject)
        return peer.jwt_key if peer else None

    def client_ca_pem(self) -> str:
        """The union of every peer's anchors, for the TLS layer's first (coarse) check."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode()
            for p in self.peers
            for c in p.client_ca
        )

    def peers_for_certificate(self, leaf: x509.Certificate) -> list[Peer]:
        key = leaf.fingerprint(hashes.SHA256())
        found = self._by_cert.get(key)
        if found is None:
            found = [p for p in self.peers if p.issued(leaf)]
            if len(self._by_cert) >= 4096:
                self._by_cert.clear()
            self._by_cert[key] = found
        return list(found)


def _err(source: str, where: str, what: str) -> PeersError:
    return PeersError(f"{source}: {where}: {what}")


def _certs(source: str, where: str, value: Any) -> tuple[x509.Certificate, ...]:
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise _err(source, where, "must be a PEM bundle of CA certificates")
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError as exc:
        raise _err(source, where, "contains a certificate that cannot be parsed") from exc
    for i, cert in enumerate(certs):
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise _err(
                source,
                f"{where}[{i}]",
                f"certificate {cert.subject.rfc4514_string()!r} is not a CA"
                " (basicConstraints CA:TRUE required)",
            )
    return tuple(certs)


def parse(text: str, source: str = "<string>", *, own_cluster_uuid: str | None = None) -> PeerSet:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1} column {mark.column + 1}" if mark else "document"
        raise _err(source, at, "not valid YAML") from None
    if not isinstance(doc, Mapping) or set(doc) != {"peers"}:
        raise _err(source, "top level", "must be a mapping with exactly one key, 'peers'")
    items = doc["peers"]
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _err(source, "peers", "must be a list")
    peers: list[Peer] = []
    warnings: list[str] = []
    seen_names: dict[str, int] = {}
    seen_uuids: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"peers[{i}]"
        if not isinstance(item, Mapping):
            raise _err(source, where, "must be a mapping")
        unknown = sorted(set(map(str, item)) - _FIELDS)
        if unknown:
            raise _err(
                source,
                where,
                f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FIELDS))}",
            )
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _err(source, f"{where}.name", "must be a lowercase DNS-1123 name")
        if name in seen_names:
            raise _err(
                source, f"{where}.name", f"duplicates peers[{seen_names[name]}].name {name!r}"
            )
        seen_names[name] = i
        cu = item.get("clusterUUID")
        if not isinstance(cu, str):
            raise _err(source, f"{where}.clusterUUID", "required, a UUID string")
        canonical = uuids.canonical(cu)
        if canonical is None:
            try:
                uuid.UUID(cu)
            except ValueError:
                raise _err(source, f"{where}.clusterUUID", f"{cu!r} is not a UUID") from None
            raise _err(source, f"{where}.clusterUUID", f"{cu!r} is not in canonical UUID form")
        # Compared (and kept) in canonical form: `AAAA…` and `aaaa…` are one cluster.
        if canonical in seen_uuids:
            raise _err(
                source,
                f"{where}.clusterUUID",
                f"duplicates peers[{seen_uuids[canonical]}].clusterUUID",
            )
        if own_cluster_uuid is not None and canonical == uuids.key(own_cluster_uuid):
            raise _err(source, f"{where}.clusterUUID", "is this proxy's own --cluster-uuid")
        seen_uuids[canonical] = i
        ca_value = item.get("clientCA")
        key_value = item.get("jwtPublicKey")
        if not ca_value and not key_value:
            raise _err(source, where, "needs clientCA, jwtPublicKey or both")
        client_ca = _certs(source, f"{where}.clientCA", ca_value) if ca_value else ()
        now = dt.datetime.now(dt.UTC)
        for cert in client_ca:
            if cert.not_valid_after_utc < now:
                warnings.append(
                    f"{where}.clientCA: {cert.subject.rfc4514_string()} expired "
                    f"{cert.not_valid_after_utc.isoformat()}"
                )
        jwt_key = None
        if key_value:
            if not isinstance(key_value, str):
                raise _err(source, f"{where}.jwtPublicKey", "must be a PEM public key")
            try:
                jwt_key = tokens.load_public_key(key_value)
            except tokens.TokenError as exc:
                raise _err(
                    source,
                    f"{where}.jwtPublicKey",
                    f"{exc.reason}: Ed25519, P-256 or RSA (>= 2048 bits) PEM public key required",
                ) from None
        peers.append(Peer(name=name, cluster_uuid=canonical, client_ca=client_ca, jwt_key=jwt_key))
    fingerprints: dict[bytes, str] = {}
    for p in peers:
        for cert in p.client_ca:
            fp = cert.fingerprint(hashes.SHA256())
            other = fingerprints.setdefault(fp, p.name)
            if other != p.name:
                warnings.append(
                    f"peers {other!r} and {p.name!r} share the CA {cert.subject.rfc4514_string()};"
                    " certificates it issued are refused as ambiguous"
                )
    return PeerSet(peers=tuple(peers), source=source, warnings=tuple(warnings))


def load(path: str | Path, *, own_cluster_uuid: str | None = None) -> PeerSet:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PeersError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PeersError(f"{p}: not UTF-8 text") from None
    return parse(text, str(p), own_cluster_uuid=own_cluster_uuid)
