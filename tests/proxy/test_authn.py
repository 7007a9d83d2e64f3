"""`authn.authenticate` to the letter: what an identity records, what a refusal carries, and the
exact edges of a certificate's validity. Each test kills mutants scripts/mutate found surviving."""

from __future__ import annotations

import pytest

from apiproxy import pki, tokens
from apiproxy.authn import AuthnFailure, Identity, authenticate, bearer_token
from apiproxy.peers import PeerSet, parse
from tests.proxy.conftest import OWN_UUID, UUID_A, World


@pytest.fixture
def ps(world: World) -> PeerSet:
    return parse(world.peers_yaml(), "src")


def fail(ps: PeerSet, cert: pki.KeyPair | None, auth: str | None, **kw: float) -> AuthnFailure:
    with pytest.raises(AuthnFailure) as info:
        authenticate(
            ps,
            certificate=cert.cert if cert else None,
            authorization=auth,
            cluster_uuid=OWN_UUID,
            **kw,
        )
    assert str(info.value) == info.value.reason
    return info.value


def test_what_an_identity_records(ps: PeerSet, world: World) -> None:
    token = f"Bearer {world.token_a()}"
    both = authenticate(
        ps, certificate=world.client_a.cert, authorization=token, cluster_uuid=OWN_UUID
    )
    assert both.extra() == {
        "apiproxy.io/authenticated-by": ["mtls", "jwt"],
        "apiproxy.io/cluster-uuid": [UUID_A],
        "apiproxy.io/certificate-subject": ["CN=istiod"],
        "apiproxy.io/token-subject": [UUID_A],
    }
    jwt_only = authenticate(ps, certificate=None, authorization=token, cluster_uuid=OWN_UUID)
    assert (jwt_only.cert_subject, jwt_only.methods) == (None, ("jwt",))
    assert jwt_only.extra() == {
        "apiproxy.io/authenticated-by": ["jwt"],
        "apiproxy.io/cluster-uuid": [UUID_A],
        "apiproxy.io/token-subject": [UUID_A],
    }
    cert_only = authenticate(
        ps, certificate=world.client_a.cert, authorization=None, cluster_uuid=OWN_UUID
    )
    assert (cert_only.token_subject, cert_only.methods) == (None, ("mtls",))
    assert cert_only.extra() == {
        "apiproxy.io/authenticated-by": ["mtls"],
        "apiproxy.io/cluster-uuid": [UUID_A],
        "apiproxy.io/certificate-subject": ["CN=istiod"],
    }
    assert Identity(peer=ps.peers[1], methods=("jwt",)).extra()["apiproxy.io/cluster-uuid"] == [
        ps.peers[1].cluster_uuid
    ]


def test_refusals_carry_the_certificate_subject(ps: PeerSet, world: World) -> None:
    subject = "CN=istiod"
    cases = [
        (world.client_unknown, None, {}, "certificate_unknown_peer"),
        (world.client_a, None, {"now": 4_000_000_000.0}, "certificate_expired"),
        (world.client_a, "Bearer " + world.token_a(scope="x"), {}, "token_wrong_scope"),
        (world.client_a, f"Bearer {world.token_b()}", {}, "certificate_token_peer_mismatch"),
    ]
    for cert, auth, kw, reason in cases:
        failure = fail(ps, cert, auth, **kw)
        assert (failure.reason, failure.cert_subject) == (reason, subject)
    twins = parse(
        "peers:\n"
        + "".join(
            f"  - name: {n}\n    clusterUUID: {u}\n    clientCA: |\n"
            + "".join(f"      {ln}\n" for ln in world.ca_a.cert_pem.strip().splitlines())
            for n, u in (("a", UUID_A), ("b", "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"))
        ),
        "src",
    )
    failure = fail(twins, world.client_a, None)
    assert (failure.reason, failure.cert_subject) == ("certificate_ambiguous_peer", subject)
    # Without a certificate there is no subject to report.
    failure = fail(ps, None, "Bearer " + world.token_a(scope="x"))
    assert (failure.reason, failure.cert_subject) == ("token_wrong_scope", None)
    assert fail(ps, None, None).cert_subject is None


def test_certificate_validity_edges_are_inclusive(ps: PeerSet, world: World) -> None:
    cert = world.client_a.cert
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    for now in (start, end):
        ident = authenticate(
            ps, certificate=cert, authorization=None, cluster_uuid=OWN_UUID, now=now
        )
        assert ident.peer.name == "cluster-a"
    for now in (start - 1, end + 1):
        assert fail(ps, world.client_a, None, now=now).reason == "certificate_expired"


def test_the_token_is_judged_at_the_given_time(ps: PeerSet, world: World) -> None:
    token = tokens.mint(
        world.key_a, subject=UUID_A, audience=OWN_UUID, scope="api", ttl_seconds=60, now=1000
    )
    ident = authenticate(
        ps, certificate=None, authorization=f"Bearer {token}", cluster_uuid=OWN_UUID, now=1010
    )
    assert ident.token_subject == UUID_A
    assert fail(ps, None, f"Bearer {token}").reason == "token_expired"  # now, it is long gone


@pytest.mark.parametrize(
    ("header", "result"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("Basic abc", "unsupported_authorization_scheme"),
        ("Bearer", "malformed_authorization_header"),
        ("Bearer a b", "malformed_authorization_header"),
    ],
)
def test_bearer_token(header: str | None, result: str | None) -> None:
    if result is None or not result.endswith(("scheme", "header")):
        assert bearer_token(header) == result
        return
    with pytest.raises(AuthnFailure) as info:
        bearer_token(header)
    assert (info.value.reason, str(info.value)) == (result, result)
