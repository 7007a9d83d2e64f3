"""`mesh.update`: what the `istio` ConfigMap's caCertificates and meshNetworks become. Pure: a
ConfigMap and the peers' wishes in, the new data and annotations (or nothing) out."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from apiproxy import pki
from apiproxy.federation import artifacts
from apiproxy.federation.artifacts import NetworkSpec
from apiproxy.federation.mesh import MeshConfigError, MeshPeer, MeshUpdate, owners, update
from apiproxy.federation.metadata import Gateway

DOMAIN = "cluster.local"
FOREIGN_CA = {"spiffeBundleUrl": "https://bundle.example/foreign"}
FOREIGN_NET = {"endpoints": [{"fromCidr": "10.9.0.0/16"}]}
ROOT_A, ROOT_B, ROOT_X = (pki.make_ca(f"root {n}").cert_pem for n in "ABX")
DIGEST = {pem: artifacts.pem_digest(pem) for pem in (ROOT_A, ROOT_B, ROOT_X)}


def ca(pem: str) -> tuple[str, str]:
    return pem, DIGEST[pem]


def net(name: str, peer: str = "b") -> NetworkSpec:
    return NetworkSpec(name, (f"id-{peer}", peer), (Gateway("192.0.2.1", 15443),))


def configmap(mesh: dict[str, Any], networks: dict[str, Any] | None = None, **ann: Any) -> Any:
    data = {"mesh": yaml.safe_dump(mesh)}
    if networks is not None:
        data["meshNetworks"] = yaml.safe_dump({"networks": networks})
    annotations = {k: json.dumps(v) for k, v in ann.items()}
    return {"metadata": {"name": "istio", "annotations": annotations}, "data": data}


FRESH = configmap({"trustDomain": DOMAIN, "caCertificates": [FOREIGN_CA]}, {"net-f": FOREIGN_NET})


def apply(cm: Any, result: MeshUpdate | None) -> Any:
    out = copy.deepcopy(cm)
    if result is not None:
        out["data"], out["metadata"]["annotations"] = result.data, result.annotations
    return out


def view(cm: Any) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(caCertificates, networks, ownership annotations decoded) of a ConfigMap."""
    mesh = yaml.safe_load(cm["data"]["mesh"])
    nets = yaml.safe_load(cm["data"].get("meshNetworks") or "{}") or {}
    ann = {
        k.removeprefix("apiproxy.io/"): json.loads(v)
        for k, v in cm["metadata"]["annotations"].items()
    }
    return mesh.get("caCertificates", []), nets.get("networks", {}), ann


WITH_B = apply(FRESH, update(FRESH, [MeshPeer("b", ca(ROOT_A), net("net-b"))], DOMAIN))
LEGACY_B = configmap(  # written before the per-peer owner annotations existed
    {"caCertificates": [FOREIGN_CA, {"pem": ROOT_A, "trustDomains": [DOMAIN]}]},
    {"net-f": FOREIGN_NET, "net-b": artifacts.network_entry(net("net-b"))},
    **{
        "apiproxy.io/owned-ca-certificates": [DIGEST[ROOT_A]],
        "apiproxy.io/owned-mesh-networks": ["net-b"],
    },
)
A_ENTRY = {"pem": ROOT_A, "trustDomains": [DOMAIN]}
B_ENTRY = {"pem": ROOT_B, "trustDomains": [DOMAIN]}
B_NET = artifacts.network_entry(net("net-b"))


