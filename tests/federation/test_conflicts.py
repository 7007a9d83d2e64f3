"""Identity collisions between peers: two peers (or a peer and this cluster) claiming one network
name, cluster ID or cluster UUID. The peer already holding it keeps it (else the older object);
the other is refused, keeps whatever artifacts it had and gets no new ones; deleting either never
removes the other's artifacts. Three simulated clusters; B's private document is crafted by a
FakePeer in front of its real exporter."""

from __future__ import annotations

import base64

import yaml

from apiproxy import peers as peers_mod
from apiproxy.federation.controller import PRIVATE, PUBLIC


def _snapshot(a, name: str):
    secret = a.get("secrets", f"istio-remote-secret-{name}", "istio-system")
    return (secret or {}).get("data")


def _peers(a) -> peers_mod.PeerSet:
    ps = a.get("secrets", "apiproxy-peers", "apiproxy-system")
    # The api-proxy's own loader: it refuses duplicate UUIDs, so this is what serve would see.
    return peers_mod.parse(base64.b64decode(ps["data"]["peers.yaml"]).decode())


def _refusals(fa, peer: str, reason: str) -> float:
    value = fa.metrics_registry.get_sample_value(
        "apiproxy_federation_peer_refusals_total", {"peer": peer, "reason": reason}
    )
    return value or 0.0


def _events(a, name: str, reason: str) -> list[dict]:
    return [
        e
        for e in a.store.list("events", namespace="default")
        if e["involvedObject"]["name"] == name and e["reason"] == reason
    ]


async def test_colliding_identities_are_refused_and_nothing_is_lost(three, test_ca):
    a, b, c, fa, fb, fc, fake = three
    net_b, net_c = fb.identity.network, fc.identity.network
    good_b, good_c = _snapshot(a, "b"), _snapshot(a, "c")
    good_mesh = a.mesh()
    assert set(good_mesh[1]["networks"]) >= {net_b, net_c}

    cases = [
        # (override, reason, who is named)
        ({"networkName": net_c}, "NetworkNameConflict", 'IstioMulticluster "c"'),
        ({"networkName": fa.identity.network}, "NetworkNameConflict", "this cluster's own"),
        ({"clusterID": fc.identity.cluster_id}, "ClusterIDConflict", 'IstioMulticluster "c"'),
        ({"clusterID": fa.identity.cluster_id}, "ClusterIDConflict", "this cluster's own"),
    ]
    for override, reason, other in cases:
        fake.private_overrides = override
        before = _refusals(fa, "b", reason)
        report = await fa.reconcile()
        cond = a.condition("b", PRIVATE)
        assert (cond["status"], cond["reason"]) == ("False", reason), override
        assert other in cond["message"]
        # "b" was created first, but "c" already holds the identity: "c" keeps it.
        assert report.conditions["c"][PRIVATE]["status"] == "True"
        # Nothing of either peer changed: remote secrets, peers file, mesh trust, networks.
        assert _snapshot(a, "b") == good_b, override
        assert _snapshot(a, "c") == good_c, override
        assert a.mesh() == good_mesh, override
        assert {p.name for p in _peers(a).peers} == {"b", "c"}
        assert _refusals(fa, "b", reason) >= before + 1  # background passes count too
        assert not any(w.endswith("istio-remote-secret-b") for w in report.writes)
    assert _events(a, "b", "NetworkNameConflict")
    assert _events(a, "b", "ClusterIDConflict")

    # The peer comes back to its own identity: accepted again, nothing was lost meanwhile.
    fake.private_overrides = {}
    await fa.reconcile()
    assert a.condition("b", PRIVATE)["status"] == "True"
    assert (_snapshot(a, "b"), _snapshot(a, "c"), a.mesh()) == (good_b, good_c, good_mesh)

    # A second object for C's cluster: same UUID, cluster ID and network as "c", which holds
    # them. Refused; the peers file keeps one entry per UUID (the proxy would refuse it all).
    a.create_imc("d", fc.exporter_url, test_ca.cert_pem)
    await fa.reconcile()
    cond_d = a.condition("d", PRIVATE)
    assert cond_d["status"] == "False"
    assert cond_d["reason"] == "ClusterIDConflict"
    assert 'IstioMulticluster "c"' in cond_d["message"]
    assert a.condition("d", PUBLIC)["status"] == "True"
    assert a.get("secrets", "istio-remote-secret-d", "istio-system") is None
    assert sorted(p.name for p in _peers(a).peers) == ["b", "c"]
    assert a.mesh() == good_mesh
    assert fa.registry.names() == ["b", "c"]

    # B claims C's network; then "c" is deleted. Its artifacts go, B's stay. In that pass
    # nobody held C's network any more for "b" and "d": the older object "b" wins it.
    fake.private_overrides = {"networkName": net_c}
    await fa.reconcile()
    assert a.condition("b", PRIVATE)["reason"] == "NetworkNameConflict"
    a.store.delete("istiomulticlusters.deckhouse.io", "c")
    await fa.reconcile()
    await fa.reconcile()
    assert a.imc("c") is None
    assert a.get("secrets", "istio-remote-secret-c", "istio-system") is None
    assert a.condition("b", PRIVATE)["status"] == "True"
    cond_d = a.condition("d", PRIVATE)
    assert cond_d["reason"] == "NetworkNameConflict"
    assert 'IstioMulticluster "b"' in cond_d["message"]
    networks = a.mesh()[1]["networks"]
    assert net_b not in networks  # B moved to its new network name
    assert networks[net_c]["endpoints"][1] == {"fromRegistry": "b"}
    assert networks[net_c]["gateways"] == good_mesh[1]["networks"][net_b]["gateways"]
    assert _snapshot(a, "b") == good_b  # same cluster ID, credentials reused
    assert [(p.name, p.cluster_uuid) for p in _peers(a).peers] == [("b", b.uuid)]
    assert c.uuid not in {p.cluster_uuid for p in _peers(a).peers}
    owners = a.get("configmaps", "istio", "istio-system")["metadata"]["annotations"]
    assert yaml.safe_load(owners["apiproxy.io/mesh-network-owners"]) == {"b": net_c}
