"""Units of the proxy area: peers file, authentication rules, event counting, file watching."""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from apiproxy import pki, tokens
from apiproxy.authn import AuthnFailure, authenticate
from apiproxy.forward import (
    EventCounter,
    downstream_response_headers,
    is_upgrade,
    upstream_request_headers,
)
from apiproxy.peers import Peer, PeersError, PeerSet, parse
from apiproxy.reload import FileWatcher
from tests.proxy.conftest import OWN_UUID, UUID_A, UUID_B, World


def peers_text(*items: str) -> str:
    return "peers:\n" + "".join(items)


def item(name: str, uid: str, ca: str | None = None, key: str | None = None) -> str:
    out = f"  - name: {name}\n    clusterUUID: {uid}\n"
    if ca is not None:
        out += "    clientCA: |\n" + "".join(f"      {ln}\n" for ln in ca.strip().splitlines())
    if key is not None:
        out += "    jwtPublicKey: |\n" + "".join(f"      {ln}\n" for ln in key.strip().splitlines())
    return out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("peers: {}\n", "src: peers: must be a list"),
        ("nodes: []\n", "src: top level: must be a mapping with exactly one key, 'peers'"),
        ("peers: [\n", "src: line 2 column 1: not valid YAML"),
        (
            peers_text(item("a", UUID_A, ca="CA")),
            "src: peers[0].clientCA: must be a PEM bundle of CA certificates",
        ),
        (peers_text(item("a", UUID_A)), "src: peers[0]: needs clientCA, jwtPublicKey or both"),
        (
            peers_text(item("A_b", UUID_A, key="x")),
            "src: peers[0].name: must be a lowercase DNS-1123 name",
        ),
        (peers_text(item("a", "not-a-uuid", key="x")), "'not-a-uuid' is not a UUID"),
        (
            peers_text(item("a", OWN_UUID, key="x")),
            "src: peers[0].clusterUUID: is this proxy's own --cluster-uuid",
        ),
        (
            peers_text(
                "  - name: a\n    clusterUUID: " + UUID_A + "\n    clientCAs: x\n",
            ),
            "unknown field 'clientCAs'",
        ),
        (
            peers_text(item("a", UUID_A, key="-----BEGIN PUBLIC KEY-----\nAAAA\n")),
            "src: peers[0].jwtPublicKey: bad_key",
        ),
    ],
)
def test_invalid_peers_files_are_refused_precisely(text: str, message: str) -> None:
    with pytest.raises(PeersError) as info:
        parse(text, "src", own_cluster_uuid=OWN_UUID)
    assert message in str(info.value)


def test_duplicate_names_uuids_and_non_ca_certificates(world: World) -> None:
    key = tokens.public_key_pem(world.key_a)
    with pytest.raises(PeersError, match=r"peers\[1\]\.name: duplicates peers\[0\]\.name 'a'"):
        parse(peers_text(item("a", UUID_A, key=key), item("a", UUID_B, key=key)), "src")
    with pytest.raises(PeersError, match=r"peers\[1\]\.clusterUUID: duplicates peers\[0\]"):
        parse(peers_text(item("a", UUID_A, key=key), item("b", UUID_A, key=key)), "src")
    with pytest.raises(PeersError, match=r"clientCA\[0\]: certificate .* is not a CA"):
        parse(peers_text(item("a", UUID_A, ca=world.client_a.cert_pem)), "src")


def test_valid_peers_file(world: World) -> None:
    ps = parse(world.peers_yaml(), "src", own_cluster_uuid=OWN_UUID)
    assert [p.name for p in ps.peers] == ["cluster-a", "cluster-b"]
    assert ps.key_for_subject(UUID_A) is not None
    assert ps.key_for_subject(OWN_UUID) is None
    assert ps.peers_for_certificate(world.client_a.cert) == [ps.peers[0]]
    assert ps.peers_for_certificate(world.client_unknown.cert) == []
    assert ps.warnings == ()


