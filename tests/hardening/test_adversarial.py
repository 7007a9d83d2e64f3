"""Adversarial requests against the real proxy over TLS: each is refused before the upstream, or
forwarded byte-exact with the client's credentials and impersonation headers scrubbed."""

from __future__ import annotations

import re
import ssl
from collections import Counter

import pytest

from apiproxy.request import classify
from tests.hardening.cases import CASES, Case
from tests.hardening.conftest import Response, Stack, parse_responses
from tests.hardening.tokens_util import make_token

# Request headers that must never reach the upstream from a client.
_NEVER_UPSTREAM = re.compile(
    r"^(impersonate-.*|x-remote-.*|x-forwarded-.*|forwarded|x-real-ip|proxy-authorization|cookie"
    r"|x-http-method-override|x-method-override|x-http-method|upgrade|connection|te|expect"
    r"|sec-websocket-.*|http2-settings|transfer-encoding)$",
    re.IGNORECASE,
)


# Appended to raw cases: whatever the proxy made of the bytes before it, this ends the connection
# (a case that left the connection open would otherwise wait for a timeout).
SENTINEL = b"GET /api/v1/endpoints?sentinel=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _request_bytes(stack: Stack, case: Case) -> bytes:
    if case.raw is not None:
        closes = b"connection: close" in case.raw.split(b"\r\n\r\n", 1)[0].lower()
        http11 = case.raw.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1")
        keep = closes or not http11 or case.expect == "pipeline"
        return case.raw if keep else case.raw + SENTINEL
    lines = [f"{case.method} {case.target} HTTP/1.1", "Host: apiproxy"]
    for k, v in case.headers:
        if "{tok:" in v:
            spec = v.split("{tok:")[1].split("}")[0]
            v = v.replace("{tok:" + spec + "}", make_token(stack.world, spec))
        lines.append(f"{k}: {v}")
    if case.token is not None:
        lines.append(f"Authorization: Bearer {make_token(stack.world, case.token)}")
    if case.body:
        lines.append(f"Content-Length: {len(case.body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + case.body


def _check_forwarded(stack: Stack, case: Case, resp: Response) -> None:
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert len(stack.up.requests) == 1, [r.head for r in stack.up.requests]
    got = stack.up.requests[0]
    if case.raw is None:
        assert got.method == case.method
        assert got.target == case.target  # byte-exact
        assert got.body == case.body
    else:
        first = case.raw.split(b"\r\n", 1)[0].split(b" ")
        assert got.method.encode() == first[0]
        assert got.target.encode() == first[1]
        if "body" in case.extra:
            assert got.body == case.extra["body"].encode()
    assert got.header("Authorization") == ["Bearer upstream-token-1"]
    assert len(got.header("Audit-ID")) == 1
    assert got.header("Audit-ID") == [resp.header("Audit-ID")]
    for name, _ in got.headers:
        if case.extra.get("upgrade") and name.lower() in ("upgrade", "connection"):
            continue  # a relayed upgrade needs them
        assert not _NEVER_UPSTREAM.match(name), f"{name} reached the upstream"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id=f"{c.cls}-{c.name}",
            marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [],
        )
        for c in CASES
    ],
)
async def test_adversarial_request(stack: Stack, case: Case) -> None:
    stack.up.watch_script = (b'{"type":"ADDED","object":{}}\n',)
    data = _request_bytes(stack, case)
    try:
        raw = await stack.raw(data, who=case.who)
    except (ssl.SSLError, ConnectionError) as exc:
        raise AssertionError(f"connection failed: {exc!r}") from exc
    responses = parse_responses(raw)
    assert responses, f"no response at all: {raw[:200]!r}"
    for r in responses:  # refused, forwarded or answered by aiohttp itself: no Server header
        r.assert_anonymous()
    resp = responses[0]
    # Never a server error from the proxy itself (5xx only where the case says so, e.g. 501).
    assert resp.status < 500 or resp.status in case.codes, (resp.status, resp.body[:300])
    if case.expect == "pipeline":
        assert [r.status for r in responses] == [200, 403]
        assert [r.target for r in stack.up.requests] == ["/api/v1/pods"]
        return
    stack.up.requests[:] = [r for r in stack.up.requests if "sentinel=1" not in r.target]
    # Whatever reached the upstream is something the policy allows for the calling peer.
    peer = {"a": "cluster-a", "b": "cluster-b"}.get(case.who or "", "cluster-a")
    for got in stack.up.requests:
        info = classify(got.method, got.target)
        assert stack.proxy.policy.decide(peer, info).allowed, got.head
    forwarded = bool(stack.up.requests)
    if case.expect == "forward" or (case.expect == "either" and resp.status == 200):
        _check_forwarded(stack, case, resp)
    else:
        assert resp.status in case.codes, (resp.status, resp.body[:300])
        assert not forwarded, [r.head for r in stack.up.requests]
        # A second request on a fresh connection still works: the proxy survived the case.
        ok = await stack.request("GET", "/api/v1/pods")
        assert ok.status == 200


def test_case_counts_cover_every_class() -> None:
    counts = Counter(c.cls for c in CASES)
    assert set(counts) == {"path", "verb", "header", "smuggling", "identity"}
    assert all(n >= 5 for n in counts.values()), counts
    names = [f"{c.cls}-{c.name}" for c in CASES]
    assert len(names) == len(set(names)), "duplicate case ids"
