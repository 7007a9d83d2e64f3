"""Pure builders for everything the controller writes: remote secret kubeconfig, client
credentials, the api-proxy's peers file, mesh `caCertificates` and `meshNetworks` merges.

Rendering is deterministic (sorted keys, fixed layout) so that unchanged inputs produce
byte-identical output: istiod hashes the kubeconfig and re-lists everything on any change.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from apiproxy import pki, tokens
from apiproxy.federation.metadata import Gateway

API_SCOPE = "api"
MULTICLUSTER_LABEL = "istio/multiCluster"
CLUSTER_ANNOTATION = "networking.istio.io/cluster"
OWNER_LABEL = "apiproxy.io/istiomulticluster"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "apiproxy-federation"
OWNED_CA_ANNOTATION = "apiproxy.io/owned-ca-certificates"
OWNED_NETWORKS_ANNOTATION = "apiproxy.io/owned-mesh-networks"
# Which peer (IstioMulticluster name) each owned entry belongs to: lets a peer whose metadata is
# unusable for a pass keep exactly its own entries ({"<name>": "<digest or network>"}).
CA_OWNERS_ANNOTATION = "apiproxy.io/ca-certificate-owners"
NETWORK_OWNERS_ANNOTATION = "apiproxy.io/mesh-network-owners"
REMOTE_SECRET_PREFIX = "istio-remote-secret-"  # noqa: S105 - a name

# Fields istiod's sanitizeKubeConfig refuses (they read files or run code).
FORBIDDEN_USER_FIELDS = ("client-certificate", "client-key", "tokenFile", "token-file", "exec")


def dump_yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False, width=1 << 16)


# ---------------------------------------------------------------- client credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    cert_pem: str
    key_pem: str
    token: str
    issued_at: float
    expires_at: float

    def due(self, now: float, fraction: float = 2 / 3) -> bool:
        return now >= self.issued_at + (self.expires_at - self.issued_at) * fraction


def issue_credentials(
    *,
    client_ca: pki.KeyPair,
    signing_key: tokens.PrivateKey,
    local_uuid: str,
    peer_uuid: str,
    ttl_seconds: float,
    now: float | None = None,
) -> Credentials:
    """A client certificate (CN = our cluster UUID) and a `scope: api` JWT with one lifetime."""
    issued = int(time.time() if now is None else now)
    start = dt.datetime.fromtimestamp(issued, dt.UTC)
    pair = pki.issue(
        client_ca,
        local_uuid,
        organization="apiproxy:peers",
        client=True,
        not_before=start - dt.timedelta(seconds=60),
        valid_for=dt.timedelta(seconds=ttl_seconds + 60),
    )
    token = tokens.mint(
        signing_key,
        subject=local_uuid,
        audience=peer_uuid,
        scope=API_SCOPE,
        ttl_seconds=ttl_seconds,
        now=issued,
    )
    return Credentials(
        pair.cert_pem, pair.key_pem, token, float(issued), float(issued + ttl_seconds)
    )


def credentials_from_kubeconfig(
    kubeconfig: Mapping[str, Any],
    *,
    client_ca: pki.KeyPair,
    signing_key: tokens.PrivateKey,
    local_uuid: str,
    peer_uuid: str,
    now: float | None = None,
) -> Credentials | None:
    """The credentials found in an existing kubeconfig, if they are still ours and usable:
    the token verifies with our current key for this peer, the certificate chains to our
    current client CA, and neither has expired."""
    try:
        user = kubeconfig["users"][0]["user"]
        cert_pem = base64.b64decode(user["client-certificate-data"]).decode()
        key_pem = base64.b64decode(user["client-key-data"]).decode()
        token = str(user["token"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    try:
        claims = tokens.verify(
            token,
            audience=peer_uuid,
            scope=API_SCOPE,
            key_for_subject=lambda s: (
                tokens.load_public_key(tokens.public_key_pem(signing_key))
                if s == local_uuid
                else None
            ),
            now=current,
            leeway=0,
        )
        cert = pki.load_certs(cert_pem)[0]
        cert.verify_directly_issued_by(client_ca.cert)
    except (tokens.TokenError, ValueError, TypeError, IndexError):
        return None
    except Exception:  # InvalidSignature and friends: not ours any more
        return None
    if cert.not_valid_after_utc.timestamp() <= current:
        return None
    issued = float(claims.raw.get("iat", claims.raw.get("nbf", current)))
    return Credentials(cert_pem, key_pem, token, issued, claims.expires_at)


# ---------------------------------------------------------------- kubeconfig / remote secret


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def build_kubeconfig(
    *,
    name: str,
    server: str,
    ca_pem: str | None,
    credentials: Credentials,
    insecure_skip_verify: bool = False,
) -> dict[str, Any]:
    """A kubeconfig with inline credentials only (istiod refuses file paths and exec)."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem and ca_pem.strip():
        cluster["certificate-authority-data"] = _b64(ca_pem)
    if insecure_skip_verify:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
        "preferences": {},
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate-data": _b64(credentials.cert_pem),
                    "client-key-data": _b64(credentials.key_pem),
                    "token": credentials.token,
                },
            }
        ],
    }