def test_same_trust_domain_certificate_names_only_the_issuing_peer(world: World) -> None:
    ps = parse(world.peers_yaml(), "src")
    # Same subject and SPIFFE URI; only the anchor differs.
    assert world.client_a.cert.subject == world.client_b.cert.subject
    ident = authenticate(
        ps, certificate=world.client_b.cert, authorization=None, cluster_uuid=OWN_UUID
    )
    assert ident.peer.name == "cluster-b"
    assert ident.methods == ("mtls",)


def test_a_ca_shared_by_two_peers_is_ambiguous_and_warned(world: World) -> None:
    text = peers_text(
        item("a", UUID_A, ca=world.ca_a.cert_pem), item("b", UUID_B, ca=world.ca_a.cert_pem)
    )
    ps = parse(text, "src")
    assert any("share the CA" in w for w in ps.warnings)
    with pytest.raises(AuthnFailure) as info:
        authenticate(ps, certificate=world.client_a.cert, authorization=None, cluster_uuid=OWN_UUID)
    assert info.value.reason == "certificate_ambiguous_peer"


def test_authentication_rules(world: World) -> None:
    ps = parse(world.peers_yaml(), "src")

    def reason(cert: pki.KeyPair | None, auth: str | None, now: float | None = None) -> str:
        with pytest.raises(AuthnFailure) as info:
            authenticate(
                ps,
                certificate=cert.cert if cert else None,
                authorization=auth,
                cluster_uuid=OWN_UUID,
                now=now,
            )
        return info.value.reason

    assert reason(None, None) == "no_credentials"
    assert reason(world.client_a, f"Bearer {world.token_b()}") == "certificate_token_peer_mismatch"
    # a bad token fails even with a good certificate
    assert reason(world.client_a, "Bearer " + world.token_a(scope="x")) == "token_wrong_scope"
    assert reason(None, "Bearer ") == "malformed_authorization_header"
    assert reason(None, "Bearer a b") == "malformed_authorization_header"
    assert reason(world.client_unknown, None) == "certificate_unknown_peer"
    # certificate validity is checked per request (keep-alive connections outlive certificates)
    assert reason(world.client_a, None, now=4_000_000_000) == "certificate_expired"
    ok = authenticate(
        ps,
        certificate=world.client_a.cert,
        authorization=f"Bearer {world.token_a()}",
        cluster_uuid=OWN_UUID,
    )
    assert ok.methods == ("mtls", "jwt")
    assert ok.extra()["apiproxy.io/token-subject"] == [UUID_A]


def test_request_headers_allowlist_and_upgrade_detection() -> None:
    from multidict import CIMultiDict

    incoming = CIMultiDict(
        [
            ("Accept", "application/json"),
            ("Authorization", "Bearer x"),
            ("Impersonate-Extra-Scopes", "y"),
            ("X-Forwarded-Host", "h"),
            ("Te", "trailers"),
            ("If-None-Match", '"1"'),
            ("Connection", "If-None-Match"),
        ]
    )
    assert list(upstream_request_headers(incoming).items()) == [("Accept", "application/json")]
    assert is_upgrade(CIMultiDict([("Connection", "keep-alive, Upgrade")]))
    assert is_upgrade(CIMultiDict([("Upgrade", "websocket")]))
    assert not is_upgrade(CIMultiDict([("Connection", "keep-alive")]))
    out = downstream_response_headers(
        CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
                ("Audit-Id", "upstream-id"),
                ("X-Kubernetes-Pf-Flowschema-Uid", "u"),
            ]
        )
    )
    assert list(out.keys()) == ["Content-Type", "X-Kubernetes-Pf-Flowschema-Uid"]


