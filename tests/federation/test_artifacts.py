"""Pure builders: identifiers, kubeconfig, credentials, peers file, mesh merges, documents."""

import base64
import time

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import peers, pki, tokens
from apiproxy.federation import artifacts, identity, metadata
from apiproxy.federation.exporter import PeerRegistry
from apiproxy.federation.metadata import Gateway, MetadataError

UUID_A = "9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
UUID_B = "11111111-2222-4333-8444-555555555555"


@pytest.fixture(scope="module")
def client_ca() -> pki.KeyPair:
    return pki.make_ca("client CA")


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def test_cluster_id_matches_the_reference_example():
    # adler32("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d") = 3115584041 (checked with zlib)
    assert identity.cluster_id("cluster.local", UUID_A) == "cluster-local-3115584041"
    assert identity.network_name("cluster-local-3115584041") == "network-cluster-local-3115584041"
    assert identity.cluster_id("corp.example.com", UUID_A).startswith("corp-example-com-")


def _creds(client_ca, key, ttl=3600, now=None):
    return artifacts.issue_credentials(
        client_ca=client_ca,
        signing_key=key,
        local_uuid=UUID_A,
        peer_uuid=UUID_B,
        ttl_seconds=ttl,
        now=now,
    )


def test_kubeconfig_has_only_inline_credentials(client_ca, key):
    creds = _creds(client_ca, key)
    ca = pki.make_ca("proxy CA")
    kc = artifacts.build_kubeconfig(
        name="cluster-local-1",
        server="https://b.example:4443",
        ca_pem=ca.cert_pem,
        credentials=creds,
    )
    assert artifacts.inline_only_violations(kc) == []
    user = kc["users"][0]["user"]
    assert set(user) == {"client-certificate-data", "client-key-data", "token"}
    cluster = kc["clusters"][0]["cluster"]
    assert cluster["server"] == "https://b.example:4443"
    assert base64.b64decode(cluster["certificate-authority-data"]).decode() == ca.cert_pem
    assert kc["current-context"] == "cluster-local-1"
    # The token is a `scope: api` JWT from us to the peer, verifiable with our public key.
    claims = tokens.verify(
        user["token"],
        audience=UUID_B,
        scope="api",
        key_for_subject=lambda s: key.public_key() if s == UUID_A else None,
    )
    assert claims.expires_at - claims.raw["iat"] == 3600
    cert = pki.load_certs(base64.b64decode(user["client-certificate-data"]).decode())[0]
    cert.verify_directly_issued_by(client_ca.cert)
    # What istiod would refuse is detected.
    bad = {"users": [{"name": "x", "user": {"client-key": "/k", "exec": {}}}]}
    assert artifacts.inline_only_violations(bad) == ["user x: client-key", "user x: exec"]


def test_rendering_is_byte_stable_and_credentials_round_trip(client_ca, key):
    creds = _creds(client_ca, key)
    kw = {"name": "c", "server": "https://h", "ca_pem": None, "credentials": creds}
    text = artifacts.dump_yaml(artifacts.build_kubeconfig(**kw))
    assert text == artifacts.dump_yaml(artifacts.build_kubeconfig(**kw))
    back = artifacts.credentials_from_kubeconfig(
        yaml.safe_load(text),
        client_ca=client_ca,
        signing_key=key,
        local_uuid=UUID_A,
        peer_uuid=UUID_B,
    )
    assert back == creds
    # Another peer, another key or another client CA: not reusable.
    for kwargs in (
        {"peer_uuid": UUID_A},
        {"signing_key": ed25519.Ed25519PrivateKey.generate()},
        {"client_ca": pki.make_ca("other")},
    ):
        args = {
            "client_ca": client_ca,
            "signing_key": key,
            "local_uuid": UUID_A,
            "peer_uuid": UUID_B,
            **kwargs,
        }
        assert artifacts.credentials_from_kubeconfig(yaml.safe_load(text), **args) is None


def test_rotation_is_due_at_two_thirds_of_lifetime(client_ca, key):
    now = time.time()
    creds = _creds(client_ca, key, ttl=300, now=now)
    assert not creds.due(now + 199)
    assert creds.due(now + 201)


