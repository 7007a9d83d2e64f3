"""The local cluster's identity: UUID, clusterID, network, signing key, client CA, Istio root.

Key material lives in Secrets created exactly once (`create`, and on 409 the winner's copy is
read back), so two replicas racing at start-up converge on one key, and a restart never
regenerates what peers already trust.
"""

from __future__ import annotations

import base64
import time
import zlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import pki, tokens, uuids
from apiproxy.errors import UserError
from apiproxy.federation.kube import Kube, KubeError, Obj, configmap_path, secret_path

IDENTITY_SECRET = "apiproxy-identity"  # noqa: S105 - a name
CLIENT_CA_SECRET = "apiproxy-client-ca"  # noqa: S105 - a name
ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_SECRET = "cacerts"  # noqa: S105 - a name
ROOT_KEY = "root-cert.pem"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "apiproxy-federation"


def cluster_id(cluster_domain: str, cluster_uuid: str) -> str:
    """Deckhouse's `istioClusterID`: domain with `.`→`-`, `-`, adler32 (decimal) of the UUID."""
    checksum = zlib.adler32(cluster_uuid.encode())
    return f"{cluster_domain.replace('.', '-')}-{checksum}"


def network_name(cid: str) -> str:
    return f"network-{cid}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: Obj | None, key: str) -> str | None:
    if not data or not isinstance(data.get(key), str):
        return None
    try:
        return base64.b64decode(data[key]).decode()
    except ValueError:
        return None


@dataclass
class LocalIdentity:
    cluster_uuid: str
    cluster_domain: str
    signing_key: tokens.PrivateKey
    client_ca: pki.KeyPair
    network: str = ""
    cluster_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.cluster_id = cluster_id(self.cluster_domain, self.cluster_uuid)
        if not self.network:
            self.network = network_name(self.cluster_id)

    @property
    def public_key_pem(self) -> str:
        return tokens.public_key_pem(self.signing_key)

    @property
    def public_key(self) -> tokens.PublicKey:
        return tokens.load_public_key(self.public_key_pem)


async def read_cluster_uuid(kube: Kube) -> str:
    ns = await kube.get("/api/v1/namespaces/kube-system")
    uid = uuids.canonical((ns or {}).get("metadata", {}).get("uid"))
    if uid is None:
        raise UserError("cannot read the kube-system namespace uid (the cluster UUID)")
    return uid


async def _create_once(kube: Kube, namespace: str, name: str, data: dict[str, str]) -> Obj:
    """Return the Secret, creating it with `data` only if it does not exist yet."""
    existing = await kube.get(secret_path(namespace, name))
    if existing is not None:
        return existing
    body: Obj = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        },
        "type": "Opaque",
        "data": {k: _b64(v) for k, v in data.items()},
    }
    try:
        return await kube.create(secret_path(namespace), body)
    except KubeError as exc:
        if exc.status != 409:
            raise
    again = await kube.get(secret_path(namespace, name))
    if again is None:
        raise KubeError(409, f"secret {namespace}/{name} vanished after a create conflict")
    return again


async def ensure_signing_key(kube: Kube, namespace: str) -> tokens.PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    secret = await _create_once(
        kube,
        namespace,
        IDENTITY_SECRET,
        {"priv.pem": tokens.private_key_pem(key), "pub.pem": tokens.public_key_pem(key)},
    )
    pem = _unb64(secret.get("data"), "priv.pem")
    if pem is None:
        raise UserError(f"secret {namespace}/{IDENTITY_SECRET} has no readable priv.pem")
    try:
        return tokens.load_private_key(pem)
    except tokens.TokenError as exc:
        raise UserError(f"secret {namespace}/{IDENTITY_SECRET}: {exc.reason}") from None


async def ensure_client_ca(kube: Kube, namespace: str, cluster_uuid: str) -> pki.KeyPair:
    ca = pki.make_ca(f"apiproxy client CA {cluster_uuid}")
    secret = await _create_once(
        kube, namespace, CLIENT_CA_SECRET, {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}
    )
    cert = _unb64(secret.get("data"), "ca.crt")
    key = _unb64(secret.get("data"), "ca.key")
    if not cert or not key:
        raise UserError(f"secret {namespace}/{CLIENT_CA_SECRET} lacks ca.crt or ca.key")
    pair = pki.KeyPair(cert, key)
    try:
        pair.private_key()
        pki.load_certs(cert)
    except (ValueError, AssertionError):
        raise UserError(f"secret {namespace}/{CLIENT_CA_SECRET} holds no usable CA") from None
    return pair


async def ensure_identity(
    kube: Kube, *, namespace: str, cluster_domain: str, network: str = ""
) -> LocalIdentity:
    uuid = await read_cluster_uuid(kube)
    key = await ensure_signing_key(kube, namespace)
    ca = await ensure_client_ca(kube, namespace, uuid)
    return LocalIdentity(
        cluster_uuid=uuid,
        cluster_domain=cluster_domain,
        signing_key=key,
        client_ca=ca,
        network=network,
    )


class RootCASource:
    """The local Istio root, re-read at most every `ttl` seconds (public.json is unauthenticated,
    so a request flood must not become a kube-apiserver flood)."""

    def __init__(self, kube: Kube, istio_namespace: str, ttl: float = 10.0) -> None:
        self.kube = kube
        self.namespace = istio_namespace
        self.ttl = ttl
        self._value: str | None = None
        self._at = -1e9

    async def get(self) -> str | None:
        now = time.monotonic()
        if now - self._at < self.ttl:
            return self._value
        value: str | None = None
        cm = await self.kube.get(configmap_path(self.namespace, ROOT_CONFIGMAP))
        if cm is not None:
            raw = (cm.get("data") or {}).get(ROOT_KEY)
            value = raw if isinstance(raw, str) and raw.strip() else None
        if value is None:
            secret = await self.kube.get(secret_path(self.namespace, ROOT_SECRET))
            value = _unb64((secret or {}).get("data"), ROOT_KEY)
        self._value, self._at = value, now
        return value
