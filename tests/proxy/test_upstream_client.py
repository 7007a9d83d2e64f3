"""The upstream HTTP/1.1 client (apiproxy/upstream_client.py) against a scripted TLS server.

The server is raw asyncio on loopback, so each test can answer exactly as a misbehaving or slow
upstream would: close an idle keep-alive connection, send a 100 before the answer, switch
protocols unasked, cut a body short, or stop reading. Each scenario runs on asyncio's loop and on
uvloop (what `apiproxy serve` runs on): their TLS layers read into buffered protocols differently.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import ssl
import tempfile
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from yarl import URL

from apiproxy import pki
from apiproxy.upstream_client import (
    HIGH_WATER,
    ConnectionPool,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamResponse,
    _Connection,
    _Response,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
CA = pki.make_ca("upstream test CA")
SERVER = pki.server_cert_for_loopback(CA)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

# A scenario that takes longer is stuck. scripts/mutate lowers it: many mutants make the client
# wait forever, and each such mutant costs this long.
SCENARIO_SECONDS = float(os.environ.get("UPSTREAM_CLIENT_TEST_SECONDS", "60"))

# The failures' messages, to the letter (only their type reaches the proxy's log and audit).
DISCONNECTED = r"^the upstream closed the connection$"
POOL_CLOSED = r"^the upstream pool is closed$"
REFUSED = r"^cannot connect to the upstream \(ConnectionRefusedError\)$"

Reply = Callable[["Conn", bytes, bytes], Awaitable[None]]


def run(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario` on `loop`; anything the loop had to report (an exception in a protocol
    callback, a future's lost exception) fails the test: the proxy would log it as an error."""
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        await asyncio.wait_for(scenario(), SCENARIO_SECONDS)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())
    assert [ctx.get("message") for ctx in reported] == []


both_loops = pytest.mark.parametrize("loop", sorted(LOOPS))


