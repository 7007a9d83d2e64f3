# ruff: noqa: SIM117  (nested client/response contexts read more clearly in these tests)
"""Protocol upgrades (exec, attach, port-forward) relayed through the proxy over real TLS.

Two upstreams on 127.0.0.1: aiohttp with a real WebSocket echo handler (for an aiohttp
`ws_connect` client), and a raw asyncio TLS server that records the exact request head, answers
101 SPDY (plus bytes in the same write) or an error, echoes bytes and reports when its connection
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apiproxy import upgrade
from apiproxy.server import ProxyServer
from tests.proxy.conftest import POLICY, Files, ProxyFactory, World, audit_records, make_files

POLICY_EXEC = (
    POLICY
    + """\
- name: debug-exec
  peers: [cluster-a]
  apiGroups: [""]
  resources: [pods/exec, pods/attach, pods/portforward]
  namespaces: [debug]
  verbs: [get, create]
  dangerous: true
- name: debug-pods-write
  peers: [cluster-a]
  apiGroups: [""]
  resources: [pods]
  namespaces: [debug]
  verbs: [create]
  dangerous: true
"""
)
EXEC = "/api/v1/namespaces/debug/pods/p/exec?command=sh&stdin=true&stdout=true&tty=true"
WS_PROTOCOL = "v5.channel.k8s.io"
WAIT = 10  # upper bound for awaited events; never slept


def _server_ssl(world: World) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    d = Path(tempfile.mkdtemp())
    (d / "c").write_text(world.server.cert_pem)
    (d / "k").write_text(world.server.key_pem)
    ctx.load_cert_chain(d / "c", d / "k")
    return ctx


# -- upstream 1: aiohttp with a WebSocket echo ---------------------------------------------------


@dataclass
class WsUpstream:
    url: str = ""
    requests: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "32"})
        self.requests.append((request.method, request.raw_path, list(request.headers.items())))
        ws = web.WebSocketResponse(protocols=(WS_PROTOCOL,))
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data.upper())
        finally:
            self.closed.set()
        return ws


@pytest.fixture
async def ws_upstream(world: World) -> AsyncIterator[WsUpstream]:
    up = WsUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    up.runner = web.AppRunner(app, access_log=None)
    await up.runner.setup()
    site = web.TCPSite(up.runner, "127.0.0.1", 0, ssl_context=_server_ssl(world))
    await site.start()
    up.url = f"https://127.0.0.1:{up.runner.addresses[0][1]}"
    yield up
    await up.runner.cleanup()


# -- upstream 2: raw TLS, byte-exact -------------------------------------------------------------

SPDY_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\nServer: upstream\r\n\r\n"
)
HELLO = b"HELLO-FROM-UPSTREAM"
STATUS_403 = (
    b'{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403}'
)


@dataclass
class RawUpstream:
    answer: bytes = SPDY_101 + HELLO  # sent in one write after the request head
    echo: bool = True
    url: str = ""
    heads: list[bytes] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /version "):
                body = b'{"major":"1","minor":"32"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                return
            self.heads.append(head)
            writer.write(self.answer)
            await writer.drain()
            while self.echo and (data := await reader.read(65536)):
                self.received += data
                writer.write(data)
                await writer.drain()
            if not self.echo:
                await reader.read()  # until the proxy closes its side
            self.closed.set()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            self.closed.set()
        finally:
            writer.close()

    def header(self, i: int, name: str) -> list[str]:
        out = []
        for line in self.heads[i].split(b"\r\n")[1:]:
            k, sep, v = line.partition(b":")
            if sep and k.decode().lower() == name.lower():
                out.append(v.strip().decode())
        return out


@pytest.fixture
async def raw_upstream(world: World) -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0, ssl=_server_ssl(world))
    up.url = f"https://127.0.0.1:{up.server.sockets[0].getsockname()[1]}"
    yield up
    up.server.close()
    await up.server.wait_closed()


# -- helpers -------------------------------------------------------------------------------------


async def exec_proxy(
    make_proxy: ProxyFactory, world: World, tmp_path: Path, url: str, **kw: Any
) -> tuple[ProxyServer, Files]:
    return await make_proxy(url, files=make_files(world, tmp_path, policy=POLICY_EXEC), **kw)


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    async def read_exactly(self, n: int) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.readexactly(n)


async def raw_upgrade(
    proxy: ProxyServer,
    world: World,
    tmp_path: Path,
    target: str = EXEC,
    method: str = "POST",
    extra: tuple[tuple[str, str], ...] = (),
) -> RawClient:
    """Send an SPDY-style upgrade request over a raw mTLS connection and read the response head."""
    ctx = world.client_ssl(world.client_a, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx)
    lines = [f"{method} {target} HTTP/1.1", "Host: apiproxy", "Content-Length: 0"]
    if not any(k.lower() == "connection" for k, _ in extra):
        lines.append("Connection: Upgrade")
    if not any(k.lower() == "upgrade" for k, _ in extra):
        lines.append("Upgrade: SPDY/3.1")
    lines += [f"{k}: {v}" for k, v in extra]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    first, *rest = head[:-4].decode("latin-1").split("\r\n")
    client = RawClient(reader, writer, status=int(first.split(" ")[1]))
    for line in rest:
        k, _, v = line.partition(":")
        client.headers.append((k, v.strip()))
    return client


async def finished(proxy: ProxyServer, files: Files, audit_id: str) -> list[dict[str, Any]]:
    """The audit records of one request, once the proxy has ended it."""
    async with asyncio.timeout(WAIT):
        await proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0)
    await proxy.audit.flush()
    return [r for r in audit_records(files.audit) if r["auditID"] == audit_id]


def relay_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("apiproxy-upgrade")]


# -- tests ---------------------------------------------------------------------------------------


async def test_websocket_exec_round_trip_through_dangerous_rule(
    world: World, ws_upstream: WsUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, ws_upstream.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(
            proxy.url + EXEC.replace("sh", "ls"),
            ssl=ctx,
            protocols=(WS_PROTOCOL,),
            headers={
                "Authorization": f"Bearer {world.token_a()}",  # valid, same peer as the cert
                "Impersonate-User": "system:admin",
                "Impersonate-Group": "system:masters",
                "X-Remote-User": "admin",
                "X-Forwarded-For": "10.0.0.1",
            },
        ) as ws:
            assert ws.protocol == WS_PROTOCOL
            await ws.send_bytes(b"\x00echo hi\n")
            assert await ws.receive_bytes(timeout=WAIT) == b"\x00echo hi\n"
            big = bytes(range(256)) * 2000  # 512 KB: several TLS records and buffer refills
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=WAIT) == big
            await ws.send_str("exit")
            assert await ws.receive_str(timeout=WAIT) == "EXIT"
    async with asyncio.timeout(WAIT):
        await ws_upstream.closed.wait()

    assert len(ws_upstream.requests) == 1
    method, raw_path, headers = ws_upstream.requests[0]
    assert (method, raw_path) == ("GET", EXEC.replace("sh", "ls"))

    def got(name: str) -> list[str]:
        return [v for k, v in headers if k.lower() == name.lower()]

    assert got("Authorization") == ["Bearer upstream-token-1"]
    (audit_id,) = got("Audit-ID")
    assert got("Sec-WebSocket-Protocol") == [WS_PROTOCOL]
    assert got("Upgrade") == ["websocket"]
    assert got("Connection") == ["Upgrade"]
    names = {k.lower() for k, _ in headers}
    assert not {"impersonate-user", "impersonate-group", "x-remote-user", "x-forwarded-for"} & names

    recs = await finished(proxy, files, audit_id)
    assert [r["stage"] for r in recs] == ["ResponseStarted", "ResponseComplete"]
    assert [r["responseStatus"]["code"] for r in recs] == [101, 101]
    ann = recs[1]["annotations"]
    assert ann["apiproxy.io/upgrade"] == "websocket"
    assert ann["apiproxy.io/rule"] == "debug-exec"
    payload = len(b"\x00echo hi\n") + len(big) + len("exit")
    assert int(ann["apiproxy.io/bytes-received"]) > payload  # plus frame headers and masks
    assert int(ann["apiproxy.io/bytes-sent"]) > payload
    assert ann["apiproxy.io/stream-ended-by"] in ("client", "upstream")
    assert recs[1]["verb"] == "get"
    assert recs[1]["objectRef"]["subresource"] == "exec"
    assert relay_tasks() == []


async def test_spdy_upgrade_is_relayed_byte_exact_with_scrubbed_head(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(
        proxy,
        world,
        tmp_path,
        extra=(
            ("Connection", "Upgrade, User-Agent"),
            ("User-Agent", "kubectl/v1.32"),  # allowlisted, but named in Connection: dropped
            ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
            ("X-Stream-Protocol-Version", "channel.k8s.io"),
            ("Accept", "application/json"),
            ("Authorization", f"Bearer {world.token_a()}"),
            ("Impersonate-User", "system:admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Forwarded-Host", "kubernetes"),
            ("Cookie", "a=b"),
            ("Audit-ID", "forged"),
        ),
    )
    assert client.status == 101
    assert client.header("Upgrade") == ["SPDY/3.1"]
    assert client.header("Connection") == ["Upgrade"]
    assert client.header("X-Stream-Protocol-Version") == ["v4.channel.k8s.io"]
    assert "upstream" not in client.header("Server")
    (audit_id,) = client.header("Audit-ID")
    # Bytes the upstream sent together with its 101 arrive first.
    assert await client.read_exactly(len(HELLO)) == HELLO
    sent = b""
    for chunk in (b"\x00\x01frame-one", b"\xff" * 100_000, b"last"):
        client.writer.write(chunk)
        sent += chunk
        assert await client.read_exactly(len(chunk)) == chunk
    client.writer.close()
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()
    assert bytes(raw_upstream.received) == sent

    head = raw_upstream.heads[0]
    assert head.startswith(f"POST {EXEC} HTTP/1.1\r\nHost: 127.0.0.1:".encode())
    assert raw_upstream.header(0, "Authorization") == ["Bearer upstream-token-1"]
    assert raw_upstream.header(0, "Audit-ID") == [audit_id]
    assert raw_upstream.header(0, "X-Stream-Protocol-Version") == [
        "v4.channel.k8s.io",
        "channel.k8s.io",
    ]
    assert raw_upstream.header(0, "Upgrade") == ["SPDY/3.1"]
    assert raw_upstream.header(0, "Connection") == ["Upgrade"]
    assert raw_upstream.header(0, "Accept") == ["application/json"]
    for name in ("User-Agent", "Impersonate-User", "X-Remote-Group", "X-Forwarded-Host", "Cookie"):
        assert raw_upstream.header(0, name) == [], name

    recs = await finished(proxy, files, audit_id)
    assert [r["stage"] for r in recs] == ["ResponseStarted", "ResponseComplete"]
    ann = recs[1]["annotations"]
    assert int(ann["apiproxy.io/bytes-sent"]) == len(HELLO) + len(sent)
    assert int(ann["apiproxy.io/bytes-received"]) == len(sent)
    assert ann["apiproxy.io/stream-ended-by"] == "client"
    assert ann["apiproxy.io/upgrade"] == "SPDY/3.1"
    assert recs[1]["verb"] == "create"
    assert relay_tasks() == []


async def test_upstream_closing_ends_the_tunnel(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    raw_upstream.answer = SPDY_101 + b"bye"
    raw_upstream.echo = False

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw_upstream.answer)
        await writer.drain()
        writer.close()  # the exec ended upstream

    assert raw_upstream.server is not None
    raw_upstream.server.close()
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=_server_ssl(world))
    async with server:
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proxy, files = await exec_proxy(make_proxy, world, tmp_path, url)
        client = await raw_upgrade(proxy, world, tmp_path)
        assert client.status == 101
        (audit_id,) = client.header("Audit-ID")
        async with asyncio.timeout(WAIT):
            assert await client.reader.read() == b"bye"  # then EOF: the proxy closed the client
        client.writer.close()
        recs = await finished(proxy, files, audit_id)
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "upstream"
    assert recs[1]["annotations"]["apiproxy.io/bytes-sent"] == "3"


async def test_client_vanishing_closes_the_upstream_connection(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    assert client.status == 101
    (audit_id,) = client.header("Audit-ID")
    assert await client.read_exactly(len(HELLO)) == HELLO
    client.writer.write(b"ping")
    assert await client.read_exactly(4) == b"ping"
    assert proxy.open_watches("cluster-a") == 1
    client.writer.transport.abort()  # no TLS close_notify, no FIN handshake: just gone
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()
    recs = await finished(proxy, files, audit_id)
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "client"
    assert recs[1]["annotations"]["apiproxy.io/bytes-received"] == "4"
    assert proxy.metrics.open_watches.labels("cluster-a")._value.get() == 0
    assert relay_tasks() == []


async def test_tunnel_ends_at_the_deadline_and_at_shutdown(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await exec_proxy(
        make_proxy, world, tmp_path, raw_upstream.url, max_watch_seconds=0.2
    )
    client = await raw_upgrade(proxy, world, tmp_path)
    (audit_id,) = client.header("Audit-ID")
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()
        assert await client.reader.read() == HELLO  # then EOF
    client.writer.close()
    recs = await finished(proxy, files, audit_id)
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "deadline"

    raw_upstream.closed.clear()
    proxy.config.max_watch_seconds = 3600
    client = await raw_upgrade(proxy, world, tmp_path)
    (audit_id,) = client.header("Audit-ID")
    assert await client.read_exactly(len(HELLO)) == HELLO
    await proxy.stop()
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()
        assert await client.reader.read() == b""
    client.writer.close()
    recs = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "shutdown"


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + STATUS_403[:16] + b"\r\n"
            b"%x\r\n" % (len(STATUS_403) - 16) + STATUS_403[16:] + b"\r\n0\r\n\r\n",
            403,
            STATUS_403,
        ),
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
            b"Upgrade: SPDY/3.1\r\n\r\nbad request",
            400,
            b"bad request",
        ),
    ],
    ids=["403-chunked", "400-content-length"],
)
async def test_non_101_answer_is_relayed_as_a_normal_response(
    world: World,
    raw_upstream: RawUpstream,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    answer: bytes,
    status: int,
    body: bytes,
) -> None:
    raw_upstream.answer = answer
    raw_upstream.echo = False
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    assert client.status == status
    assert client.header("Upgrade") == []
    assert client.header("Connection") == ["close"]
    assert client.header("Content-Length") == [str(len(body))]
    (audit_id,) = client.header("Audit-ID")
    async with asyncio.timeout(WAIT):
        assert await client.reader.read() == body  # then EOF: no keep-alive after an upgrade
    client.writer.close()
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()  # the upstream connection is not kept either
    recs = await finished(proxy, files, audit_id)
    assert [r["stage"] for r in recs] == ["ResponseComplete"]
    assert recs[0]["responseStatus"]["code"] == status
    assert recs[0]["annotations"]["apiproxy.io/bytes-sent"] == str(len(body))


async def test_websocket_client_sees_upstream_refusal_status(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    raw_upstream.answer = (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(STATUS_403), STATUS_403)
    )
    raw_upstream.echo = False
    proxy, _ = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(
                proxy.url + EXEC,
                ssl=world.client_ssl(world.client_a, tmp_path),
                protocols=(WS_PROTOCOL,),
            )
    assert err.value.status == 403
    assert len(raw_upstream.heads) == 1


@pytest.mark.parametrize(
    ("name", "target", "extra", "code"),
    [
        pytest.param(*c, id=c[0])
        for c in [
            # allowed by a read rule, but no dangerous rule: the spec's 403
            ("not-dangerous", "/api/v1/namespaces/x/pods/web-0", (), 403),
            # exec outside the dangerous rule's namespace: the policy's 403
            ("other-namespace", "/api/v1/namespaces/x/pods/p/exec?command=sh", (), 403),
            # a dangerous rule, but not for an exec/attach/portforward/proxy subresource
            ("dangerous-not-a-stream", "/api/v1/namespaces/debug/pods", (), 403),
            # h2c would turn the connection into HTTP/2 carrying the proxy's identity
            (
                "h2c",
                EXEC,
                (("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")),
                400,
            ),
            ("upgrade-without-connection", EXEC, (("Connection", "keep-alive"),), 400),
            ("two-upgrades", EXEC, (("Upgrade", "websocket"), ("Upgrade", "SPDY/3.1")), 400),
        ]
    ],
)
async def test_refused_upgrades_never_reach_the_upstream(
    world: World,
    raw_upstream: RawUpstream,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    name: str,
    target: str,
    extra: tuple[tuple[str, str], ...],
    code: int,
) -> None:
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    method = "GET" if name == "not-dangerous" else "POST"
    client = await raw_upgrade(proxy, world, tmp_path, target=target, method=method, extra=extra)
    assert client.status == code, name
    (length,) = client.header("Content-Length")
    status = json.loads(await client.read_exactly(int(length)))
    client.writer.close()
    assert (status["kind"], status["code"]) == ("Status", code)
    assert raw_upstream.heads == []
    await proxy.audit.flush()
    (audit_id,) = client.header("Audit-ID")
    recs = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert [r["responseStatus"]["code"] for r in recs] == [code]
    if code == 403:
        assert recs[0]["annotations"]["authorization.k8s.io/decision"] == "forbid"


async def test_upgrade_with_a_body_is_refused(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx)
    writer.write(
        f"POST {EXEC} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        "Content-Length: 4\r\n\r\nbody".encode()
    )
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert raw_upstream.heads == []


async def test_unreachable_upstream_is_503(
    world: World, make_proxy: ProxyFactory, tmp_path: Path, refused_port: int
) -> None:
    port = refused_port
    proxy, _ = await exec_proxy(make_proxy, world, tmp_path, f"https://127.0.0.1:{port}")
    client = await raw_upgrade(proxy, world, tmp_path)
    client.writer.close()
    assert client.status == 503
    assert proxy.metrics.upstream_errors.labels("connect")._value.get() == 1


async def test_upstream_switching_to_another_protocol_is_502(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    raw_upstream.answer = SPDY_101.replace(b"SPDY/3.1", b"h2c")
    raw_upstream.echo = False
    proxy, _ = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    client.writer.close()
    assert client.status == 502
    async with asyncio.timeout(WAIT):
        await raw_upstream.closed.wait()


# -- the aiohttp contract the relay depends on ---------------------------------------------------


@pytest.mark.parametrize("protocol", ["SPDY/3.1", "websocket"])
async def test_aiohttp_set_parser_contract(protocol: str) -> None:
    """`attach_client_stream` relies on aiohttp handing every byte after `set_parser` to the
    stream and calling `feed_eof` when the connection is lost, for upgrades aiohttp knows
    (websocket) and for ones it does not (SPDY). If aiohttp changes that, this fails."""
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        stream = upgrade.attach_client_stream(request)
        resp = web.StreamResponse(status=101)
        resp.headers.update({"Connection": "Upgrade", "Upgrade": protocol})
        await resp.prepare(request)
        got = b""
        while chunk := await stream.read():
            got += chunk
            await resp.write(chunk)
        done.set_result(got)
        return resp

    server = web.Server(handler, handler_cancellation=False)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        early = b"early" if protocol == "websocket" else b""  # aiohttp buffers these for ws only
        writer.write(
            f"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            + early
        )
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            if early:
                assert await reader.readexactly(len(early)) == early
            writer.write(b"GET / HTTP/1.1\r\n\r\n")  # looks like HTTP: must still be raw bytes
            assert await reader.readexactly(18) == b"GET / HTTP/1.1\r\n\r\n"
            writer.close()
            assert await done == early + b"GET / HTTP/1.1\r\n\r\n"
    finally:
        with contextlib.suppress(Exception):
            writer.close()
        await runner.cleanup()


def test_upgrade_request_headers_keep_only_what_the_switch_needs() -> None:
    from multidict import CIMultiDict

    from apiproxy.forward import upgrade_request_headers

    out = upgrade_request_headers(
        CIMultiDict(
            [
                ("Connection", "keep-alive, Upgrade, Sec-WebSocket-Extensions"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io, v4.channel.k8s.io"),
                ("Sec-WebSocket-Extensions", "permessage-deflate"),
                ("Authorization", "Bearer x"),
                ("Impersonate-User", "admin"),
                ("Accept", "*/*"),
            ]
        )
    )
    assert list(out.items()) == [
        ("Accept", "*/*"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "v5.channel.k8s.io, v4.channel.k8s.io"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
    ]


def test_upstream_head_parsing_is_strict() -> None:
    head = upgrade.parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\n\r\n")
    assert (head.status, head.reason, head.headers["upgrade"]) == (
        101,
        "Switching Protocols",
        "SPDY/3.1",
    )
    for bad in (
        b"HTTP/2 101 x\r\n\r\n",
        b"HTTP/1.1 1O1 x\r\n\r\n",
        b"HTTP/1.1 101 x\r\n folded: y\r\n\r\n",
        b"HTTP/1.1 101 x\r\nno-colon\r\n\r\n",
    ):
        with pytest.raises(upgrade.UpstreamProtocolError):
            upgrade.parse_head(bad)


EXEC_RULE = """\
- name: debug-exec
  peers: [cluster-a]
  apiGroups: [""]
  resources: [pods/exec, pods/attach, pods/portforward]
  namespaces: [debug]
  verbs: [get, create]
  dangerous: true
