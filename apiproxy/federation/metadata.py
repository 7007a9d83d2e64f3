"""The Deckhouse-compatible metadata documents: models, strict validation, SPIFFE bundle, fetch.

Every document from a peer is validated before anything is derived from it; a document that
fails validation is reported with one of the Deckhouse condition reasons and never replaces the
last good copy.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from apiproxy import pki, tokens, uuids

PRIVATE_SCOPE = "private-multicluster"
MAX_DOCUMENT_BYTES = 1 << 20
_DNS1123 = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\s/]+)(:(?P<port>[0-9]{1,5}))?$")


class MetadataError(Exception):
    """A fetch or validation failure. `reason` is a Deckhouse condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Gateway:
    address: str
    port: int

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port}


@dataclass(frozen=True, slots=True)
class PublicMetadata:
    cluster_uuid: str
    authn_key_pub: str
    root_ca: str
    client_ca: str | None = None  # apiproxyClientCA: anchor of the peer's client certificates

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "clusterUUID": self.cluster_uuid,
            "authnKeyPub": self.authn_key_pub,
            "rootCA": self.root_ca,
        }
        if self.client_ca:
            doc["apiproxyClientCA"] = self.client_ca
        return doc

    def public_key(self) -> tokens.PublicKey:
        return tokens.load_public_key(self.authn_key_pub)


@dataclass(frozen=True, slots=True)
class PrivateMetadata:
    network_name: str
    api_host: str
    ingress_gateways: tuple[Gateway, ...]
    cluster_uuid: str = ""
    cluster_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "networkName": self.network_name,
            "apiHost": self.api_host,
            "ingressGateways": [g.to_dict() for g in self.ingress_gateways],
        }
        if self.cluster_uuid:
            doc["clusterUUID"] = self.cluster_uuid
        if self.cluster_id:
            doc["clusterID"] = self.cluster_id
        return doc


def valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return bool(_DNS1123.match(address))
    return True


def valid_api_host(host: str) -> bool:
    m = _HOSTPORT.match(host)
    if not m:
        return False
    name = m.group("host").strip("[]")
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return False
    return valid_address(name.lower())