class Conn:
    """One accepted connection of the scripted server."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests = 0


class Upstream:
    """A TLS server on 127.0.0.1 that hands every request (head, body) to `reply`."""

    def __init__(self, reply: Reply, *, tls: bool = True, host: str = "127.0.0.1") -> None:
        self.reply = reply
        self.tls = tls
        self.host = host
        self.heads: list[bytes] = []
        self.conns: list[Conn] = []
        self.closed: asyncio.Queue[int] = asyncio.Queue()  # connection index, at client EOF
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Upstream:
        tls = server_ssl() if self.tls else None
        self.server = await asyncio.start_server(self._serve, self.host, 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.conns:
            c.writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                conn.requests += 1
                await self.reply(conn, head, body)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed.put_nowait(conn.index)
            writer.close()

    def pool(self, **kw: Any) -> ConnectionPool:
        if not self.tls:
            return ConnectionPool(URL(f"http://127.0.0.1:{self.port}"), False, **kw)
        return ConnectionPool(URL(f"https://127.0.0.1:{self.port}"), client_ssl(), **kw)


def server_ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "c").write_text(SERVER.cert_pem)
        Path(d, "k").write_text(SERVER.key_pem)
        ctx.load_cert_chain(Path(d, "c"), Path(d, "k"))
    return ctx


def client_ssl() -> ssl.SSLContext:
    return ssl.create_default_context(cadata=CA.cert_pem)


def run_against(
    loop: str,
    reply: Reply,
    scenario: Callable[[Upstream, ConnectionPool], Awaitable[None]],
    *,
    tls: bool = True,
    **pool_kw: Any,
) -> None:
    """`run` `scenario` on `loop` with a scripted upstream that answers with `reply` and a pool
    to it (`pool_kw` for the pool; `tls=False`: plain TCP for both)."""

    async def main() -> None:
        async with Upstream(reply, tls=tls) as up:
            await scenario(up, up.pool(**pool_kw))

    run(loop, main)


def sends(answer: bytes, *, then_close: bool = False) -> Reply:
    """A reply that writes `answer` to every request (and then closes the connection)."""

    async def reply(conn: Conn, _head: bytes, _body: bytes) -> None:
        conn.writer.write(answer)
        await conn.writer.drain()
        if then_close:
            conn.writer.close()

    return reply


ok = sends(OK)


async def close_second(conn: Conn, head: bytes, body: bytes) -> None:
    """As an upstream whose idle timeout fires just as the second request is written."""
    if conn.requests == 2:
        conn.writer.transport.abort()
        return
    await ok(conn, head, body)


async def body_of(resp: UpstreamResponse) -> bytes:
    try:
        return await resp.read(64 * 1024 * 1024)
    finally:
        resp.release()


async def get(pool: ConnectionPool, target: str = "/api/v1/pods", **kw: Any) -> UpstreamResponse:
    return await pool.request("GET", target, kw.pop("headers", []), None, read_timeout=10, **kw)


# -- what goes out ---------------------------------------------------------------------------------


@both_loops
def test_request_head_is_the_raw_target_host_and_given_headers_only(loop: str) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        target = "/api/v1/namespaces/x/pods?labelSelector=app%3DX&watch=0"
        # A byte that is not UTF-8 arrives from aiohttp surrogate-escaped; it goes out as is.
        headers = [("Accept", "application/json"), ("X-Two", "1"), ("X-Two", "caf\udce9")]
        resp = await pool.request("GET", target, headers, None, read_timeout=10)
        assert (resp.status, resp.reason, await body_of(resp)) == (200, "OK", b"{}")
        resp = await pool.request("POST", "/api/v1/x", [], b"abc", read_timeout=10)
        await body_of(resp)
        resp = await pool.request("PUT", "/api/v1/x", [], None, read_timeout=10)
        await body_of(resp)
        await pool.close()
        assert up.heads == [
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n".encode()
            + b"Accept: application/json\r\nX-Two: 1\r\nX-Two: caf\xe9\r\n\r\n",
            f"POST /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n".encode()
            + b"Content-Length: 3\r\n\r\n",
            f"PUT /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n".encode()
            + b"Content-Length: 0\r\n\r\n",
        ]
        assert len(up.conns) == 1  # all three on one keep-alive connection

    run_against(loop, ok, scenario)


@pytest.mark.parametrize(
    ("target", "header"),
    [
        ("/api/v1/pods", ("X-Evil", "a\r\nAuthorization: Bearer stolen")),
        ("/api/v1/pods", ("X-Evil", "a\nb")),
        ("/api/v1/pods", ("X-Evil", "a\0b")),
        ("/api/v1/pods", ("X-Evil\r\nInjected", "1")),
        ("/api/v1/pods", ("X-Evil: 1\r\nInjected", "1")),
        ("/api/v1/pods", ("Authorization:Bearer stolen", "1")),  # a colon sets another header
        ("/api/v1/pods HTTP/1.1\r\nX: y", ("A", "b")),
        ("http://elsewhere/api", ("A", "b")),
        ("/api/v1/pods", ("X-Lone", "\ud800")),  # a surrogate no byte stands for
    ],
)
def test_line_breaks_and_nul_are_refused_before_anything_is_sent(
    target: str, header: tuple[str, str]
) -> None:
    if target != "/api/v1/pods":
        message = r"^refusing a request-target with spaces or control bytes$"
    elif header[1] == "\ud800":
        message = r"^refusing a header that cannot be encoded$"
    else:
        message = "^refusing a header with a line break or NUL: " + re.escape(repr(header[0])) + "$"

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        with pytest.raises(UpstreamProtocolError, match=message):
            await pool.request("GET", target, [header], None, read_timeout=10)
        assert (up.heads, up.conns, pool.open_connections) == ([], [], 0)

    run_against("uvloop", ok, scenario)


# -- what comes back -------------------------------------------------------------------------------


@both_loops
def test_a_streamed_body_is_handed_on_before_the_rest_is_sent(loop: str) -> None:
    first_seen = asyncio.Event()

    async def watch(conn: Conn, _h: bytes, _b: bytes) -> None:
        w = conn.writer
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"6\r\nevent1\r\n")
        await w.drain()
        await first_seen.wait()  # the second event exists only once the first got through
        w.write(b"6\r\nevent2\r\n0\r\n\r\n")
        await w.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await pool.request("GET", "/api/v1/pods?watch=1", [], None, read_timeout=None)
        got = []
        async for chunk in resp.chunks():
            got.append(bytes(chunk))
            first_seen.set()
        resp.release()
        assert got == [b"event1", b"event2"]
        assert pool.idle_connections == 1  # complete: kept for the next request
        await pool.close()

    run_against(loop, watch, scenario)


@both_loops
def test_a_body_cut_short_is_an_error_and_the_connection_is_dropped(loop: str) -> None:
    short = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", then_close=True)

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        got = bytearray()

        async def drain() -> None:
            async for chunk in resp.chunks():
                got.extend(chunk)

        with pytest.raises(UpstreamDisconnected, match=DISCONNECTED):
            await drain()
        resp.release()
        assert got == b"12345"
        assert (pool.open_connections, pool.idle_connections) == (0, 0)

    run_against(loop, short, scenario)


@both_loops
def test_an_answer_until_close_is_complete_at_close(loop: str) -> None:
    http10 = sends(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", then_close=True)

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"all of it"
        assert pool.open_connections == 0

    run_against(loop, http10, scenario)


@both_loops
def test_informational_answers_are_skipped_and_an_unasked_switch_is_refused(loop: str) -> None:
    async def reply(conn: Conn, head: bytes, _b: bytes) -> None:
        if b"/switch" in head:
            conn.writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        else:
            conn.writer.write(b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n")
            conn.writer.write(b"HTTP/1.1 102 Processing\r\n\r\n" + OK)
        await conn.writer.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        assert resp.status == 200
        assert "X-Early" not in resp.headers  # the 100's headers are not the answer's
        assert resp.headers["Content-Type"] == "application/json"
        assert await body_of(resp) == b"{}"
        with pytest.raises(UpstreamProtocolError):
            await get(pool, "/switch")
        assert pool.open_connections == 0  # the switched connection is gone

    run_against(loop, reply, scenario)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_unparsable_answers_are_protocol_errors(answer: bytes) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        with pytest.raises(UpstreamProtocolError, match=r"^unparsable answer \(HttpParser\w*\)$"):
            await body_of(await get(pool))
        assert pool.idle_connections == 0

    run_against("uvloop", sends(answer), scenario)


def test_a_second_answer_nobody_asked_for_retires_the_connection() -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        assert await resp.read(100) == b"{}"
        resp.release()
        assert await body_of(await get(pool)) == b"{}"
        assert len(up.conns) == 2  # the first connection was not reused

    run_against("uvloop", sends(OK + OK), scenario)


@both_loops
def test_head_answers_end_with_their_head(loop: str) -> None:
    async def reply(conn: Conn, head: bytes, _b: bytes) -> None:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        if not head.startswith(b"HEAD"):
            conn.writer.write(b"hello")
        await conn.writer.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await pool.request("HEAD", "/api", [], None, read_timeout=5)
        assert (resp.status, resp.content_length, await body_of(resp)) == (200, 5, b"")
        assert await body_of(await get(pool)) == b"hello"

    run_against(loop, reply, scenario)


# -- the pool --------------------------------------------------------------------------------------


@both_loops
def test_a_reused_connection_closed_under_a_get_is_retried_once_but_a_post_is_not(
    loop: str,
) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"{}"
        assert await body_of(await get(pool)) == b"{}"  # retried on connection 1
        assert [c.requests for c in up.conns] == [2, 1]
        # The same on connection 1 for a POST: it may have been applied, so no retry.
        with pytest.raises(UpstreamDisconnected):
            await pool.request("POST", "/api/v1/x", [], b"{}", read_timeout=5)
        assert [c.requests for c in up.conns] == [2, 2]

    run_against(loop, close_second, scenario)


def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    async def close(conn: Conn, _h: bytes, _b: bytes) -> None:
        conn.writer.transport.abort()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        with pytest.raises(UpstreamDisconnected, match=DISCONNECTED):
            await get(pool)
        assert len(up.conns) == 1

    run_against("uvloop", close, scenario)


@both_loops
def test_the_limit_bounds_connections_and_waiters_are_served_in_turn(loop: str) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        held = [await get(pool), await get(pool)]
        third = asyncio.ensure_future(get(pool))
        fourth = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0)
        assert not third.done()
        assert pool.open_connections == 2
        assert await body_of(held[0]) == b"{}"
        resp3 = await third
        assert not fourth.done()
        held[1].release()  # body unread: this connection is closed, its slot freed
        resp4 = await fourth
        assert pool.open_connections == 2
        for r in (resp3, resp4):
            await body_of(r)
        assert len(up.conns) == 3
        await pool.close()

    run_against(loop, ok, scenario, limit=2)


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        held = await get(pool)
        cancelled = asyncio.ensure_future(get(pool))
        waiting = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0)
        cancelled.cancel()
        await body_of(held)
        assert await body_of(await waiting) == b"{}"
        assert cancelled.cancelled()

    run_against("uvloop", ok, scenario, limit=1)


@both_loops
def test_waiters_keep_their_turn_when_one_ahead_gives_up(loop: str) -> None:
    """First come, first served: one that gives up before its turn moves nobody back, and one
    that gives up just as it was handed the slot hands it on."""

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        held = await get(pool)
        a, b, c = (asyncio.ensure_future(get(pool)) for _ in range(3))
        await asyncio.sleep(0)
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a  # gone from the queue before anyone is served
        assert await held.read(100) == b"{}"
        held.release()
        done, _ = await asyncio.wait({b, c}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {b}  # b came before c
        d = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0)
        assert await body_of(b.result()) == b"{}"  # the slot goes to c...
        c.cancel()  # ...which gives up before it could take it: on to d
        assert await body_of(await d) == b"{}"
        assert c.cancelled()
        assert len(up.conns) == 1

    run_against(loop, ok, scenario, limit=1)


def test_idle_connections_are_closed_after_the_keepalive_timeout() -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        await body_of(await get(pool))
        assert pool.idle_connections == 1
        assert await up.closed.get() == 0  # the server sees our close
        assert (pool.idle_connections, pool.open_connections) == (0, 0)

    run_against("uvloop", ok, scenario, keepalive_timeout=0.05)


@both_loops
def test_a_reader_that_stops_stops_the_upstream_and_the_bytes_arrive_intact(loop: str) -> None:
    payload = os.urandom(128 * HIGH_WATER)  # 32 MiB: more than the kernel buffers hold
    blocked = asyncio.Event()

    async def big(conn: Conn, _h: bytes, _b: bytes) -> None:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        conn.writer.write(payload)
        try:
            await asyncio.wait_for(conn.writer.drain(), 1.0)
        except TimeoutError:
            blocked.set()  # our reader paused: the server could not hand over everything
            await conn.writer.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        await asyncio.wait_for(blocked.wait(), 10)
        assert await body_of(resp) == payload

    # Plain TCP: a TLS server's drain() does not see the kernel's buffers fill up.
    run_against(loop, big, scenario, tls=False)


def test_no_byte_within_the_read_timeout_is_a_timeout() -> None:
    stall = sends(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await pool.request("GET", "/api", [], None, read_timeout=0.2)
        with pytest.raises(TimeoutError):
            await resp.read(100)
        # Dropped at the timeout, not when the caller gets round to releasing the answer.
        assert await asyncio.wait_for(up.closed.get(), 10) == 0
        resp.release()
        assert pool.open_connections == 0

    run_against("uvloop", stall, scenario)


@pytest.mark.parametrize("server_hostname", [None, "localhost"])
def test_the_upstream_certificate_is_verified(server_hostname: str | None) -> None:
    async def scenario() -> None:
        async with Upstream(ok) as up:
            url = URL(f"https://127.0.0.1:{up.port}")
            other = ssl.create_default_context(cadata=pki.make_ca("other").cert_pem)
            with pytest.raises(
                UpstreamConnectError, match=r"^upstream certificate rejected: unable"
            ):
                await get(ConnectionPool(url, other, server_hostname=server_hostname))
            wrong = ConnectionPool(url, client_ssl(), server_hostname="not-this.example")
            with pytest.raises(UpstreamConnectError, match=r"^upstream certificate rejected: Host"):
                await get(wrong)
            right = ConnectionPool(url, client_ssl(), server_hostname=server_hostname)
            assert await body_of(await get(right)) == b"{}"

    run("uvloop", scenario)


def test_a_refused_connection_is_a_connect_error() -> None:
    async def scenario() -> None:
        async with Upstream(ok) as up:
            port = up.port
        pool = ConnectionPool(URL(f"https://127.0.0.1:{port}"), client_ssl())
        with pytest.raises(UpstreamConnectError, match=REFUSED):
            await get(pool)
        assert pool.open_connections == 0

    run("uvloop", scenario)


# -- the parser, fed at every split ----------------------------------------------------------------

ANSWER = (
    b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n"
    b"HTTP/1.1 200 Fine Thanks\r\nContent-Type: application/json\r\n"
    b"X-Long-Header-Name: a value, with more\r\nX-Two: 1\r\nX-Two: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
)


def feed_split(data: bytes, at: int) -> tuple[_Response, _Connection]:
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, memoryview(bytearray(16)))
        conn.response = r = _Response()
        conn.head_done = loop.create_future()
        conn.data_received(data[:at])
        conn.data_received(data[at:])
        assert conn.head_done.done()
        return r, conn
    finally:
        loop.close()


@pytest.mark.parametrize("at", range(len(ANSWER) + 1))
def test_an_answer_split_anywhere_parses_the_same(at: int) -> None:
    """TCP and TLS may cut an answer anywhere, inside a header name or value too."""
    r, conn = feed_split(ANSWER, at)
    assert (r.status, r.reason, r.complete, r.error) == (200, "Fine Thanks", True, None)
    assert list(r.headers.items()) == [
        ("Content-Type", "application/json"),
        ("X-Long-Header-Name", "a value, with more"),
        ("X-Two", "1"),
        ("X-Two", "2"),
        ("Transfer-Encoding", "chunked"),
    ]
    assert b"".join(r.body) == b"abcdefg"
    assert conn.reusable


@both_loops
def test_connection_close_and_bodiless_answers_decide_reuse(loop: str) -> None:
    async def reply(conn: Conn, head: bytes, _b: bytes) -> None:
        if b"/close" in head:
            conn.writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
            )
        elif b"/204" in head:
            conn.writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif b"/304" in head:
            conn.writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
        else:
            conn.writer.write(OK)
        await conn.writer.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        for target in ("/204", "/304", "/ok"):  # no length needed: one connection for all
            await body_of(await get(pool, target))
        assert (len(up.conns), pool.idle_connections) == (1, 1)
        assert await body_of(await get(pool, "/close")) == b"{}"
        assert (pool.open_connections, pool.idle_connections) == (0, 0)
        assert await up.closed.get() == 0  # the upstream said close: the connection is gone
        await body_of(await get(pool, "/ok"))
        assert len(up.conns) == 2

    run_against(loop, reply, scenario)


# -- what the first full mutation run found untested (issue 26) ------------------------------------


def lost(conn: _Connection) -> asyncio.Future[None]:
    """A future done once `conn`'s transport has called connection_lost (after it returned, so
    anything it raised has been reported to the loop's handler, which fails the test)."""
    done = conn.loop.create_future()
    original = conn.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        try:
            original(exc)
        finally:
            done.set_result(None)

    conn.connection_lost = connection_lost  # type: ignore[method-assign]
    return done