"""


@pytest.mark.parametrize(
    ("after", "kept"),
    [
        pytest.param(POLICY_EXEC.replace(EXEC_RULE, ""), "rule-removed", id="rule-removed"),
        pytest.param(
            POLICY_EXEC.replace(
                "  resources: [pods/exec, pods/attach, pods/portforward]\n",
                "  resources: [pods/attach, pods/portforward]\n",
            ),
            "exec-dropped",
            id="exec-dropped-from-the-rule",
        ),
    ],
)
async def test_a_policy_reload_revokes_open_tunnels_it_no_longer_allows(
    world: World,
    raw_upstream: RawUpstream,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    after: str,
    kept: str,
) -> None:
    assert EXEC_RULE in POLICY_EXEC
    assert after != POLICY_EXEC, kept
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    assert client.status == 101
    (audit_id,) = client.header("Audit-ID")
    assert await client.read_exactly(len(HELLO)) == HELLO
    files.policy.write_text(after)
    assert await proxy.reload_now() == [("policy", True)]
    async with asyncio.timeout(WAIT):
        assert await client.reader.read() == b""  # the proxy ended the tunnel
        await raw_upstream.closed.wait()  # and its upstream side
    client.writer.close()
    recs = await finished(proxy, files, audit_id)
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "revoked"
    assert relay_tasks() == []


async def test_a_policy_reload_that_still_allows_a_tunnel_keeps_it(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    (audit_id,) = client.header("Audit-ID")
    assert await client.read_exactly(len(HELLO)) == HELLO
    files.policy.write_text(POLICY_EXEC.replace("endpoints, ", ""))  # an unrelated rule changes
    assert await proxy.reload_now() == [("policy", True)]
    client.writer.write(b"still-there")
    assert await client.read_exactly(len(b"still-there")) == b"still-there"
    client.writer.close()
    recs = await finished(proxy, files, audit_id)
    assert recs[1]["annotations"]["apiproxy.io/stream-ended-by"] == "client"


async def test_a_rule_cannot_lose_dangerous_and_keep_exec(
    world: World, raw_upstream: RawUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Taking `dangerous` off a rule that still grants exec is refused as a whole (policy
    validation), so the open tunnel goes on under the last good policy: no rule can allow an
    upgrade without being dangerous (docs/security-testing.md, mutation testing)."""
    proxy, files = await exec_proxy(make_proxy, world, tmp_path, raw_upstream.url)
    client = await raw_upgrade(proxy, world, tmp_path)
    assert await client.read_exactly(len(HELLO)) == HELLO
    files.policy.write_text(
        POLICY_EXEC.replace(EXEC_RULE, EXEC_RULE.replace("  dangerous: true\n", ""))
    )
    assert await proxy.reload_now() == [("policy", False)]
    assert proxy.stale == {"policy"}
    client.writer.write(b"still-there")
    assert await client.read_exactly(len(b"still-there")) == b"still-there"
    client.writer.close()
