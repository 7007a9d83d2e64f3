"""Every request the proxy accepts ends in exactly one final audit record and one metrics sample,
whichever way it ends: a client that goes away while the upstream is working on an allowed
request (a GET, a watch before its headers, a write with its body, an upgrade before its 101), a
client that goes away in the middle of sending its body, and an unexpected error in the pipeline.

The upstream here records what reached it and sets an `asyncio.Event` the moment it has the
whole request, then holds its answer until the proxy gives up on it, so the test knows the
request was forwarded without sleeping.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from apiproxy.exchange import EndReason, Exchange, UpstreamFailure
from apiproxy.exchange import Recorder as ExchangeRecorder
from apiproxy.metrics import Metrics
from apiproxy.server import ProxyServer
from apiproxy.streams import OpenStreams
from tests.proxy.conftest import (
    POLICY,
    POLICY_NO_ENDPOINTS,
    Files,
    ProxyFactory,
    Recorder,
    World,
    audit_records,
    make_files,
)

POLICY_WRITES = (
    POLICY
    + """\
- name: debug-writes
  peers: [cluster-a]
  apiGroups: [""]
  resources: [pods, pods/exec]
  namespaces: [debug]
  verbs: [get, create]
  dangerous: true
"""
)
WAIT = 10  # upper bound for awaited events; never slept
PEER = "cluster-a"


def _server_ssl(world: World) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    d = Path(tempfile.mkdtemp())
    (d / "c").write_text(world.server.cert_pem)
    (d / "k").write_text(world.server.key_pem)
    ctx.load_cert_chain(d / "c", d / "k")
    return ctx


@dataclass
class Holding:
    """An upstream that never answers: it records each request (head and full body), signals
    `received`, then waits until the proxy drops the connection (signalled by `gone`)."""

    url: str = ""
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    def audit_id(self) -> str:
        for line in self.heads[-1].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"audit-id":
                return value.strip().decode()
        raise AssertionError("the proxy sent no Audit-ID upstream")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /version "):  # the proxy's readiness probe
                body = b'{"major":"1","minor":"32"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            self.heads.append(head)
            self.bodies.append(body)
            self.received.set()
            await reader.read()  # until the proxy closes its side
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.gone.set()
            writer.close()


@pytest.fixture
async def holding(world: World) -> AsyncIterator[Holding]:
    up = Holding()
    up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0, ssl=_server_ssl(world))
    up.url = f"https://127.0.0.1:{up.server.sockets[0].getsockname()[1]}"
    yield up
    up.server.close()
    await up.server.wait_closed()


async def writes_proxy(
    make_proxy: ProxyFactory, world: World, tmp_path: Path, url: str
) -> tuple[ProxyServer, Files]:
    return await make_proxy(url, files=make_files(world, tmp_path, policy=POLICY_WRITES))


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def drop(self) -> None:
        """Go away without a word, as a client that crashed or lost its network would."""
        transport = self.writer.transport
        transport.abort()


async def send(world: World, tmp_path: Path, proxy: ProxyServer, data: bytes) -> Raw:
    ctx = world.client_ssl(world.client_a, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx)
    writer.write(data)
    await writer.drain()
    return Raw(reader, writer)


def busy(proxy: ProxyServer) -> float:
    inflight = proxy.metrics.inflight.labels(PEER)._value.get()
    watches = proxy.metrics.open_watches.labels(PEER)._value.get()
    return float(inflight + watches)


def samples(proxy: ProxyServer) -> dict[tuple[tuple[str, str], ...], float]:
    """`apiproxy_requests_total` of the peer: labels → value."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for metric in proxy.metrics.registry.collect()
        if metric.name == "apiproxy_requests"
        for s in metric.samples
        if s.name == "apiproxy_requests_total" and s.labels["peer"] == PEER and s.value
    }