@both_loops
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(loop: str) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        assert await resp.read(2) == b"{}"
        resp.release()
        resp = await get(pool)
        with pytest.raises(UpstreamProtocolError, match=r"^answer body longer than 1 bytes$"):
            await resp.read(1)
        resp.release()
        assert await body_of(await get(pool)) == b"{}"

    run_against(loop, ok, scenario)


@both_loops
def test_a_closed_pool_closes_its_connections_refuses_requests_and_keeps_nothing(
    loop: str,
) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        first, other = await get(pool), await get(pool)
        await body_of(first)  # its connection goes idle; `other`'s stays busy
        idle = pool._idle[0]
        assert (pool.open_connections, pool.idle_connections) == (2, 1)
        gone = lost(idle)
        await pool.close()
        assert (pool.open_connections, pool.idle_connections) == (0, 0)
        await gone
        assert sorted([await up.closed.get(), await up.closed.get()]) == [0, 1]
        # An answer that outlives its pool does not put its connection back.
        assert await other.read(100) == b"{}"  # it had come in before the close
        other.release()
        assert (pool.open_connections, pool.idle_connections) == (0, 0)
        with pytest.raises(UpstreamConnectError, match=POOL_CLOSED):
            await get(pool)
        assert len(up.conns) == 2  # nothing new was opened

    run_against(loop, ok, scenario)