def inline_only_violations(kubeconfig: Mapping[str, Any]) -> list[str]:
    """What istiod's sanitizeKubeConfig would refuse in this kubeconfig."""
    problems = []
    for entry in kubeconfig.get("users") or []:
        user = entry.get("user") or {}
        for key in FORBIDDEN_USER_FIELDS:
            if key in user:
                problems.append(f"user {entry.get('name')}: {key}")
        provider = user.get("auth-provider")
        if provider and provider.get("name") != "oidc":
            problems.append(f"user {entry.get('name')}: auth-provider {provider.get('name')}")
    for entry in kubeconfig.get("clusters") or []:
        if "certificate-authority" in (entry.get("cluster") or {}):
            problems.append(f"cluster {entry.get('name')}: certificate-authority file")
    return problems


def remote_secret(
    *,
    imc_name: str,
    imc_uid: str,
    namespace: str,
    peer_cluster_id: str,
    kubeconfig_text: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": REMOTE_SECRET_PREFIX + imc_name,
            "namespace": namespace,
            "labels": {
                MULTICLUSTER_LABEL: "true",
                MANAGED_BY_LABEL: MANAGED_BY,
                OWNER_LABEL: imc_name,
            },
            "annotations": {CLUSTER_ANNOTATION: peer_cluster_id},
            "ownerReferences": [
                {
                    "apiVersion": "deckhouse.io/v1alpha1",
                    "kind": "IstioMulticluster",
                    "name": imc_name,
                    "uid": imc_uid,
                }
            ],
        },
        "data": {peer_cluster_id: _b64(kubeconfig_text)},
    }


# ---------------------------------------------------------------- peers file


@dataclass(frozen=True, slots=True)
class PeerEntry:
    name: str
    cluster_uuid: str
    jwt_public_key: str
    client_ca: str | None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "clusterUUID": self.cluster_uuid,
            "jwtPublicKey": self.jwt_public_key,
        }
        if self.client_ca:
            doc["clientCA"] = self.client_ca
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> PeerEntry | None:
        """An entry of an existing peers file (kept verbatim for a peer on hold)."""
        if not isinstance(doc, dict):
            return None
        name, uuid, key = doc.get("name"), doc.get("clusterUUID"), doc.get("jwtPublicKey")
        client_ca = doc.get("clientCA")
        if not all(isinstance(v, str) and v for v in (name, uuid, key)):
            return None
        return cls(
            str(name), str(uuid), str(key), client_ca if isinstance(client_ca, str) else None
        )


def render_peers(entries: Sequence[PeerEntry]) -> str:
    """The api-proxy's `--peers` file: `peers:` list sorted by name."""
    return dump_yaml({"peers": [e.to_dict() for e in sorted(entries, key=lambda e: e.name)]})


# ---------------------------------------------------------------- mesh config merges