# (id, ConfigMap, peers, expected (caCertificates, networks, annotations); None: no update)
CASES: list[tuple[str, Any, list[MeshPeer], Any]] = [
    (
        "first write: foreign entries kept, ours recorded with their owner",
        FRESH,
        [MeshPeer("b", ca(ROOT_A), net("net-b"))],
        (
            [FOREIGN_CA, A_ENTRY],
            {"net-f": FOREIGN_NET, "net-b": B_NET},
            {
                "owned-ca-certificates": [DIGEST[ROOT_A]],
                "owned-mesh-networks": ["net-b"],
                "ca-certificate-owners": {"b": DIGEST[ROOT_A]},
                "mesh-network-owners": {"b": "net-b"},
            },
        ),
    ),
    ("the same again: nothing to write", WITH_B, [MeshPeer("b", ca(ROOT_A), net("net-b"))], None),
    ("a peer on hold keeps its entries", WITH_B, [MeshPeer("b", None, None)], None),
    (
        "a deleted peer's entries go, foreign ones stay",
        WITH_B,
        [],
        (
            [FOREIGN_CA],
            {"net-f": FOREIGN_NET},
            {
                "owned-ca-certificates": [],
                "owned-mesh-networks": [],
                "ca-certificate-owners": {},
                "mesh-network-owners": {},
            },
        ),
    ),
    (
        "a rotated root replaces the peer's old one",
        WITH_B,
        [MeshPeer("b", ca(ROOT_B), net("net-b"))],
        (
            [FOREIGN_CA, B_ENTRY],
            {"net-f": FOREIGN_NET, "net-b": B_NET},
            {
                "owned-ca-certificates": [DIGEST[ROOT_B]],
                "owned-mesh-networks": ["net-b"],
                "ca-certificate-owners": {"b": DIGEST[ROOT_B]},
                "mesh-network-owners": {"b": "net-b"},
            },
        ),
    ),
    (
        "enableIngressGateway false removes the network, keeps the root",
        WITH_B,
        [MeshPeer("b", ca(ROOT_A), net("net-b"), gateways=False)],
        (
            [FOREIGN_CA, A_ENTRY],
            {"net-f": FOREIGN_NET},
            {
                "owned-ca-certificates": [DIGEST[ROOT_A]],
                "owned-mesh-networks": [],
                "ca-certificate-owners": {"b": DIGEST[ROOT_A]},
                "mesh-network-owners": {},
            },
        ),
    ),
    (
        "a peer on hold keeps only its own entries when another is deleted",
        apply(
            WITH_B,
            update(
                WITH_B,
                [
                    MeshPeer("b", ca(ROOT_A), net("net-b")),
                    MeshPeer("c", ca(ROOT_B), net("net-c", "c")),
                ],
                DOMAIN,
            ),
        ),
        [MeshPeer("b", None, None)],
        (
            [FOREIGN_CA, A_ENTRY],
            {"net-f": FOREIGN_NET, "net-b": B_NET},
            {
                "owned-ca-certificates": [DIGEST[ROOT_A]],
                "owned-mesh-networks": ["net-b"],
                "ca-certificate-owners": {"b": DIGEST[ROOT_A]},
                "mesh-network-owners": {"b": "net-b"},
            },
        ),
    ),
    (
        "a foreign root equal to the peer's is trusted already, not taken over",
        configmap({"caCertificates": [{"pem": ROOT_A}]}),
        [MeshPeer("b", ca(ROOT_A), None)],
        None,
    ),
    (
        "a foreign network of the same name is not taken over",
        configmap({}, {"net-b": FOREIGN_NET}),
        [MeshPeer("b", None, net("net-b"))],
        None,
    ),
    (
        "legacy: unattributed roots all stay while a peer is on hold",
        LEGACY_B,
        [MeshPeer("b", None, None), MeshPeer("c", ca(ROOT_X), None)],
        (
            [FOREIGN_CA, A_ENTRY, {"pem": ROOT_X, "trustDomains": [DOMAIN]}],
            {"net-f": FOREIGN_NET, "net-b": B_NET},
            {
                "owned-ca-certificates": sorted([DIGEST[ROOT_A], DIGEST[ROOT_X]]),
                "owned-mesh-networks": ["net-b"],
                "mesh-network-owners": {"b": "net-b"},  # from fromRegistry: b
            },
        ),
    ),
]


@pytest.mark.parametrize(
    ("cm", "peers", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_update(cm: Any, peers: list[MeshPeer], expected: Any) -> None:
    before = copy.deepcopy(cm)
    result = update(cm, peers, DOMAIN)
    assert cm == before  # pure: the input is not modified
    if expected is None:
        assert result is None
        return
    assert result is not None
    after = apply(cm, result)
    assert view(after) == expected
    assert update(after, peers, DOMAIN) is None  # and applying it again changes nothing


def test_other_data_and_annotations_are_kept() -> None:
    cm = copy.deepcopy(FRESH)
    cm["data"]["values.yaml"] = "x: 1\n"
    cm["metadata"]["annotations"]["team"] = "mesh"
    result = update(cm, [MeshPeer("b", ca(ROOT_A), None)], DOMAIN)
    assert result is not None
    assert result.data["values.yaml"] == "x: 1\n"
    assert result.annotations["team"] == "mesh"
    assert "meshNetworks" in result.data  # untouched text, as found
    assert result.data["meshNetworks"] == cm["data"]["meshNetworks"]
    assert (result.peers, result.networks) == (["b"], [])


def test_no_mesh_networks_key_is_added_for_nothing() -> None:
    cm = configmap({"trustDomain": DOMAIN})
    result = update(cm, [MeshPeer("b", ca(ROOT_A), None)], DOMAIN)
    assert result is not None
    assert "meshNetworks" not in result.data


@pytest.mark.parametrize("mesh_text", ["a: [", "- just\n- a list\n"])
def test_unreadable_mesh_is_an_error_not_an_overwrite(mesh_text: str) -> None:
    cm = {"metadata": {"annotations": {}}, "data": {"mesh": mesh_text}}
    with pytest.raises(MeshConfigError):
        update(cm, [MeshPeer("b", ca(ROOT_A), None)], DOMAIN)


def test_owners_attributes_legacy_networks_by_registry() -> None:
    # both registries of the entry (cluster ID, IMC name) map to it; only IMC names are looked up
    assert owners(LEGACY_B) == (None, {"id-b": "net-b", "b": "net-b"})
    assert owners(None) == (None, {})