@both_loops
@pytest.mark.parametrize("woken", [False, True])
def test_a_request_waiting_for_a_slot_when_the_pool_closes_is_refused(
    loop: str, woken: bool
) -> None:
    """Also when a released connection had just handed it the slot: a closed pool (shutdown, or
    the upstream configuration replaced) opens no connection afterwards."""

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        held = await get(pool)
        waiter = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0)
        assert not waiter.done()
        if woken:
            assert await held.read(100) == b"{}"
            held.release()  # idle now, and the waiter is told it may go
        await pool.close()
        with pytest.raises(UpstreamConnectError, match=POOL_CLOSED):
            await waiter
        assert (len(up.conns), pool.open_connections) == (1, 0)

    run_against(loop, ok, scenario, limit=1)


@both_loops
def test_bytes_on_an_idle_connection_retire_it_before_they_can_answer_the_next_request(
    loop: str,
) -> None:
    """An upstream (or a desynchronised proxy in front of it) that sends a second answer after the
    first was read must not have it taken as the answer to whatever is asked next."""
    released = asyncio.Event()
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"

    async def reply(conn: Conn, head: bytes, body: bytes) -> None:
        await ok(conn, head, body)
        if conn.index == 0:
            await released.wait()
            conn.writer.write(smuggled)
            await conn.writer.drain()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        await body_of(await get(pool))
        assert pool.idle_connections == 1
        released.set()
        assert await asyncio.wait_for(up.closed.get(), 10) == 0  # we hung up on it
        assert await body_of(await get(pool)) == b"{}"
        assert len(up.conns) == 2
        assert (pool.open_connections, pool.idle_connections) == (1, 1)

    run_against(loop, reply, scenario)


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.closing = False

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def test_back_pressure_holds_again_after_every_resume() -> None:
    """The upstream socket is not read while more than HIGH_WATER body bytes wait for the reader,
    every time, not only the first."""
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop, memoryview(bytearray(16)))
        transport = _FakeTransport()
        conn.connection_made(transport)
        conn.response = r = _Response()
        conn.head_done = loop.create_future()
        size = 3 * HIGH_WATER
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        resp = UpstreamResponse(cast(ConnectionPool, None), conn, r, None)
        body = resp.chunks()
        for _ in range(2):
            conn.data_received(b"x" * HIGH_WATER)
            assert transport.is_reading()  # at the mark, not above it
            conn.data_received(b"y")
            assert not transport.is_reading()
            conn.data_received(b"z")  # more already in flight: still paused, no second pause
            first = loop.run_until_complete(anext(body))
            assert first == b"x" * HIGH_WATER  # each piece as read: never joined, no extra copy
            assert transport.is_reading()  # everything buffered was taken at once
            taken = (
                first + loop.run_until_complete(anext(body)) + loop.run_until_complete(anext(body))
            )
            assert taken == b"x" * HIGH_WATER + b"yz"
            conn.drained()  # nothing buffered and not paused: nothing to resume
            assert transport.is_reading()
        conn.data_received(b"x" * (size - 2 * len(taken)))
        assert loop.run_until_complete(anext(body)) == b"x" * (size - 2 * len(taken))
        with pytest.raises(StopAsyncIteration):
            loop.run_until_complete(anext(body))
    finally:
        loop.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_host_header_names_the_upstream_as_its_url_does(family: str) -> None:
    """Bracketed for IPv6, with the port unless it is the scheme's default (as a TLS client would
    write it; kube-apiserver's own checks and any front proxy read it)."""

    async def scenario() -> None:
        host = "127.0.0.1" if family == "ipv4" else "::1"
        name = "127.0.0.1" if family == "ipv4" else "[::1]"
        async with Upstream(ok, host=host) as up:
            pool = ConnectionPool(URL(f"https://{name}:{up.port}"), client_ssl())
            await body_of(await get(pool))
            at_default = ConnectionPool(URL(f"https://{name}"), client_ssl())
            assert at_default.port == 443
            at_default.port = up.port  # the scripted upstream stands in for port 443
            await body_of(await get(at_default))
            assert [h.split(b"\r\n")[1] for h in up.heads] == [
                f"Host: {name}:{up.port}".encode(),
                f"Host: {name}".encode(),
            ]
        async with Upstream(ok, tls=False, host=host) as plain:
            at_default = ConnectionPool(URL(f"http://{name}"), False)
            assert at_default.port == 80
            at_default.port = plain.port
            await body_of(await get(at_default))
            assert plain.heads[0].split(b"\r\n")[1] == f"Host: {name}".encode()

    run("uvloop", scenario)