def test_event_counter_json_and_protobuf_frames_across_chunk_splits() -> None:
    c = EventCounter("application/json")
    for chunk in (b'{"type":"ADDED"}\n{"ty', b'pe":"MODIFIED"}\n', b"\n"):
        c.feed(chunk)
    assert c.events == 3
    frames = b"".join(len(p).to_bytes(4, "big") + p for p in (b"a" * 5, b"", b"\n" * 300))
    for size in (1, 2, 3, 7, len(frames)):
        p = EventCounter("application/vnd.kubernetes.protobuf;stream=watch")
        for i in range(0, len(frames), size):
            p.feed(frames[i : i + size])
        assert p.events == 3, size
    # kube-apiserver 1.37 gzips WatchList streams: counted after inflating, split anywhere.
    events = b"".join(b'{"type":"ADDED","object":{"n":%d}}\n' % i for i in range(500))
    packed = gzip.compress(events)
    for size in (1, 3, 64, len(packed)):
        g = EventCounter("application/json", "gzip")
        for i in range(0, len(packed), size):
            g.feed(packed[i : i + size])
        assert g.events == 500, size
    zframes = gzip.compress(frames)
    gp = EventCounter("application/vnd.kubernetes.protobuf;stream=watch", "gzip")
    for i in range(0, len(zframes), 5):
        gp.feed(zframes[i : i + 5])
    assert gp.events == 3
    # One small chunk that inflates to far more than a step is counted whole, in steps.
    bomb = gzip.compress(b"\n" * (3 * EventCounter.INFLATE_STEP + 7))
    big = EventCounter("application/json", "gzip")
    big.feed(bomb)
    assert big.events == 3 * EventCounter.INFLATE_STEP + 7
    # Not gzip after all, or an encoding it cannot read: the count stops, nothing raises.
    bad = EventCounter("application/json", "gzip")
    bad.feed(b"not gzip\n\n")
    bad.feed(b"\n")
    assert (bad.events, bad.countable) == (0, False)
    br = EventCounter("application/json", "br")
    br.feed(b"\n\n")
    assert br.events == 0


async def test_file_watcher_follows_kubernetes_symlink_swaps(tmp_path: Path) -> None:
    # /etc/apiproxy/policy/policy.yaml -> ..data/policy.yaml, ..data -> ..2026_01_01_v1
    def publish(version: str, content: str) -> None:
        d = tmp_path / f"..{version}"
        d.mkdir()
        (d / "policy.yaml").write_text(content)
        link = tmp_path / "..data_tmp"
        link.symlink_to(d.name)
        os.replace(link, tmp_path / "..data")

    publish("v1", "one")
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    seen: list[str] = []
    results: list[tuple[str, bool]] = []

    def on_change() -> None:
        text = (tmp_path / "policy.yaml").read_text()
        if text == "bad":
            raise ValueError("bad content")
        seen.append(text)

    w = FileWatcher(interval=0, on_result=lambda n, ok, _e: results.append((n, ok)))
    w.add("policy", [str(tmp_path / "policy.yaml")], on_change)
    assert await w.check() == []  # unchanged
    publish("v2", "two")
    assert await w.check() == [("policy", True)]
    assert seen == ["two"]
    publish("v3", "two")  # new directory, same content: nothing to reload
    assert await w.check() == []
    publish("v4", "bad")
    assert await w.check() == [("policy", False)]
    assert await w.check() == []  # the same bad content is not retried every interval
    os.remove(tmp_path / "..data")  # vanished: keep the last good state
    assert await w.check() == []
    publish("v5", "three")
    assert await w.check() == [("policy", True)]
    assert seen == ["two", "three"]
    assert results == [("policy", True), ("policy", False), ("policy", True)]