def _require_str(doc: dict[str, Any], key: str, reason: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MetadataError(reason, f"field {key!r} is missing or empty")
    return value


def _check_certs(pem: str, reason: str, what: str) -> None:
    try:
        certs = pki.load_certs(pem)
    except ValueError:
        raise MetadataError(reason, f"{what} is not a PEM certificate") from None
    if not certs:
        raise MetadataError(reason, f"{what} holds no certificate")


def parse_public(doc: Any) -> PublicMetadata:
    reason = "InvalidPublicMetadata"
    if not isinstance(doc, dict):
        raise MetadataError(reason, "public metadata is not a JSON object")
    uuid = uuids.canonical(_require_str(doc, "clusterUUID", reason))
    if uuid is None:
        raise MetadataError(reason, "clusterUUID is not a UUID")
    key_pem = _require_str(doc, "authnKeyPub", reason)
    try:
        tokens.load_public_key(key_pem)
    except tokens.TokenError as exc:
        raise MetadataError(reason, f"authnKeyPub: {exc.reason}") from None
    root = _require_str(doc, "rootCA", reason)
    _check_certs(root, reason, "rootCA")
    client_ca = doc.get("apiproxyClientCA")
    if client_ca is not None:
        if not isinstance(client_ca, str) or not client_ca.strip():
            raise MetadataError(reason, "apiproxyClientCA is not a PEM string")
        _check_certs(client_ca, reason, "apiproxyClientCA")
    return PublicMetadata(uuid, key_pem, root, client_ca or None)


def parse_private(doc: Any, *, require_gateways: bool) -> PrivateMetadata:
    reason = "InvalidPrivateMetadata"
    if not isinstance(doc, dict):
        raise MetadataError(reason, "private metadata is not a JSON object")
    network = _require_str(doc, "networkName", reason)
    api_host = _require_str(doc, "apiHost", reason)
    if not valid_api_host(api_host):
        raise MetadataError(reason, "apiHost is not HOST[:PORT]")
    raw = doc.get("ingressGateways")
    if not isinstance(raw, list):
        raise MetadataError(reason, "ingressGateways is missing or not a list")
    gateways: list[Gateway] = []
    for item in raw:
        if not isinstance(item, dict):
            raise MetadataError(reason, "an ingressGateways entry is not an object")
        address, port = item.get("address"), item.get("port")
        if not isinstance(address, str) or not valid_address(address):
            raise MetadataError(reason, "an ingressGateways address is not an IP or DNS name")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise MetadataError(reason, "an ingressGateways port is not 1-65535")
        gateways.append(Gateway(address, port))
    if require_gateways and not gateways:
        raise MetadataError("MissingIngressGateways", "the peer advertises no ingress gateway")
    cid = doc.get("clusterID")
    cuuid = doc.get("clusterUUID")
    return PrivateMetadata(
        network_name=network,
        api_host=api_host,
        ingress_gateways=tuple(sorted(gateways, key=lambda g: (g.address, g.port))),
        cluster_uuid=uuids.key(cuuid) if isinstance(cuuid, str) else "",
        cluster_id=cid if isinstance(cid, str) else "",
    )


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def spiffe_bundle(
    root_pem: str, *, sequence: int = 1, refresh_hint: int = 2419200
) -> dict[str, Any]:
    """A SPIFFE trust bundle (JWKS, `use: x509-svid`) for every root in `root_pem`.

    Deckhouse handles RSA roots only; EC roots are published with their curve coordinates too.
    """
    keys: list[dict[str, Any]] = []
    for cert in pki.load_certs(root_pem):
        der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        pub = cert.public_key()
        jwk: dict[str, Any]
        if isinstance(pub, rsa.RSAPublicKey):
            nums = pub.public_numbers()
            jwk = {"kty": "RSA", "e": _b64url_uint(nums.e), "n": _b64url_uint(nums.n)}
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            nums_ec = pub.public_numbers()
            crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
                pub.curve.name, pub.curve.name
            )
            size = (pub.curve.key_size + 7) // 8
            jwk = {
                "kty": "EC",
                "crv": crv,
                "x": base64.urlsafe_b64encode(nums_ec.x.to_bytes(size, "big"))
                .rstrip(b"=")
                .decode(),
                "y": base64.urlsafe_b64encode(nums_ec.y.to_bytes(size, "big"))
                .rstrip(b"=")
                .decode(),
            }
        else:
            continue
        jwk["use"] = "x509-svid"
        jwk["x5c"] = [der]
        keys.append(jwk)
    return {"spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint, "keys": keys}


def ssl_context(ca_pem: str | None, insecure_skip_verify: bool = False) -> ssl.SSLContext:
    """System roots plus `spec.metadata.ca` (Deckhouse treats it as an extra CA)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_pem and ca_pem.strip():
        try:
            ctx.load_verify_locations(cadata=ca_pem)
        except ssl.SSLError:
            raise MetadataError(
                "FetchFailed", "spec.metadata.ca is not a PEM certificate"
            ) from None
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def cert_fingerprint(pem: str) -> str:
    certs = pki.load_certs(pem)
    return ":".join(c.fingerprint(hashes.SHA256()).hex()[:16] for c in certs)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to `limit` bytes. (`StreamReader.read(n)` returns whatever is buffered, so a
    document arriving in several TLS records used to be cut after the first one.)"""
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) >= limit:
            return bytes(body[:limit])
    return bytes(body)


async def fetch_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    ctx: ssl.SSLContext,
    token: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - an aiohttp ClientTimeout
) -> Any:
    """GET `url` and parse JSON, mapping every failure to a Deckhouse reason."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with session.get(
            url,
            headers=headers,
            ssl=ctx,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            body = await read_capped(resp, MAX_DOCUMENT_BYTES + 1)
            if resp.status != 200:
                text = body[:120].decode(errors="replace").strip()
                raise MetadataError("NonOKResponse", f"GET {url} answered {resp.status}: {text}")
    except MetadataError:
        raise
    except TimeoutError:
        raise MetadataError("FetchFailed", f"GET {url} timed out after {timeout:g}s") from None
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        raise MetadataError(
            "FetchFailed", f"GET {url} failed: {type(exc).__name__}: {exc}"
        ) from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise MetadataError("InvalidJSON", f"GET {url}: document larger than 1 MiB")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # deep nesting ([[[[...) is a RecursionError
        raise MetadataError("InvalidJSON", f"GET {url}: body is not JSON") from None