def pem_digest(pem: str) -> str:
    """Stable identity of a CA entry: sha256 over the DER of its certificates."""
    h = hashlib.sha256()
    for cert in x509.load_pem_x509_certificates(pem.encode()):
        h.update(cert.public_bytes(serialization.Encoding.DER))
    return h.hexdigest()[:32]


def _entry_digest(entry: Any) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("pem"), str):
        return None
    try:
        return pem_digest(entry["pem"])
    except ValueError:
        return None


def merge_ca_certificates(
    mesh: Mapping[str, Any],
    desired: Mapping[str, tuple[str, Sequence[str]]],
    previously_owned: set[str],
    keep: frozenset[str] | set[str] = frozenset(),
) -> tuple[dict[str, Any], set[str]]:
    """Return (new mesh, owned digests). `desired` maps owner → (root PEM, trust domains).

    Entries whose digest we own are ours: dropped when no longer desired, rewritten in place
    otherwise. Owned entries whose digest is in `keep` (peers on hold) stay exactly as found.
    An identical root someone else configured is left alone and not taken over.
    Everything else in `mesh` is kept as found, in order.
    """
    out = dict(mesh)
    want: dict[str, dict[str, Any]] = {}
    for _owner, (pem, domains) in sorted(desired.items()):
        digest = pem_digest(pem)
        if digest in want:
            merged = sorted(set(want[digest].get("trustDomains", [])) | set(domains))
            want[digest]["trustDomains"] = merged
            continue
        entry: dict[str, Any] = {"pem": pem}
        if domains:
            entry["trustDomains"] = sorted(set(domains))
        want[digest] = entry
    existing = out.get("caCertificates")
    result: list[Any] = []
    owned: set[str] = set()
    for item in existing if isinstance(existing, list) else []:
        found = _entry_digest(item)
        if found is None or (found not in previously_owned and found not in want):
            result.append(item)  # foreign
        elif found not in previously_owned:
            result.append(item)  # foreign entry with a root we want: it already trusts it
            want.pop(found)
        elif found in want and found not in owned:
            result.append(want.pop(found))  # ours, still wanted: rewrite in place
            owned.add(found)
        elif found in keep and found not in owned:
            result.append(item)  # ours, its peer is on hold: untouched
            owned.add(found)
        # else: ours and no longer wanted (or a duplicate of ours): drop
    for digest in sorted(want):
        result.append(want[digest])
        owned.add(digest)
    if result:
        out["caCertificates"] = result
    else:
        out.pop("caCertificates", None)
    return out, owned


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    network: str
    registries: tuple[str, ...]
    gateways: tuple[Gateway, ...]


def network_entry(spec: NetworkSpec) -> dict[str, Any]:
    return {
        "endpoints": [{"fromRegistry": r} for r in spec.registries],
        "gateways": [g.to_dict() for g in spec.gateways],
    }


def merge_mesh_networks(
    mesh_networks: Mapping[str, Any],
    desired: Sequence[NetworkSpec],
    previously_owned: set[str],
    keep: frozenset[str] | set[str] = frozenset(),
) -> tuple[dict[str, Any], set[str]]:
    """Return (new meshNetworks document, owned network names); foreign networks are kept, and
    so are owned networks named in `keep` (peers on hold), exactly as found. A desired network
    never replaces one in `keep` or one desired earlier (the controller refuses such collisions
    before; this is the last line of defence)."""
    out = dict(mesh_networks)
    networks_raw = out.get("networks")
    networks: dict[str, Any] = dict(networks_raw) if isinstance(networks_raw, dict) else {}
    owned: set[str] = set()
    for name in previously_owned:
        if name in keep and name in networks:
            owned.add(name)
        else:
            networks.pop(name, None)
    for spec in desired:
        if spec.network in networks and spec.network not in previously_owned:
            continue  # someone else's network of that name: do not take it over
        if spec.network in owned:
            continue  # held for a peer on hold, or already written for an earlier one
        networks[spec.network] = network_entry(spec)
        owned.add(spec.network)
    out["networks"] = networks
    return out, owned