def test_an_upstream_that_never_finishes_the_handshake_is_a_connect_timeout() -> None:
    async def scenario() -> None:
        accepted = asyncio.Event()

        async def mute(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.set()  # TCP accepted; the TLS handshake is never answered

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(URL(f"https://127.0.0.1:{port}"), client_ssl(), connect_timeout=0.3)
        with pytest.raises(UpstreamConnectError, match=r"^connecting to the upstream timed out$"):
            await get(pool)
        assert accepted.is_set()
        assert pool.open_connections == 0
        server.close()

    run("uvloop", scenario)


@both_loops
def test_releasing_an_answer_twice_does_not_hand_its_connection_out_again(loop: str) -> None:
    """The second release comes after the connection went to another request: it must not go back
    to the pool under that request, where a third would be written onto it."""

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        first = await get(pool)
        assert await first.read(100) == b"{}"
        first.release()
        second = await get(pool)  # the same connection
        first.release()
        third = await get(pool)
        assert [c.requests for c in up.conns] == [2, 1]
        for resp in (second, third):
            assert await body_of(resp) == b"{}"
        assert (pool.open_connections, pool.idle_connections) == (2, 2)

    run_against(loop, ok, scenario)


@both_loops
def test_a_body_cut_short_while_the_reader_is_busy_is_an_error_when_it_asks_again(
    loop: str,
) -> None:
    """As a watch whose upstream goes away while the proxy is still writing the last event to a
    slow client: the error waits for the reader; nothing is reported on the loop meanwhile."""
    go, away = asyncio.Event(), asyncio.Event()

    async def reply(conn: Conn, _h: bytes, _b: bytes) -> None:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await conn.writer.drain()
        await go.wait()
        conn.writer.write(b"12345")
        await conn.writer.drain()
        await away.wait()
        conn.writer.transport.abort()

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await pool.request("GET", "/api", [], None, read_timeout=None)
        body = resp.chunks()
        first = asyncio.ensure_future(anext(body))
        await asyncio.sleep(0)  # the reader now waits for the body
        assert not first.done()
        go.set()
        assert await first == b"12345"
        gone = lost(resp._conn)
        away.set()
        await gone  # the connection went while nobody was reading
        with pytest.raises(UpstreamDisconnected):
            await anext(body)
        resp.release()
        assert pool.open_connections == 0

    run_against(loop, reply, scenario)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nxx",
            r"^the upstream switched protocols unasked$",
        ),
        (  # without Connection: Upgrade, llhttp stops at it all the same
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            r"^unparsable answer \(HttpParserError\)$",
        ),
    ],
)
def test_a_protocol_switch_nobody_asked_for_is_refused(answer: bytes, message: str) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        with pytest.raises(UpstreamProtocolError, match=message):
            await get(pool)
        assert pool.open_connections == 0
        assert await asyncio.wait_for(up.closed.get(), 10) == 0

    run_against("uvloop", sends(answer), scenario)


