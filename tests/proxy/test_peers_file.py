"""The peers file and certificate-to-peer matching, to the letter: each test here kills mutants that
scripts/mutate found surviving in apiproxy/peers.py (docs/security-testing.md)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes

from apiproxy import peers, pki, tokens
from apiproxy.authn import AuthnFailure, authenticate
from apiproxy.peers import Peer, PeersError, PeerSet, parse, same_credentials
from tests.proxy.conftest import OWN_UUID, UUID_A, UUID_B, World
from tests.proxy.test_units import item, peers_text


def message_of(text: str, source: str | None = "src") -> str:
    args = () if source is None else (source,)
    with pytest.raises(PeersError) as info:
        parse(text, *args, own_cluster_uuid=OWN_UUID)
    return str(info.value)


def test_error_messages_name_the_file_the_entry_and_the_problem(world: World) -> None:
    key = tokens.public_key_pem(world.key_a)
    cases = [
        (
            peers_text(item("a", UUID_A, key=key)).replace(
                "    clusterUUID", "    extra: 1\n    clusterUUID"
            ),
            "src: peers[0]: unknown field 'extra'; allowed: "
            "clientCA, clusterUUID, jwtPublicKey, name",
        ),
        (
            peers_text(item("a", UUID_A, key=key), item("a", UUID_B, key=key)),
            "src: peers[1].name: duplicates peers[0].name 'a'",
        ),
        (
            peers_text(item("a", "not-a-uuid", key=key)),
            "src: peers[0].clusterUUID: 'not-a-uuid' is not a UUID",
        ),
        (
            peers_text(item("a", UUID_A.replace("-", ""), key=key)),
            f"src: peers[0].clusterUUID: '{UUID_A.replace('-', '')}' is not in canonical UUID form",
        ),
        (
            peers_text(item("a", UUID_A, key=key), item("b", UUID_A.upper(), key=key)),
            "src: peers[1].clusterUUID: duplicates peers[0].clusterUUID",
        ),
        (
            peers_text(item("a", UUID_A, ca=world.client_a.cert_pem)),
            "src: peers[0].clientCA[0]: certificate 'CN=istiod' is not a CA"
            " (basicConstraints CA:TRUE required)",
        ),
        (
            "peers:\n- name: a\n  clusterUUID: x\x07\n",  # a reader error: no line/column mark
            "src: document: not valid YAML",
        ),
    ]
    for text, message in cases:
        assert message_of(text) == message
    # Without a source name the messages say where it came from all the same.
    assert message_of("nodes: []\n", source=None).startswith("<string>: top level: ")


def test_load_reads_the_file_with_its_name_and_our_uuid(tmp_path: Path, world: World) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text(world.peers_yaml())
    ps = peers.load(path, own_cluster_uuid=OWN_UUID)
    assert ps.source == str(path)
    assert [p.name for p in ps.peers] == ["cluster-a", "cluster-b"]
    assert parse(world.peers_yaml(), "src").source == "src"
    with pytest.raises(PeersError) as info:
        peers.load(path, own_cluster_uuid=UUID_A)
    assert str(info.value) == f"{path}: peers[0].clusterUUID: is this proxy's own --cluster-uuid"
    path.write_text("peers: {}\n")
    with pytest.raises(PeersError) as info:
        peers.load(path)
    assert str(info.value) == f"{path}: peers: must be a list"


def bundle(*cas: pki.KeyPair) -> str:
    return "".join(ca.cert_pem for ca in cas)


def test_a_peer_with_several_anchors_is_matched_by_any_of_them(world: World) -> None:
    # Anchors of another name, then of the same name but another key, before the right one.
    twin = pki.make_ca("cluster-a client CA")
    assert twin.cert.subject == world.ca_a.cert.subject
    text = peers_text(item("a", UUID_A, ca=bundle(world.ca_b, twin, world.ca_a)))
    ps = parse(text, "src")
    assert ps.peers_for_certificate(world.client_a.cert) == [ps.peers[0]]
    assert ps.peers[0].issued(world.client_a.cert) is True
    assert ps.peers[0].issued(world.client_unknown.cert) is False


def test_certificate_matches_are_memoised_and_bounded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ps = parse(world.peers_yaml(), "src")
    calls: list[str] = []
    real = Peer.issued

    def counting(self: Peer, leaf: Any) -> bool:
        calls.append(self.name)
        return real(self, leaf)

    monkeypatch.setattr(Peer, "issued", counting)
    leaf = world.client_a.cert
    assert ps.peers_for_certificate(leaf) == [ps.peers[0]]
    assert calls == ["cluster-a", "cluster-b"]  # every peer is asked once
    assert ps.peers_for_certificate(leaf) == [ps.peers[0]]
    assert calls == ["cluster-a", "cluster-b"]  # then remembered
    fp = leaf.fingerprint(hashes.SHA256())
    assert ps._by_cert[fp] == [ps.peers[0]]
    # Bounded: a full memo (4,096 certificates) starts over.
    ps._by_cert.clear()
    ps._by_cert.update({i.to_bytes(4, "big"): [] for i in range(4096)})
    assert ps.peers_for_certificate(leaf) == [ps.peers[0]]
    assert list(ps._by_cert) == [fp]
    ps._by_cert.clear()
    ps._by_cert.update({i.to_bytes(4, "big"): [] for i in range(4095)})
    ps.peers_for_certificate(leaf)
    assert len(ps._by_cert) == 4096


def test_same_credentials(world: World) -> None:
    a1 = parse(world.peers_yaml(), "one").peers[0]
    a2 = parse(world.peers_yaml(with_b=False), "two").peers[0]
    assert a1 is not a2
    assert same_credentials(a1, a2) is True
    assert same_credentials(a1, None) is False
    assert same_credentials(None, a1) is False
    assert same_credentials(None, None) is False
    other_key = Peer(a1.name, a1.cluster_uuid, a1.client_ca, world.key_b.public_key())
    assert same_credentials(a1, other_key) is False
    no_key = Peer(a1.name, a1.cluster_uuid, a1.client_ca, None)
    assert same_credentials(no_key, Peer(a1.name, a1.cluster_uuid, a1.client_ca)) is True
    assert (
        same_credentials(a1, Peer(a1.name, a1.cluster_uuid, (world.ca_b.cert,), a1.jwt_key))
        is False
    )
    assert same_credentials(a1, Peer(a1.name, UUID_B, a1.client_ca, a1.jwt_key)) is False
    assert same_credentials(a1, Peer("renamed", a1.cluster_uuid, a1.client_ca, a1.jwt_key)) is False


def test_a_certificate_only_peer_has_no_token_key(world: World) -> None:
    ps = parse(peers_text(item("a", UUID_A, ca=world.ca_a.cert_pem)), "src")
    assert ps.peers[0].jwt_key is None
    assert ps.key_for_subject(UUID_A) is None
    with pytest.raises(AuthnFailure) as info:
        authenticate(
            ps,
            certificate=None,
            authorization=f"Bearer {world.token_a()}",
            cluster_uuid=OWN_UUID,
        )
    assert info.value.reason == "token_unknown_subject"


def test_an_expired_anchor_is_warned_about(world: World) -> None:
    old = pki.make_ca(
        "old CA",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=20),
        valid_for=dt.timedelta(days=10),
    )
    ps = parse(peers_text(item("a", UUID_A, ca=old.cert_pem)), "src")
    (warning,) = ps.warnings
    assert warning.startswith("peers[0].clientCA: CN=old CA expired ")
    assert parse(peers_text(item("a", UUID_A, ca=world.ca_a.cert_pem)), "src").warnings == ()


def test_peer_set_lookups(world: World) -> None:
    ps = PeerSet(peers=parse(world.peers_yaml(), "src").peers)
    assert ps.source == "<string>"
    assert ps.by_name("cluster-b") is ps.peers[1]
    assert ps.by_name("nobody") is None
    assert ps.by_uuid(UUID_B) is ps.peers[1]
    assert ps.by_uuid("not a uuid") is None
    assert ps.peers[0].username == "peer:cluster-a"
    assert ps.client_ca_pem() == world.ca_a.cert_pem + world.ca_b.cert_pem
