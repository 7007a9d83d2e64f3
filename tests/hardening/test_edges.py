"""Paths a mutation run found untested: the request body limit, the retry with a refreshed upstream
token after a 401, an upstream body cut short, authentication failures by reason, and two peers
whose CAs share one subject name. All through the real proxy over TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import jwt
import pytest

from apiproxy import pki
from tests.hardening.conftest import (
    OWN_UUID,
    UUID_A,
    HWorld,
    Stack,
    StackFactory,
    get,
    open_tls,
    parse_responses,
)
from tests.proxy.conftest import audit_records

WAIT = 10  # upper bound for awaited events; never slept


# -- request body limit --------------------------------------------------------------------------


def with_body(body: bytes, *, chunked: bool = False, close: bool = True) -> bytes:
    head = "GET /api/v1/pods HTTP/1.1\r\nHost: x\r\n"
    if close:
        head += "Connection: close\r\n"
    if chunked:
        data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + data
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_refused_with_413(
    make_stack: StackFactory, chunked: bool
) -> None:
    stack = await make_stack(max_body_bytes=1000)
    (ok,) = parse_responses(await stack.raw(with_body(b"x" * 1000, chunked=chunked)))
    assert ok.status == 200
    assert stack.up.requests[-1].body == b"x" * 1000
    (big,) = parse_responses(await stack.raw(with_body(b"x" * 1001, chunked=chunked)))
    assert big.status == 413
    assert b"request body larger than 1000 bytes" in big.body
    assert len(stack.up.requests) == 1  # the big one never reached the upstream
    await stack.proxy.audit.flush()
    (rec,) = [r for r in audit_records(stack.files.audit) if r["responseStatus"]["code"] == 413]
    assert rec["annotations"]["authorization.k8s.io/decision"] == "allow"


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(max_body_bytes=1000)
    reader, writer = await open_tls(stack)
    # Announce 1 GB and send nothing: the answer comes from the header alone.
    writer.write(b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    writer.close()
    assert stack.up.requests == []


# -- retry with a refreshed upstream token -------------------------------------------------------


async def test_an_upstream_401_is_retried_once_with_a_rotated_token(stack: Stack) -> None:
    # The kubelet rotated the token file; the proxy's file watcher has not noticed yet.
    stack.up.statuses = [401]
    stack.files.token.write_text("upstream-token-2\n")
    raw = await stack.raw(get("/api/v1/pods", close=True))
    assert parse_responses(raw)[0].status == 200
    first, second = stack.up.requests
    assert first.header("Authorization") == ["Bearer upstream-token-1"]
    assert second.header("Authorization") == ["Bearer upstream-token-2"]
    assert first.header("Audit-ID") == second.header("Audit-ID")
    # The next request uses the new token at once.
    await stack.raw(get("/api/v1/pods", close=True))
    assert stack.up.requests[-1].header("Authorization") == ["Bearer upstream-token-2"]


async def test_an_upstream_401_without_a_new_token_is_passed_on(stack: Stack) -> None:
    stack.up.statuses = [401]
    raw = await stack.raw(get("/api/v1/pods", close=True))
    assert parse_responses(raw)[0].status == 401
    assert len(stack.up.requests) == 1  # nothing new to try


async def test_a_401_to_a_write_is_never_replayed(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.up.statuses = [401]
    stack.files.token.write_text("upstream-token-2\n")
    # Peer B's dangerous rule allows `create` on pods/exec (a POST without upgrade headers).
    target = "/api/v1/namespaces/debug/pods/p/exec?command=ls"
    data = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    raw = await stack.raw(data.encode(), who="b")
    assert parse_responses(raw)[0].status == 401
    assert len(stack.up.requests) == 1


# -- an upstream body cut short ------------------------------------------------------------------


async def test_a_truncated_upstream_body_drops_the_client_connection(stack: Stack) -> None:
    stack.up.mode = "truncate"
    reader, writer = await open_tls(stack)
    writer.write(get("/api/v1/pods"))  # keep-alive: only a dropped connection shows the cut
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        rest = await reader.read()  # returns at EOF: the proxy closed the connection
    (resp,) = parse_responses(head)
    assert resp.status == 200
    declared = int(resp.header("Content-Length") or 0)
    assert declared == len(stack.up.list_body)
    assert len(rest) < declared  # visibly incomplete, not padded nor "complete"
    writer.close()
    assert stack.metric("apiproxy_upstream_errors_total", kind="reset") == 1


async def test_a_truncated_probe_answer_is_a_failed_probe(make_stack: StackFactory) -> None:
    stack = await make_stack(readiness_probe_interval_seconds=3600)
    assert await stack.proxy.probe_upstream() is True
    stack.up.mode = "truncate"  # /version too: its body is cut short
    assert await stack.proxy.probe_upstream() is False
    assert stack.metric("apiproxy_upstream_up") == 0


# -- authentication failures, by reason ----------------------------------------------------------


def raw_token(hworld: HWorld, claims: dict[str, object]) -> str:
    return jwt.encode(claims, hworld.key_a, algorithm="EdDSA")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iat": "future"}, "token_issued_in_future"),
        ({"exp": "soon"}, "token_invalid"),
        ({"nbf": [1]}, "token_invalid"),
        ({"sub": None}, "token_missing_subject"),
        ({"sub": ""}, "token_missing_subject"),
        ({"aud": "cccccccc-cccc-4ccc-8ccc-cccccccccccc"}, "token_wrong_audience"),
        ({"scope": None}, "token_wrong_scope"),
        ({"exp": None}, "token_missing_claim"),
    ],
)
async def test_token_failures_are_counted_by_reason(
    stack: Stack, hworld: HWorld, claims: dict[str, object], reason: str
) -> None:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": UUID_A,
        "aud": OWN_UUID,
        "scope": "api",
        "iat": now,
        "exp": now + 600,
    }
    for k, v in claims.items():
        if v is None:
            base.pop(k)
        elif v == "future":
            base[k] = now + 3600
        else:
            base[k] = v
    auth = f"Authorization: Bearer {raw_token(hworld, base)}\r\n"
    raw = await stack.raw(get("/api/v1/pods", close=True, extra=auth), who=None)
    assert parse_responses(raw)[0].status == 401
    assert stack.metric("apiproxy_authentication_failures_total", reason=reason) == 1
    assert stack.up.requests == []
    await stack.proxy.audit.flush()
    (rec,) = audit_records(stack.files.audit)
    assert rec["annotations"]["apiproxy.io/authn-failure"] == reason


# -- two peers whose CAs have the same subject name ----------------------------------------------


async def test_peers_whose_cas_share_a_subject_name_are_told_apart_by_signature(
    make_stack: StackFactory, hworld: HWorld, tmp_path: Path
) -> None:
    # Istio's self-signed roots are often all "O=cluster.local": only the key differs.
    ca_a, ca_b = pki.make_ca("istio-ca"), pki.make_ca("istio-ca")
    assert ca_a.cert.subject == ca_b.cert.subject
    spiffe = ("spiffe://cluster.local/ns/istio-system/sa/istiod",)
    twins = dataclasses.replace(hworld, ca_a=ca_a, ca_b=ca_b)
    stack = await make_stack()
    stack.files.peers.write_text(twins.peers_yaml())
    assert await stack.proxy.reload_now() == [("peers", True)]
    for ca, peer in ((ca_a, "cluster-a"), (ca_b, "cluster-b")):
        cert = pki.issue(ca, "istiod", uris=spiffe, client=True)
        raw = await stack.raw(get("/api/v1/pods", close=True), who=cert)
        assert parse_responses(raw)[0].status == 200, peer
        await stack.proxy.audit.flush()
        assert audit_records(stack.files.audit)[-1]["user"]["username"] == f"peer:{peer}"
    assert (
        stack.metric("apiproxy_authentication_failures_total", reason="certificate_ambiguous_peer")
        == 0
    )
    # A third CA of the same name, nobody's anchor, is refused at the handshake.
    stranger = pki.issue(pki.make_ca("istio-ca"), "istiod", uris=spiffe, client=True)
    raw = await stack.raw(get("/api/v1/pods", close=True), who=stranger)
    assert [r.status for r in parse_responses(raw)] in ([], [401])
    assert len(stack.up.requests) == 2
