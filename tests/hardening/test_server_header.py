"""No answer of `apiproxy serve` names its implementation: no `Server` header on any path.

aiohttp would add `Server: Python/3.x aiohttp/3.y`, which tells a stranger which advisories to
read; kube-apiserver sends none. The upstream of these tests names itself on every answer
(`tests/hardening/upstream.py`), which the proxy must not pass on either. The adversarial corpus
checks every answer it provokes (`test_adversarial.py`, `Stack.request`); here each remaining
path: forwarded (list, watch, upstream error), refused (401, 403, 400, 429, 431, aiohttp's own
400), the proxy's 502, `view: empty`, upgrades (101, refused, not upgraded), the probe endpoints
of one process, and those of the `--workers` supervisor.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.hardening.conftest import (
    HWorld,
    Response,
    Stack,
    StackFactory,
    get,
    parse_responses,
)
from tests.proxy.serving import serve_process
from tests.proxy.test_empty_view import VIEW_POLICY

EXEC = "/api/v1/namespaces/debug/pods/p/exec?command=sh&stdin=true"


def upgrade_request(target: str = EXEC) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: apiproxy\r\nContent-Length: 0\r\n"
        "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n"
    ).encode()


async def answers(stack: Stack, data: bytes, who: str | None = "a") -> list[Response]:
    """Every answer until the proxy closes the connection."""
    responses = parse_responses(await stack.raw(data, who=who))
    assert responses
    for resp in responses:
        resp.assert_anonymous()
    return responses


async def head_of_answer(stack: Stack, data: bytes, who: str | None = "a") -> Response:
    """The head of the first answer (for answers that leave the connection open)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.proxy.port, ssl=stack.ctx(who)
    )
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            (resp,) = parse_responses(await reader.readuntil(b"\r\n\r\n"))
    finally:
        writer.close()
    resp.assert_anonymous()
    return resp


async def plain_http(port: int, data: bytes) -> list[Response]:
    """Raw bytes to a plain-HTTP port; every answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    responses = parse_responses(raw)
    assert responses, raw[:200]
    for resp in responses:
        resp.assert_anonymous()
    return responses


async def test_forwarded_answers_name_neither_the_proxy_nor_the_upstream(stack: Stack) -> None:
    assert (await stack.request("GET", "/api/v1/pods")).status == 200
    stack.up.watch_script = (b'{"type":"ADDED","object":{}}\n',)
    assert (await stack.request("GET", "/api/v1/pods?watch=true")).status == 200
    stack.up.statuses = [500]
    assert (await stack.request("GET", "/api/v1/pods")).status == 500
    assert len(stack.up.requests) == 3  # each of them came from the upstream


@pytest.mark.parametrize(
    ("who", "data", "status"),
    [
        pytest.param(None, get("/api/v1/pods", close=True), 401, id="unauthenticated"),
        pytest.param("a", get("/api/v1/secrets", close=True), 403, id="forbidden"),
        pytest.param("a", get("/api/v1/namespaces//pods", close=True), 400, id="bad-path"),
        pytest.param("a", get("/api/v1/pods", extra=f"X-Big: {'x' * 20000}\r\n"), 431, id="431"),
        pytest.param("a", b"NOT HTTP AT ALL\r\n\r\n", 400, id="unparsable-head"),
    ],
)
async def test_refusals(stack: Stack, who: str | None, data: bytes, status: int) -> None:
    (resp, *_) = await answers(stack, data, who)
    assert resp.status == status
    assert not stack.up.requests


async def test_too_many_watches_429(make_stack: StackFactory) -> None:
    stack = await make_stack(max_watches_per_peer=1)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.proxy.port, ssl=stack.ctx("a")
    )
    try:
        writer.write(get("/api/v1/pods?watch=true"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")  # the watch is open and held by the proxy
        (open_watch,) = parse_responses(head)
        open_watch.assert_anonymous()
        assert (await head_of_answer(stack, get("/api/v1/pods?watch=true"))).status == 429
    finally:
        writer.close()


async def test_upstream_failure_502(stack: Stack) -> None:
    stack.up.mode = "garbage"
    (resp,) = await answers(stack, get("/api/v1/pods", close=True))
    assert resp.status == 502


async def test_empty_view(make_stack: StackFactory) -> None:
    stack = await make_stack(policy=VIEW_POLICY)
    resp = await stack.request("GET", "/api/v1/namespaces/x/secrets")
    assert resp.status == 200
    assert b'"items":[]' in resp.body.replace(b" ", b"")
    assert not stack.up.requests  # the proxy answered itself


async def test_upgrades(stack: Stack) -> None:
    stack.up.mode = "upgrade"
    assert (await head_of_answer(stack, upgrade_request(), who="b")).status == 101
    # No dangerous rule for cluster-a: refused before the upstream.
    assert (await head_of_answer(stack, upgrade_request(), who="a")).status == 403
    stack.up.mode = "normal"  # the upstream answers without upgrading: relayed as it is
    assert (await head_of_answer(stack, upgrade_request(), who="b")).status == 200
    assert len(stack.up.requests) == 2


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (get("/healthz", close=True), 200),
        (get("/livez", close=True), 200),
        (get("/metrics", close=True), 200),
        (get("/nothing-here", close=True), 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=["healthz", "livez", "metrics", "404", "405", "unparsable"],
)
async def test_probe_endpoints(stack: Stack, data: bytes, status: int) -> None:
    assert stack.proxy.metrics_port is not None
    (resp,) = await plain_http(stack.proxy.metrics_port, data)
    assert resp.status == status


async def test_readiness_probe(stack: Stack) -> None:
    assert stack.proxy.metrics_port is not None
    await stack.proxy.wait_until(lambda: stack.proxy.upstream_ok is not None)
    (resp,) = await plain_http(stack.proxy.metrics_port, get("/readyz", close=True))
    assert resp.status == 200


async def test_workers_and_their_supervisor(stack: Stack, hworld: HWorld, tmp_path: Path) -> None:
    """`--workers 2`: the supervisor's merged probe endpoints, and a worker's forwarded answer."""
    (tmp_path / "served").mkdir()
    async with serve_process(hworld, stack.up.url, tmp_path / "served", workers=2) as served:
        for path in ("/healthz", "/livez", "/metrics"):
            (resp,) = await plain_http(served.metrics_port, get(path, close=True))
            assert resp.status == 200, path
        (readyz,) = await plain_http(served.metrics_port, get("/readyz", close=True))
        assert readyz.status in (200, 503)  # either way, anonymous
        (missing,) = await plain_http(served.metrics_port, get("/nothing", close=True))
        assert missing.status == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port, ssl=stack.ctx("a"))
        try:
            writer.write(get("/api/v1/pods", close=True))
            await writer.drain()
            async with asyncio.timeout(30):
                (resp,) = parse_responses(await reader.read())
        finally:
            writer.close()
        resp.assert_anonymous()
        assert resp.status == 200
