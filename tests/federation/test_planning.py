"""`planning.plan`: who keeps a contested cluster UUID, cluster ID or network name. Pure: a table
of peers and existing artifacts in, plans and refusals out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from apiproxy.federation.artifacts import PeerEntry
from apiproxy.federation.identity import cluster_id
from apiproxy.federation.metadata import PrivateMetadata, PublicMetadata
from apiproxy.federation.planning import (
    ID_CONFLICT,
    NETWORK_CONFLICT,
    UUID_CONFLICT,
    Existing,
    Peer,
    peer_cluster_id,
    plan,
)


@dataclass(frozen=True)
class Local:
    cluster_uuid: str = "0000-local"
    cluster_id: str = "cluster-local-1"
    network: str = "net-local"
    cluster_domain: str = "cluster.local"


LOCAL = Local()
DAY1, DAY2, DAY3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


def peer(
    name: str,
    created: str = DAY1,
    *,
    uuid: str | None = None,
    cid: str | None = None,
    net: str | None = None,
    gateways: bool = True,
    cached: bool = True,
) -> Peer:
    """A peer with usable cached documents (unique identities unless given), or on hold."""
    if not cached:
        return Peer(name, created, None, None, gateways)
    uuid = uuid or f"uuid-{name}"
    pub = PublicMetadata(cluster_uuid=uuid, authn_key_pub="k", root_ca="r")
    priv = PrivateMetadata(
        network_name=net or f"net-{name}",
        api_host=f"{name}.example:4443",
        ingress_gateways=(),
        cluster_uuid=uuid,
        cluster_id=cid or f"id-{name}",
    )
    return Peer(name, created, pub, priv, gateways)


def entry(name: str, uuid: str) -> PeerEntry:
    return PeerEntry(name, uuid, "k", None)


# (id, peers, existing, refusals as {(peer, kind, who has it)}, peers planned without documents)
CASES = [
    ("distinct identities", [peer("b"), peer("c")], Existing(), set(), set()),
    (
        "uuid: the oldest object wins",
        [peer("c", DAY2, uuid="U"), peer("b", DAY1, uuid="U")],
        Existing(),
        {("c", UUID_CONFLICT, 'already used by IstioMulticluster "b"')},
        {"c"},
    ),
    (
        "uuid: same age, the name decides",
        [peer("c", DAY1, uuid="U"), peer("b", DAY1, uuid="U")],
        Existing(),
        {("c", UUID_CONFLICT, 'already used by IstioMulticluster "b"')},
        {"c"},
    ),
    (
        "uuid: the incumbent wins over an older object",
        [peer("b", DAY1, uuid="U"), peer("c", DAY2, uuid="U")],
        Existing(peer_entries={"c": entry("c", "U")}),
        {("b", UUID_CONFLICT, 'already used by IstioMulticluster "c"')},
        {"b"},
    ),
    (
        "uuid: this cluster's own is nobody's",
        [peer("b", uuid=LOCAL.cluster_uuid)],
        Existing(),
        {("b", UUID_CONFLICT, "this cluster's own")},
        {"b"},
    ),
    (
        "cluster id: the incumbent holds it in its remote secret",
        [peer("b", DAY1, cid="C"), peer("c", DAY2, cid="C")],
        Existing(secret_ids={"c": {"C"}}),
        {("b", ID_CONFLICT, 'already used by IstioMulticluster "c"')},
        {"b"},
    ),
    (
        "cluster id: registered by a secret we do not manage",
        [peer("b", cid="C")],
        Existing(foreign_ids={"C": "istio-remote-secret-manual"}),
        {
            (
                "b",
                ID_CONFLICT,
                "registered by secret istio-remote-secret-manual (not managed by apiproxy)",
            )
        },
        {"b"},
    ),
    (
        "cluster id: this cluster's own",
        [peer("b", cid=LOCAL.cluster_id)],
        Existing(),
        {("b", ID_CONFLICT, "this cluster's own")},
        {"b"},
    ),
    (
        "network: the oldest object wins",
        [peer("b", DAY2, net="N"), peer("c", DAY1, net="N")],
        Existing(),
        {("b", NETWORK_CONFLICT, 'already used by IstioMulticluster "c"')},
        {"b"},
    ),
    (
        "network: the incumbent wins",
        [peer("b", DAY1, net="N"), peer("c", DAY2, net="N")],
        Existing(net_owners={"c": "N"}),
        {("b", NETWORK_CONFLICT, 'already used by IstioMulticluster "c"')},
        {"b"},
    ),
    (
        "network: this cluster's own",
        [peer("b", net=LOCAL.network)],
        Existing(),
        {("b", NETWORK_CONFLICT, "this cluster's own")},
        {"b"},
    ),
    (
        "network: a peer without gateways claims none",
        [peer("b", DAY1, net="N"), peer("c", DAY2, net="N", gateways=False)],
        Existing(),
        set(),
        set(),
    ),
    (
        "a peer on hold keeps the uuid its peers entry holds",
        [peer("b", DAY2, cached=False), peer("c", DAY1, uuid="U")],
        Existing(peer_entries={"b": entry("b", "U")}),
        {("c", UUID_CONFLICT, 'already used by IstioMulticluster "b"')},
        {"b", "c"},
    ),
    (
        "a peer on hold keeps its remote secret's cluster id and its network",
        [peer("b", DAY2, cached=False), peer("c", DAY1, cid="C"), peer("d", DAY1, net="N")],
        Existing(secret_ids={"b": {"C"}}, net_owners={"b": "N"}),
        {
            ("c", ID_CONFLICT, 'already used by IstioMulticluster "b"'),
            ("d", NETWORK_CONFLICT, 'already used by IstioMulticluster "b"'),
        },
        {"b", "c", "d"},
    ),
    (
        "one refusal per peer and pass",
        [peer("b", DAY1, uuid="U"), peer("c", DAY2, uuid="U", net="N"), peer("d", DAY1, net="N")],
        Existing(),
        {("c", UUID_CONFLICT, 'already used by IstioMulticluster "b"')},
        {"c"},
    ),
    (
        "three claimants: one winner, two refused",
        [peer("b", DAY3, net="N"), peer("c", DAY1, net="N"), peer("d", DAY2, net="N")],
        Existing(),
        {
            ("b", NETWORK_CONFLICT, 'already used by IstioMulticluster "c"'),
            ("d", NETWORK_CONFLICT, 'already used by IstioMulticluster "c"'),
        },
        {"b", "d"},
    ),
]


@pytest.mark.parametrize(
    ("peers", "existing", "refused", "held"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(
    peers: list[Peer],
    existing: Existing,
    refused: set[tuple[str, str, str]],
    held: set[str],
) -> None:
    plans, refusals = plan(peers, existing, LOCAL)
    assert {(r.peer, r.kind, r.other) for r in refusals} == refused
    assert len(refusals) == len(refused)
    assert {name for name, p in plans.items() if p.pub is None} == held
    for p in peers:
        got = plans[p.name]
        kinds = [r.kind for r in refusals if r.peer == p.name]
        assert got.refused == (kinds[0] if kinds else "")
        if p.name not in held:
            assert (got.pub, got.priv) == (p.pub, p.priv)
        else:
            assert got.priv is None


def test_a_peer_without_a_public_document_gets_no_private_one() -> None:
    p = peer("b")
    plans, _ = plan([Peer("b", DAY1, None, p.priv)], Existing(), LOCAL)
    assert (plans["b"].pub, plans["b"].priv) == (None, None)


def test_refusal_message_names_what_and_who() -> None:
    _, refusals = plan([peer("b", net=LOCAL.network)], Existing(), LOCAL)
    assert refusals[0].message.startswith("network name net-local is this cluster's own; refused")


def test_an_old_peer_without_a_cluster_id_gets_ours_from_its_uuid() -> None:
    p = peer("b", uuid="1234")
    assert p.pub is not None
    assert p.priv is not None
    old = PrivateMetadata(p.priv.network_name, p.priv.api_host, ())
    assert peer_cluster_id(p.pub, old, "corp.local") == cluster_id("corp.local", "1234")
    assert peer_cluster_id(p.pub, p.priv, "corp.local") == "id-b"
    # ... and that computed ID collides like a published one
    same = Peer("c", DAY2, PublicMetadata("5678", "k", "r"), old)
    local = Local(cluster_id=cluster_id("cluster.local", "5678"))
    _, refusals = plan([same], Existing(), local)
    assert [(r.peer, r.kind) for r in refusals] == [("c", ID_CONFLICT)]