async def test_file_watcher_polls_on_its_own(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("a")
    changed = asyncio.Event()
    w = FileWatcher(interval=0.01)
    w.add("token", [str(f)], changed.set)
    w.start()
    try:
        f.write_text("bb")
        await asyncio.wait_for(changed.wait(), 10)
    finally:
        await w.stop()


def test_cluster_uuids_are_compared_canonically(world: World) -> None:
    key = tokens.public_key_pem(world.key_a)
    own = "cccccccc-dddd-4eee-8fff-abcdefabcdef"  # letters, so case can differ
    # Our own UUID, written in another case, is still our own.
    with pytest.raises(PeersError, match=r"peers\[0\]\.clusterUUID: is this proxy's own"):
        parse(peers_text(item("a", own.upper(), key=key)), "src", own_cluster_uuid=own)
    with pytest.raises(PeersError, match=r"peers\[0\]\.clusterUUID: is this proxy's own"):
        parse(peers_text(item("a", own, key=key)), "src", own_cluster_uuid=own.upper())
    # AAAA… and aaaa… are one cluster: a duplicate.
    with pytest.raises(PeersError, match=r"peers\[1\]\.clusterUUID: duplicates peers\[0\]"):
        parse(peers_text(item("a", UUID_A.upper(), key=key), item("b", UUID_A, key=key)), "src")
    # Other spellings uuid.UUID would take are not canonical.
    for odd in ('"{' + UUID_A + '}"', UUID_A.replace("-", ""), "urn:uuid:" + UUID_A):
        with pytest.raises(PeersError, match="is not in canonical UUID form"):
            parse(peers_text(item("a", odd, key=key)), "src")
    # An upper-case entry is kept canonical; tokens name it, and us, in any case.
    ps = parse(peers_text(item("a", UUID_A.upper(), key=key)), "src", own_cluster_uuid=own)
    assert ps.peers[0].cluster_uuid == UUID_A
    assert ps.by_uuid(UUID_A.upper()) is ps.peers[0]
    assert ps.key_for_subject(UUID_A.upper()) is not None
    for sub, aud in ((UUID_A.upper(), own), (UUID_A, own.upper())):
        ident = authenticate(
            ps,
            certificate=None,
            authorization=f"Bearer {world.token_a(subject=sub, audience=aud)}",
            cluster_uuid=own,
        )
        assert ident.peer is ps.peers[0]
        assert ident.token_subject == UUID_A


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 (refused)
    ],
    ids=["p384", "rsa1024"],
)
def test_peers_file_refuses_weak_or_unsupported_jwt_keys(key: object) -> None:
    pem = tokens.public_key_pem(key)  # type: ignore[arg-type]
    with pytest.raises(PeersError, match=r"src: peers\[0\]\.jwtPublicKey: unsupported_key: "):
        parse(peers_text(item("a", UUID_A, key=pem)), "src")


def test_token_failure_reasons_through_authenticate(world: World) -> None:
    ps = parse(world.peers_yaml(), "src")
    now = int(time.time())

    def reason(claims: dict[str, object], key: object = None) -> str:
        token = jwt.encode(claims, key or world.key_a, algorithm="EdDSA")
        with pytest.raises(AuthnFailure) as info:
            authenticate(
                ps, certificate=None, authorization=f"Bearer {token}", cluster_uuid=OWN_UUID
            )
        return info.value.reason

    good = {"sub": UUID_A, "aud": OWN_UUID, "scope": "api", "iat": now, "exp": now + 60}
    assert reason({**good, "iat": now + 3600}) == "token_issued_in_future"
    assert reason({**good, "nbf": now + 3600}) == "token_not_yet_valid"
    assert reason({**good, "exp": "tomorrow"}) == "token_invalid"
    assert reason({**good, "iat": "now"}) == "token_invalid"
    assert reason({k: v for k, v in good.items() if k != "sub"}) == "token_missing_subject"
    assert reason({**good, "sub": 7}) == "token_missing_subject"
    assert reason({**good, "exp": now - 3600}) == "token_expired"
    # Within the leeway (30 s) each time check still passes.
    for claims in ({"iat": now + 20}, {"nbf": now + 20}, {"exp": now - 20}):
        token = jwt.encode({**good, **claims}, world.key_a, algorithm="EdDSA")
        ident = authenticate(
            ps, certificate=None, authorization=f"Bearer {token}", cluster_uuid=OWN_UUID
        )
        assert ident.peer.name == "cluster-a"
    # A peer set holding a key tokens cannot use (built in code: parse refuses it).
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    odd = PeerSet(peers=(Peer(name="odd", cluster_uuid=UUID_A, jwt_key=p384),))
    token = world.token_a()
    with pytest.raises(AuthnFailure) as info:
        authenticate(odd, certificate=None, authorization=f"Bearer {token}", cluster_uuid=OWN_UUID)
    assert info.value.reason == "token_unsupported_key"
