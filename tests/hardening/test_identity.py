"""Identity attacks that need state: certificates outside their validity, peers removed by a hot
reload (tokens, new and kept-alive connections, open watches), policy revocation, clock skew."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest

from apiproxy import tokens
from tests.hardening.conftest import (
    POLICY,
    HWorld,
    Stack,
    StackFactory,
    get,
    open_tls,
    parse_responses,
    read_response,
)
from tests.proxy.conftest import audit_records


@pytest.mark.parametrize("which", ["expired", "not-yet-valid", "unknown-ca"])
async def test_certificate_outside_validity_or_from_unknown_ca_never_reaches_upstream(
    stack: Stack, hworld: HWorld, which: str
) -> None:
    cert = {
        "expired": hworld.client_a_expired,
        "not-yet-valid": hworld.client_a_future,
        "unknown-ca": hworld.client_unknown,
    }[which]
    assert cert is not None
    try:
        raw = await stack.raw(get("/api/v1/pods", close=True), who=cert)
    except (ssl.SSLError, ConnectionError):
        raw = b""  # refused in the handshake
    responses = parse_responses(raw)
    assert [r.status for r in responses] in ([], [401])
    assert stack.up.requests == []
    ok = await stack.request("GET", "/api/v1/pods")
    assert ok.status == 200


async def test_removed_peer_is_refused_for_tokens_new_and_kept_alive_connections(
    stack: Stack, hworld: HWorld
) -> None:
    token_b = hworld.token_b()
    reader, writer = await open_tls(stack, "b")
    writer.write(get("/api/v1/pods"))
    assert (await read_response(reader)).status == 200
    stack.files.peers.write_text(hworld.peers_yaml(with_b=False))
    assert await stack.proxy.reload_now() == [("peers", True)]
    # the same TLS connection, still open: authenticated per request, so refused now
    writer.write(get("/api/v1/pods"))
    assert (await read_response(reader)).status == 401
    writer.close()
    # B's token, reused after the removal, without or with A's certificate
    auth = f"Authorization: Bearer {token_b}\r\n"
    for who in (None, "a"):
        raw = await stack.raw(get("/api/v1/pods", close=True, extra=auth), who=who)
        assert parse_responses(raw)[0].status == 401
    # a new handshake with B's certificate: its CA is no longer trusted
    try:
        raw = await stack.raw(get("/api/v1/pods", close=True), who="b")
    except (ssl.SSLError, ConnectionError):
        raw = b""
    assert [r.status for r in parse_responses(raw)] in ([], [401])
    assert [r.target for r in stack.up.requests] == ["/api/v1/pods"]  # only the first one
    assert (
        stack.metric("apiproxy_authentication_failures_total", reason="token_unknown_subject") == 2
    )
    assert (
        stack.metric("apiproxy_authentication_failures_total", reason="certificate_unknown_peer")
        >= 1
    )


async def _open_watch(stack: Stack, who: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_tls(stack, who)
    writer.write(get("/api/v1/pods?watch=1", close=True))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.wait_for(stack.up.wait_until(lambda: stack.up.open_watches >= 1), 10)
    return reader, writer


async def _ended_by_revocation(reader: asyncio.StreamReader, stack: Stack, peer: str) -> None:
    """The reload itself ends the stream: the client reads its end, the upstream watch closes, and
    the audit record says why. (The bound is a hang guard; the end is awaited, never timed.)"""
    async with asyncio.timeout(10):
        rest = await reader.read()
        await stack.up.wait_until(lambda: stack.up.open_watches == 0)
        await stack.proxy.wait_until(lambda: stack.proxy.open_watches(peer) == 0)
    assert rest.endswith(b"0\r\n\r\n"), rest  # a clean end of the chunked stream
    await stack.proxy.audit.flush()
    ended = [
        r["annotations"]["apiproxy.io/stream-ended-by"]
        for r in audit_records(stack.files.audit)
        if r["stage"] == "ResponseComplete" and "apiproxy.io/watch-events" in r["annotations"]
    ]
    assert ended == ["revoked"]


async def test_removing_a_peer_ends_its_open_watches(stack: Stack, hworld: HWorld) -> None:
    reader, writer = await _open_watch(stack, "b")
    stack.files.peers.write_text(hworld.peers_yaml(with_b=False))
    assert await stack.proxy.reload_now() == [("peers", True)]
    await _ended_by_revocation(reader, stack, "cluster-b")
    writer.close()


async def test_revoking_a_rule_ends_open_watches_it_allowed(stack: Stack) -> None:
    reader, writer = await _open_watch(stack, "a")
    stack.files.policy.write_text(POLICY.replace("pods, endpoints", "endpoints"))
    assert await stack.proxy.reload_now() == [("policy", True)]
    await _ended_by_revocation(reader, stack, "cluster-a")
    writer.close()


async def test_clock_skew_of_the_proxy_refuses_then_recovers(
    stack: Stack, hworld: HWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = hworld.token_a()  # 600 s TTL, minted now
    auth = f"Authorization: Bearer {token}\r\n"

    async def status() -> int:
        raw = await stack.raw(get("/api/v1/pods", close=True, extra=auth), who=None)
        return parse_responses(raw)[0].status

    real = time.time
    for skew, reason in ((3600.0, "token_expired"), (-3600.0, "token_not_yet_valid")):
        monkeypatch.setattr(tokens.time, "time", lambda s=skew: real() + s)
        assert await status() == 401
        assert stack.metric("apiproxy_authentication_failures_total", reason=reason) == 1
    for skew in (25.0, -25.0):  # inside the 30 s leeway: still accepted
        monkeypatch.setattr(tokens.time, "time", lambda s=skew: real() + s)
        assert await status() == 200
    monkeypatch.setattr(tokens.time, "time", real)
    assert await status() == 200
    assert len(stack.up.requests) == 3


async def test_two_peers_sharing_a_ca_are_refused_as_ambiguous(
    make_stack: StackFactory, hworld: HWorld
) -> None:
    stack = await make_stack()
    # B's clientCA replaced by A's: a certificate from that CA could be either peer
    a_block = "\n".join("      " + x for x in hworld.ca_a.cert_pem.strip().splitlines())
    b_block = "\n".join("      " + x for x in hworld.ca_b.cert_pem.strip().splitlines())
    text = hworld.peers_yaml().replace(b_block, a_block)
    stack.files.peers.write_text(text)
    assert await stack.proxy.reload_now() == [("peers", True)]
    raw = await stack.raw(get("/api/v1/pods", close=True), who="a")
    assert parse_responses(raw)[0].status == 401
    assert (
        stack.metric("apiproxy_authentication_failures_total", reason="certificate_ambiguous_peer")
        == 1
    )
    assert stack.up.requests == []