def test_peers_file_is_accepted_by_the_proxy_loader(client_ca, key):
    entries = [
        artifacts.PeerEntry("zeta", UUID_B, tokens.public_key_pem(key), client_ca.cert_pem),
        artifacts.PeerEntry("alpha", UUID_A, tokens.public_key_pem(key), None),
    ]
    text = artifacts.render_peers(entries)
    assert [p["name"] for p in yaml.safe_load(text)["peers"]] == ["alpha", "zeta"]
    parsed = peers.parse(text)
    assert parsed.by_name("zeta").cluster_uuid == UUID_B
    assert parsed.by_name("zeta").client_ca
    assert parsed.by_name("alpha").client_ca == ()


def test_mesh_merge_preserves_foreign_entries_and_replaces_only_ours():
    foreign = pki.make_ca("foreign").cert_pem
    old_peer = pki.make_ca("old peer").cert_pem
    new_peer = pki.make_ca("new peer").cert_pem
    mesh = {
        "trustDomain": "cluster.local",
        "defaultConfig": {"proxyMetadata": {"PROXY_CONFIG_XDS_AGENT": "true"}},
        "caCertificates": [
            {"pem": foreign, "trustDomains": ["other.domain"]},
            {"spiffeBundleUrl": "https://bundle.example/b"},
            {"pem": old_peer, "trustDomains": ["cluster.local"]},
        ],
    }
    owned_before = {artifacts.pem_digest(old_peer)}
    out, owned = artifacts.merge_ca_certificates(
        mesh, {"b": (new_peer, ["cluster.local"])}, owned_before
    )
    assert out["trustDomain"] == "cluster.local"
    assert out["defaultConfig"] == mesh["defaultConfig"]
    assert out["caCertificates"][:2] == mesh["caCertificates"][:2]
    assert out["caCertificates"][2] == {"pem": new_peer, "trustDomains": ["cluster.local"]}
    assert len(out["caCertificates"]) == 3
    assert owned == {artifacts.pem_digest(new_peer)}
    # Merging again is a no-op (so nothing is rewritten).
    again, owned2 = artifacts.merge_ca_certificates(
        out, {"b": (new_peer, ["cluster.local"])}, owned
    )
    assert again == out
    assert owned2 == owned
    # Removing every peer leaves only the foreign entries.
    none, owned3 = artifacts.merge_ca_certificates(out, {}, owned)
    assert none["caCertificates"] == mesh["caCertificates"][:2]
    assert owned3 == set()
    # A root someone else already configured is not taken over (nor removed later).
    shared, owned4 = artifacts.merge_ca_certificates(
        mesh, {"f": (foreign, ["cluster.local"])}, set()
    )
    assert shared["caCertificates"] == mesh["caCertificates"]
    assert owned4 == set()


def test_mesh_networks_format_matches_the_reference():
    spec = artifacts.NetworkSpec(
        network="network-cluster-local-3059747280",
        registries=("cluster-local-3059747280", "cluster-b"),
        gateways=(Gateway("198.51.100.20", 15443),),
    )
    foreign = {"networks": {"net-x": {"endpoints": [{"fromCidr": "10.0.0.0/8"}], "gateways": []}}}
    out, owned = artifacts.merge_mesh_networks(foreign, [spec], set())
    assert out["networks"]["network-cluster-local-3059747280"] == {
        "endpoints": [
            {"fromRegistry": "cluster-local-3059747280"},
            {"fromRegistry": "cluster-b"},
        ],
        "gateways": [{"address": "198.51.100.20", "port": 15443}],
    }
    assert out["networks"]["net-x"] == foreign["networks"]["net-x"]
    assert owned == {"network-cluster-local-3059747280"}
    empty, owned2 = artifacts.merge_mesh_networks({}, [], set())
    assert empty == {"networks": {}}
    assert owned2 == set()
    cleared, _ = artifacts.merge_mesh_networks(out, [], owned)
    assert cleared == foreign


def test_remote_secret_shape(client_ca, key):
    s = artifacts.remote_secret(
        imc_name="b",
        imc_uid="u-1",
        namespace="istio-system",
        peer_cluster_id="cluster-local-42",
        kubeconfig_text="kc",
    )
    assert s["metadata"]["name"] == "istio-remote-secret-b"
    assert s["metadata"]["labels"]["istio/multiCluster"] == "true"
    assert s["metadata"]["annotations"]["networking.istio.io/cluster"] == "cluster-local-42"
    assert list(s["data"]) == ["cluster-local-42"]