@both_loops
def test_answer_header_bytes_that_are_not_utf8_pass_through_unchanged(loop: str) -> None:
    reply = sends(
        b"HTTP/1.1 200 Caf\xe9\r\nX-Latin: caf\xe9\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        resp = await get(pool)
        assert resp.headers["X-Latin"].encode("utf-8", "surrogateescape") == b"caf\xe9"
        assert resp.reason.encode("utf-8", "surrogateescape") == b"Caf\xe9"
        assert resp.content_length is None  # chunked: no length to announce
        assert await body_of(resp) == b"{}"

    run_against(loop, reply, scenario)


@both_loops
def test_the_pool_connects_to_the_address_its_url_names(loop: str) -> None:
    """127.0.0.2 is loopback too, but not what a missing host would resolve to."""

    async def scenario() -> None:
        async with Upstream(ok, tls=False, host="127.0.0.2") as up:
            pool = ConnectionPool(URL(f"http://127.0.0.2:{up.port}"), False)
            assert await body_of(await get(pool)) == b"{}"
            assert up.heads[0].split(b"\r\n")[1] == f"Host: 127.0.0.2:{up.port}".encode()

    run(loop, scenario)


@both_loops
def test_a_dead_idle_connection_is_skipped_for_the_next_live_one(loop: str) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        first, second = await get(pool), await get(pool)
        for resp in (first, second):
            assert await body_of(resp) == b"{}"
        assert pool.idle_connections == 2
        top = pool._idle[-1]  # the warmest, which the next request would take
        gone = lost(top)
        up.conns[1].writer.transport.abort()  # the upstream drops it while it is idle
        await gone
        assert await body_of(await get(pool)) == b"{}"
        assert [c.requests for c in up.conns] == [2, 1]  # the other idle one, no new one
        assert (pool.open_connections, pool.idle_connections) == (1, 1)

    run_against(loop, ok, scenario)


@both_loops
def test_an_idle_connection_already_closing_is_not_used_even_for_a_post(loop: str) -> None:
    """The transport may be closing (the upstream hung up) before connection_lost has told the
    pool; a POST cannot be retried, so it must not be written onto such a connection."""

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"{}"
        idle = pool._idle[-1]
        assert idle.transport is not None
        idle.transport.close()  # as the loop does at EOF, before connection_lost runs
        resp = await pool.request("POST", "/api/v1/x", [], b"{}", read_timeout=10)
        assert await body_of(resp) == b"{}"
        assert [c.requests for c in up.conns] == [1, 1]
        assert pool.open_connections == 1

    run_against(loop, ok, scenario)


@both_loops
def test_an_idle_connection_past_its_keepalive_is_closed_even_if_its_timer_is_late(
    loop: str,
) -> None:
    """A loop busy for longer than the keep-alive timeout runs the idle timer late: the next
    request still does not use a connection the upstream may be closing."""

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"{}"
        pool._idle[-1].idle_since -= 31  # as if the loop had been stuck for 31 s
        assert await body_of(await get(pool)) == b"{}"
        assert [c.requests for c in up.conns] == [1, 1]
        assert await asyncio.wait_for(up.closed.get(), 10) == 0
        assert (pool.open_connections, pool.idle_connections) == (1, 1)

    run_against(loop, ok, scenario, keepalive_timeout=30)


@both_loops
def test_a_fresh_connection_gone_before_the_request_is_written_fails_without_writing(
    loop: str,
) -> None:
    class ClosingPool(ConnectionPool):
        async def _connect(self) -> _Connection:
            conn = await super()._connect()
            assert conn.transport is not None
            conn.transport.close()  # the upstream went away right after the handshake
            return conn

    async def scenario() -> None:
        async with Upstream(ok) as up:
            pool = ClosingPool(URL(f"https://127.0.0.1:{up.port}"), client_ssl())
            with pytest.raises(UpstreamDisconnected, match=DISCONNECTED):
                await get(pool)  # a fresh connection: not retried
            assert await asyncio.wait_for(up.closed.get(), 10) == 0
            assert (up.heads, pool.open_connections) == ([], 0)

    run(loop, scenario)


@both_loops
def test_retired_connections_are_not_kept_by_the_pool(loop: str) -> None:
    """A proxy that makes millions of upstream connections must not hold on to the dead ones."""

    close = sends(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        refs = []
        for _ in range(3):
            resp = await get(pool)
            conn = resp._conn
            refs.append(weakref.ref(conn))
            gone = lost(conn)
            assert await body_of(resp) == b"{}"
            await gone
            del resp, conn, gone
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
        assert (pool.open_connections, len(up.conns)) == (0, 3)

    run_against(loop, close, scenario)


@both_loops
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_read_on_a_reused_connection_closed_under_it_is_retried_on_a_new_one(
    loop: str, method: str
) -> None:
    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"{}"
        resp = await pool.request(method, "/api/v1/pods", [], None, read_timeout=10)
        assert resp.status == 200
        assert await body_of(resp) == (b"{}" if method == "GET" else b"")
        assert [c.requests for c in up.conns] == [2, 1]
        assert pool.open_connections == (1 if method == "GET" else 0)  # HEAD: not reused

    run_against(loop, close_second, scenario)


@both_loops
def test_a_get_is_retried_once_only(loop: str) -> None:
    """An upstream that drops every reused connection as it is written to (restarting): the GET
    is sent twice at most, then the failure is the answer."""

    async def drop_reused(conn: Conn, head: bytes, body: bytes) -> None:
        if conn.requests > 1:
            conn.writer.transport.abort()
            return
        await ok(conn, head, body)

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        first, second = await get(pool), await get(pool)
        for resp in (first, second):
            assert await body_of(resp) == b"{}"
        with pytest.raises(UpstreamDisconnected, match=DISCONNECTED):
            await get(pool)
        assert [c.requests for c in up.conns] == [2, 2]  # both idle ones tried, no third
        assert pool.open_connections == 0

    run_against(loop, drop_reused, scenario)


@both_loops
def test_a_request_given_up_before_its_answer_leaves_no_answer_for_the_next(loop: str) -> None:
    """The proxy's deadline for the upstream's head cancels the request; the upstream may still
    answer it later. That late answer must not become the answer to the next request."""
    asked, late = asyncio.Event(), asyncio.Event()

    async def slow_first(conn: Conn, head: bytes, body: bytes) -> None:
        if b"/slow" in head:
            asked.set()
            await late.wait()
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
            await conn.writer.drain()
            return
        await ok(conn, head, body)

    async def scenario(up: Upstream, pool: ConnectionPool) -> None:
        assert await body_of(await get(pool)) == b"{}"  # one idle connection to reuse
        asking = asyncio.ensure_future(get(pool, "/slow"))
        await asked.wait()  # the upstream has the request
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        late.set()
        assert await body_of(await get(pool)) == b"{}"
        assert len(up.conns) == 2

    run_against(loop, slow_first, scenario)


def test_a_connection_is_closed_if_the_upstream_speaks_first_or_goes_before_a_request() -> None:
    """Bytes before any request (a banner, an answer sent ahead) are nobody's answer; a
    connection lost before its first request is just gone."""
    loop = asyncio.new_event_loop()
    try:
        for event in ("data", "lost"):
            conn = _Connection(loop, memoryview(bytearray(16)))
            transport = _FakeTransport()
            conn.connection_made(transport)
            if event == "data":
                conn.data_received(OK)
                assert transport.closing
            else:
                conn.connection_lost(None)
            assert (conn.closed, conn.reusable) == (True, False)
    finally:
        loop.close()
