"""Identity creation and the metadata exporter, against a simulated cluster over real TLS."""

from __future__ import annotations

import base64
import json
import ssl

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import pki, tokens
from apiproxy.federation import identity
from apiproxy.federation.kube import Kube

PRIVATE = "/metadata/private/multicluster.json"


async def test_identity_is_created_once_and_never_regenerated(clusters):
    a = await clusters("a")
    kube = Kube(a.client)
    first = await identity.ensure_identity(
        kube, namespace="apiproxy-system", cluster_domain="cluster.local"
    )
    secret = a.get("secrets", "apiproxy-identity", "apiproxy-system")
    ca_secret = a.get("secrets", "apiproxy-client-ca", "apiproxy-system")
    assert secret is not None
    assert ca_secret is not None
    rv = (secret["metadata"]["resourceVersion"], ca_secret["metadata"]["resourceVersion"])
    second = await identity.ensure_identity(
        kube, namespace="apiproxy-system", cluster_domain="cluster.local"
    )
    assert second.public_key_pem == first.public_key_pem
    assert second.client_ca == first.client_ca
    assert second.cluster_uuid == a.uuid
    assert second.cluster_id == identity.cluster_id("cluster.local", a.uuid)
    again = a.get("secrets", "apiproxy-identity", "apiproxy-system")
    again_ca = a.get("secrets", "apiproxy-client-ca", "apiproxy-system")
    assert (again["metadata"]["resourceVersion"], again_ca["metadata"]["resourceVersion"]) == rv
    # The stored key is an Ed25519 pair whose public half matches.
    pub = base64.b64decode(again["data"]["pub.pem"]).decode()
    assert pub == first.public_key_pem
    assert isinstance(first.signing_key, ed25519.Ed25519PrivateKey)


def _client_ssl(test_ca: pki.KeyPair) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=test_ca.cert_pem)


@pytest.fixture
async def exporter(clusters, exporter_tls):
    a = await clusters("a")
    fed = await a.federation(exporter_tls_cert=exporter_tls[0], exporter_tls_key=exporter_tls[1])
    return a, fed


async def test_public_documents(exporter, test_ca):
    a, fed = exporter
    base = f"https://127.0.0.1:{fed.exporter_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/healthz", ssl=_client_ssl(test_ca)) as r:
            assert r.status == 200
            assert await r.text() == "Ok."
        async with s.get(base + "/metadata/public/public.json", ssl=_client_ssl(test_ca)) as r:
            assert r.status == 200
            doc = await r.json()
        async with s.get(
            base + "/metadata/public/spiffe-bundle-endpoint", ssl=_client_ssl(test_ca)
        ) as r:
            bundle = await r.json()
    assert doc["clusterUUID"] == a.uuid
    assert doc["rootCA"] == a.root.cert_pem
    assert doc["authnKeyPub"] == fed.identity.public_key_pem
    assert doc["apiproxyClientCA"] == fed.identity.client_ca.cert_pem
    assert "PRIVATE" not in str(doc)
    assert len(bundle["keys"]) == 1
    assert bundle["keys"][0]["use"] == "x509-svid"


async def _private(fed, test_ca, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"https://127.0.0.1:{fed.exporter_port}{PRIVATE}",
            headers=headers,
            ssl=_client_ssl(test_ca),
        ) as r,
    ):
        return r.status, await r.text()