def _public(key, root):
    return {"clusterUUID": UUID_B, "authnKeyPub": tokens.public_key_pem(key), "rootCA": root}


def test_public_document_validation(key):
    root = pki.make_ca("root").cert_pem
    doc = metadata.parse_public(_public(key, root))
    assert doc.cluster_uuid == UUID_B
    assert doc.client_ca is None
    # Deckhouse's PEM label for Ed25519 keys is accepted.
    deck = _public(key, root)
    deck["authnKeyPub"] = deck["authnKeyPub"].replace("PUBLIC KEY", "ED25519 PUBLIC KEY")
    assert metadata.parse_public(deck).cluster_uuid == UUID_B
    for field, value in (
        ("clusterUUID", ""),
        ("clusterUUID", "not-a-uuid"),
        ("authnKeyPub", "garbage"),
        ("rootCA", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        ("apiproxyClientCA", 7),
    ):
        bad = {**_public(key, root), field: value}
        with pytest.raises(MetadataError) as err:
            metadata.parse_public(bad)
        assert err.value.reason == "InvalidPublicMetadata"


def test_cluster_uuids_in_metadata_are_canonical(key):
    root = pki.make_ca("root").cert_pem
    mixed = "ABCDEF12-3456-4789-8abc-DEF012345678"
    doc = metadata.parse_public({**_public(key, root), "clusterUUID": mixed})
    assert doc.cluster_uuid == mixed.lower()
    # Spellings that uuid.UUID accepts but that are not a cluster UUID.
    for odd in ("{" + UUID_B + "}", UUID_B.replace("-", ""), "urn:uuid:" + UUID_B):
        with pytest.raises(MetadataError) as err:
            metadata.parse_public({**_public(key, root), "clusterUUID": odd})
        assert err.value.message == "clusterUUID is not a UUID"
    private = {
        "networkName": "n",
        "apiHost": "proxy.example.com:4443",
        "ingressGateways": [],
        "clusterUUID": mixed,
    }
    assert metadata.parse_private(private, require_gateways=False).cluster_uuid == mixed.lower()


def test_exporter_registry_finds_a_peer_by_uuid_in_any_case(key):
    registry = PeerRegistry()
    mixed = "ABCDEF12-3456-4789-8abc-DEF012345678"
    registry.set("p", mixed, tokens.public_key_pem(key))
    assert registry.key_for(mixed.lower()) is not None
    assert registry.key_for(mixed.upper()) is not None
    registry.replace_all({"q": (mixed.lower(), tokens.public_key_pem(key))})
    assert registry.key_for(mixed) is not None
    assert registry.key_for(UUID_B) is None


def test_private_document_validation():
    good = {
        "clusterID": "cluster-local-1",
        "networkName": "network-cluster-local-1",
        "apiHost": "proxy.example.com:4443",
        "ingressGateways": [{"address": "203.0.113.10", "port": 15443}],
    }
    doc = metadata.parse_private(good, require_gateways=True)
    assert doc.ingress_gateways == (Gateway("203.0.113.10", 15443),)
    assert doc.cluster_id == "cluster-local-1"
    with pytest.raises(MetadataError) as err:
        metadata.parse_private({**good, "ingressGateways": []}, require_gateways=True)
    assert err.value.reason == "MissingIngressGateways"
    assert metadata.parse_private({**good, "ingressGateways": []}, require_gateways=False)
    for bad in (
        {**good, "apiHost": "https://x/y"},
        {**good, "networkName": ""},
        {**good, "ingressGateways": None},
        {**good, "ingressGateways": [{"address": "bad host!", "port": 1}]},
        {**good, "ingressGateways": [{"address": "1.2.3.4", "port": 70000}]},
    ):
        with pytest.raises(MetadataError) as err:
            metadata.parse_private(bad, require_gateways=False)
        assert err.value.reason == "InvalidPrivateMetadata"


def test_spiffe_bundle_carries_the_root():
    root = pki.make_ca("root")
    bundle = metadata.spiffe_bundle(root.cert_pem)
    assert bundle["spiffe_sequence"] == 1
    (jwk,) = bundle["keys"]
    assert jwk["use"] == "x509-svid"
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    der = base64.b64decode(jwk["x5c"][0])
    assert der == root.cert.public_bytes(serialization.Encoding.DER)