async def ended(proxy: ProxyServer, files: Files, audit_id: str) -> list[dict[str, Any]]:
    """The request's audit records once the proxy has let go of it."""
    async with asyncio.timeout(WAIT):
        await proxy.wait_until(lambda: busy(proxy) == 0)
    await proxy.audit.flush()
    return [r for r in audit_records(files.audit) if r["auditID"] == audit_id]


async def dropped_after_upstream_received(
    proxy: ProxyServer, files: Files, up: Holding, raw: Raw
) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        await up.received.wait()
    assert busy(proxy) == 1
    raw.drop()
    records = await ended(proxy, files, up.audit_id())
    async with asyncio.timeout(WAIT):
        await up.gone.wait()  # the proxy let go of the upstream request as well
    assert [r["stage"] for r in records] == ["ResponseComplete"], records
    (record,) = records
    assert record["user"]["username"] == f"peer:{PEER}"
    assert record["annotations"]["authorization.k8s.io/decision"] == "allow"
    assert record["annotations"]["apiproxy.io/ended-by"] == "client"
    assert record["responseStatus"]["code"] == 499
    assert sum(samples(proxy).values()) == 1, samples(proxy)
    return record


# -- a client that goes away after the upstream received its allowed request ---------------------


async def test_get_dropped_by_the_client_while_upstream_works_is_audited_once(
    world: World, holding: Holding, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(holding.url)
    raw = await send(
        world, tmp_path, proxy, b"GET /api/v1/namespaces/x/pods HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    record = await dropped_after_upstream_received(proxy, files, holding, raw)
    assert record["verb"] == "list"
    assert list(samples(proxy)) == [
        (
            ("code", "499"),
            ("decision", "allow"),
            ("peer", PEER),
            ("resource", "pods"),
            ("verb", "list"),
        )
    ]


async def test_watch_dropped_before_its_headers_is_audited_once(
    world: World, holding: Holding, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(holding.url)
    raw = await send(
        world, tmp_path, proxy, b"GET /api/v1/pods?watch=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    record = await dropped_after_upstream_received(proxy, files, holding, raw)
    assert record["verb"] == "watch"
    assert proxy.open_watches(PEER) == 0


async def test_write_dropped_after_its_body_went_upstream_is_audited_once(
    world: World, holding: Holding, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await writes_proxy(make_proxy, world, tmp_path, holding.url)
    body = b'{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}'
    raw = await send(
        world,
        tmp_path,
        proxy,
        b"POST /api/v1/namespaces/debug/pods HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    record = await dropped_after_upstream_received(proxy, files, holding, raw)
    assert holding.bodies == [body]
    assert record["verb"] == "create"
    assert record["annotations"]["apiproxy.io/rule"] == "debug-writes"


async def test_upgrade_dropped_before_the_101_is_audited_once(
    world: World, holding: Holding, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await writes_proxy(make_proxy, world, tmp_path, holding.url)
    raw = await send(
        world,
        tmp_path,
        proxy,
        b"POST /api/v1/namespaces/debug/pods/p/exec?command=sh&stdin=true HTTP/1.1\r\n"
        b"Host: x\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n",
    )
    record = await dropped_after_upstream_received(proxy, files, holding, raw)
    assert record["annotations"]["apiproxy.io/upgrade"] == "SPDY/3.1"
    assert record["objectRef"]["subresource"] == "exec"
    assert proxy.open_watches(PEER) == 0


async def test_client_gone_in_the_middle_of_its_body_is_audited_once(
    world: World, holding: Holding, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await writes_proxy(make_proxy, world, tmp_path, holding.url)
    raw = await send(
        world,
        tmp_path,
        proxy,
        b"POST /api/v1/namespaces/debug/pods HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"kind":',
    )
    async with asyncio.timeout(WAIT):
        await proxy.wait_until(lambda: busy(proxy) == 1)  # admitted, reading the body
    raw.drop()
    async with asyncio.timeout(WAIT):
        await proxy.wait_until(lambda: busy(proxy) == 0)
    await proxy.audit.flush()
    records = [r for r in audit_records(files.audit) if r["verb"] == "create"]
    assert [r["stage"] for r in records] == ["ResponseComplete"], records
    assert records[0]["annotations"]["apiproxy.io/ended-by"] == "client"
    assert records[0]["responseStatus"]["code"] == 499
    assert sum(samples(proxy).values()) == 1
    assert holding.heads == []  # nothing went upstream


# -- an unexpected error inside the pipeline -----------------------------------------------------


class _BrokenPolicy:
    """Stands in for the policy and fails the way a bug would."""

    rules = ()

    def decide(self, peer: str, info: object) -> object:
        raise RuntimeError("a bug in the policy engine")


async def test_unexpected_error_is_a_500_with_one_record_and_one_sample(
    world: World,
    holding: Holding,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy, files = await make_proxy(holding.url)
    proxy.policy = _BrokenPolicy()  # type: ignore[assignment]
    raw = await send(
        world,
        tmp_path,
        proxy,
        b"GET /api/v1/namespaces/x/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    async with asyncio.timeout(WAIT):
        answer = await raw.reader.read()
    raw.writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 "), answer
    assert b'"kind":"Status"' in body
    assert b"policy engine" not in body  # internals stay in the log
    ids = [
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"audit-id:")
    ]
    assert len(ids) == 1, head
    audit_id = ids[0]
    await proxy.audit.flush()
    records = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert [r["stage"] for r in records] == ["ResponseComplete"]
    assert records[0]["responseStatus"]["code"] == 500
    assert records[0]["annotations"]["apiproxy.io/ended-by"] == "error"
    assert list(samples(proxy)) == [
        (
            ("code", "500"),
            ("decision", "none"),
            ("peer", PEER),
            ("resource", "pods"),
            ("verb", "list"),
        )
    ]
    assert holding.heads == []
    logs = "".join(capsys.readouterr())
    assert '"event": "internal_error"' in logs
    assert "a bug in the policy engine" in logs  # loud, with the traceback, in the log


# -- the end reason of ordinary endings ----------------------------------------------------------


def _records_by_id(files: Files) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in audit_records(files.audit):
        out.setdefault(r["auditID"], []).append(r)
    return out


async def test_answers_and_refusals_end_completed_once_each(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    codes = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        for target in ("/api/v1/pods", "/api/v1/secrets", "/api/v1/pods?watch=1&watch=0"):
            async with s.get(proxy.url + target) as resp:
                await resp.read()
                codes[resp.headers["Audit-ID"]] = resp.status
    assert sorted(codes.values()) == [200, 400, 403]
    await proxy.audit.flush()
    records = _records_by_id(files)
    assert set(records) == set(codes)
    for audit_id, code in codes.items():
        (record,) = records[audit_id]
        assert record["stage"] == "ResponseComplete"
        assert record["responseStatus"]["code"] == code
        assert record["annotations"]["apiproxy.io/ended-by"] == "completed"
        assert "apiproxy.io/stream-ended-by" not in record["annotations"]
    assert sum(samples(proxy).values()) == 3


async def test_unreachable_upstream_ends_upstream_error(
    world: World, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proxy, files = await make_proxy(f"https://127.0.0.1:{port}")
    raw = await send(
        world, tmp_path, proxy, b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(WAIT):
        answer = await raw.reader.read()
    raw.writer.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    await proxy.audit.flush()
    (record,) = [r for r in audit_records(files.audit) if r["verb"] == "list"]
    assert record["annotations"]["apiproxy.io/ended-by"] == "upstream_error"
    assert record["responseStatus"]["code"] == 503


async def test_watch_ends_by_upstream_or_by_revocation(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get(proxy.url + "/api/v1/pods?watch=1") as first:
            first_id = first.headers["Audit-ID"]
            recorder.events.put_nowait(None)  # the upstream ends this watch
            assert await asyncio.wait_for(first.content.read(), WAIT) == b""
        async with s.get(proxy.url + "/api/v1/endpoints?watch=1") as second:
            second_id = second.headers["Audit-ID"]
            files.policy.write_text(POLICY_NO_ENDPOINTS)
            assert await proxy.reload_now() == [("policy", True)]
            assert await asyncio.wait_for(second.content.read(), WAIT) == b""
    async with asyncio.timeout(WAIT):
        await proxy.wait_until(lambda: busy(proxy) == 0)
    await proxy.audit.flush()
    records = _records_by_id(files)
    for audit_id, reason in ((first_id, "upstream"), (second_id, "revoked")):
        started, done = records[audit_id]
        assert (started["stage"], done["stage"]) == ("ResponseStarted", "ResponseComplete")
        assert done["annotations"]["apiproxy.io/ended-by"] == reason
        assert done["annotations"]["apiproxy.io/stream-ended-by"] == reason
        assert done["responseStatus"]["code"] == 200
    assert sum(samples(proxy).values()) == 2


# -- the units: exchange ending, open streams, the upstream-failure table ------------------------


def _exchange() -> Exchange:
    return Exchange(
        audit_id="a", method="GET", target="/api/v1/pods", received=0.0, started=0.0,
        source_ip="", user_agent="",
    )  # fmt: skip


def test_the_first_ending_counts() -> None:
    ex = _exchange()
    ex.end(EndReason.COMPLETED, 403)
    ex.end(EndReason.CLIENT, 200)  # a cancellation after the refusal was made
    assert (ex.ended_by, ex.code) == (EndReason.COMPLETED, 403)


async def test_open_streams_deadline_revocation_and_shutdown() -> None:
    streams = OpenStreams()
    a, b, c = _exchange(), _exchange(), _exchange()
    entered = {id(x): asyncio.Event() for x in (a, b)}

    async def hold(ex: Exchange) -> None:
        async with streams.bounded(ex, None):
            entered[id(ex)].set()
            await asyncio.Event().wait()  # only the stream's ending gets it out of here

    tasks = [asyncio.create_task(hold(a)), asyncio.create_task(hold(b))]
    async with asyncio.timeout(WAIT):
        for e in entered.values():
            await e.wait()
    assert len(streams) == 2
    streams.revoke(lambda ex: ex is b, "the policy no longer allows it")
    async with asyncio.timeout(WAIT):
        await tasks[0]
    assert (a.ended_by, a.revoked) == (EndReason.REVOKED, "the policy no longer allows it")
    assert b.revoked == ""
    assert not tasks[1].done()
    streams.end_all()
    async with asyncio.timeout(WAIT):
        await tasks[1]
    assert b.ended_by is EndReason.SHUTDOWN
    async with streams.bounded(c, None):  # opened after shutdown began: ended at once
        await asyncio.Event().wait()
    assert c.ended_by is EndReason.SHUTDOWN
    assert len(streams) == 0


async def test_open_streams_deadline_and_foreign_timeouts() -> None:
    streams = OpenStreams()
    ex = _exchange()
    async with streams.bounded(ex, 0):
        await asyncio.Event().wait()
    assert ex.ended_by is EndReason.DEADLINE
    other = _exchange()
    with pytest.raises(TimeoutError):  # not the stream's own timeout: passed on untouched
        async with streams.bounded(other, None):
            raise TimeoutError
    assert other.ended_by is None


@pytest.mark.parametrize(("kind", "code"), [("connect", 503), ("timeout", 504), ("protocol", 502)])
def test_one_table_maps_upstream_failures(kind: UpstreamFailure, code: int) -> None:
    recorder = ExchangeRecorder(Metrics(), retry_after_seconds=1)
    ex = _exchange()
    resp = recorder.upstream_failed(ex, kind, "why")
    assert resp.status == code == ex.code
    assert ex.ended_by is EndReason.UPSTREAM_ERROR
    assert recorder.metrics.upstream_errors.labels(kind)._value.get() == 1