async def test_private_document_requires_a_known_peers_token(exporter, test_ca):
    a, fed = exporter
    peer_key = ed25519.Ed25519PrivateKey.generate()
    peer_uuid = "22222222-2222-4222-8222-222222222222"

    def mint(**kw):
        args = {
            "subject": peer_uuid,
            "audience": a.uuid,
            "scope": "private-multicluster",
            "ttl_seconds": 60,
            **kw,
        }
        return tokens.mint(peer_key, **args)

    assert await _private(fed, test_ca, None) == (401, "Authentication error: missing bearer token")
    # Unknown subject: nobody fetched this peer's public metadata.
    assert await _private(fed, test_ca, mint()) == (401, "Authentication error: unknown_subject")
    # The controller's first pass rebuilds the registry from the (no) objects: let it finish
    # before registering the peer by hand, or it races the registration away.
    await fed.controller.wait_for_pass(0)
    fed.registry.set("peer", peer_uuid, tokens.public_key_pem(peer_key))
    assert await _private(fed, test_ca, mint(scope="api")) == (
        401,
        "Authentication error: wrong_scope",
    )
    assert await _private(fed, test_ca, mint(audience=peer_uuid)) == (
        401,
        "Authentication error: wrong_audience",
    )
    forged = tokens.mint(
        ed25519.Ed25519PrivateKey.generate(),
        subject=peer_uuid,
        audience=a.uuid,
        scope="private-multicluster",
        ttl_seconds=60,
    )
    assert await _private(fed, test_ca, forged) == (401, "Authentication error: bad_signature")
    status, body = await _private(fed, test_ca, mint())
    assert status == 200
    doc = json.loads(body)
    assert doc["clusterUUID"] == a.uuid
    assert doc["clusterID"] == fed.identity.cluster_id
    assert doc["networkName"] == f"network-{fed.identity.cluster_id}"
    assert doc["apiHost"] == "api.a.example:4443"
    assert doc["ingressGateways"] == [{"address": "192.0.2.1", "port": 15443}]


async def _private_header(fed, test_ca, header: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"https://127.0.0.1:{fed.exporter_port}{PRIVATE}",
            headers={"Authorization": header},
            ssl=_client_ssl(test_ca),
        ) as r,
    ):
        return r.status, await r.text()


async def test_private_document_authorization_header_and_logs(exporter, test_ca, capsys):
    """The exporter's JWT check to the letter (kills mutants scripts/mutate found surviving)."""
    a, fed = exporter
    peer_key = ed25519.Ed25519PrivateKey.generate()
    peer_uuid = "abcdef12-3456-4789-8abc-def012345678"
    await fed.controller.wait_for_pass(0)
    fed.registry.set("peer", peer_uuid.upper(), tokens.public_key_pem(peer_key))
    assert fed.registry.names() == ["peer"]
    token = tokens.mint(
        peer_key, subject=peer_uuid, audience=a.uuid, scope="private-multicluster", ttl_seconds=60
    )
    missing = (401, "Authentication error: missing bearer token")
    assert await _private_header(fed, test_ca, f"Basic {token}") == missing
    assert await _private_header(fed, test_ca, "Bearer ") == missing
    assert await _private_header(fed, test_ca, "Bearer a b") == (
        401,
        "Authentication error: malformed",
    )
    capsys.readouterr()
    assert (await _private_header(fed, test_ca, f"bearer {token}"))[0] == 200
    forged = tokens.mint(
        ed25519.Ed25519PrivateKey.generate(),
        subject=peer_uuid,
        audience=a.uuid,
        scope="private-multicluster",
        ttl_seconds=60,
    )
    assert (await _private_header(fed, test_ca, f"Bearer {forged}"))[0] == 401
    logs = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    served = [r for r in logs if r.get("event") == "private_metadata_served"]
    assert [r["subject"] for r in served] == [peer_uuid]
    refused = [r for r in logs if r.get("event") == "private_metadata_refused"]
    assert [(r["reason"], r["peer"]) for r in refused] == [("bad_signature", "127.0.0.1")]
    assert token not in str(logs)


def test_peer_registry_names_and_replacement():
    from apiproxy.federation.exporter import PeerRegistry

    key = tokens.public_key_pem(ed25519.Ed25519PrivateKey.generate())
    reg = PeerRegistry()
    reg.set("b", "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", key)
    reg.set("bad", "cccccccc-cccc-4ccc-8ccc-cccccccccccc", "not a key")  # ignored
    assert reg.names() == ["b"]
    reg.replace_all(
        {
            "w": ("e", "not a key"),  # skipped, and the rest still taken
            "x": ("dddddddd-dddd-4ddd-8ddd-dddddddddddd", key),
            "y": ("e", "not a key"),
        }
    )
    assert reg.names() == ["x"]
    assert reg.key_for("bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb") is None
    reg.remove("x")
    reg.remove("x")
    assert reg.names() == []
