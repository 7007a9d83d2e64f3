"""The HTTP/1.1 client the proxy forwards with: asyncio protocols, llhttp (httptools), keep-alive.

A general client (aiohttp's `ClientSession`) builds a request object, a connector key, a cookie
jar lookup, a timer context and a response object with its own stream reader for every request;
that machinery was a fifth of the proxy's CPU per small GET. The proxy needs far less: one origin,
a raw request-target it has already classified, headers it has already filtered, and a body that
is copied through as bytes. So this client writes the request head with one `transport.write`,
parses the answer with llhttp, and hands the body on as it arrives (every chunk that came in
since the reader last woke, joined, so a watch costs one wake-up and one write per burst of
events, not per TCP segment).

Connections are kept alive and reused LIFO (the warmest first), closed after `keepalive_timeout`
idle seconds, and bounded by `limit` (0: unbounded; waiters queue in order). A request that fails
before any answer byte on a *reused* connection is retried once on a fresh one if it is a GET or
HEAD: the upstream may have closed the idle connection just as we wrote to it. Nothing else is
retried.

Fail closed: a header name or value with CR, LF or NUL is refused before anything is written; an
answer llhttp cannot parse, an unexpected protocol switch, or a body cut short is an error, never
a short body that looks complete.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

READ_BUFFER = 64 * 1024  # what the loop may read at once (TLS records are at most 16 KiB)
# Buffered body bytes above which the upstream socket stops being read (back-pressure to the
# upstream's TCP window) until the reader has taken them.
HIGH_WATER = 256 * 1024
_BAD_HEADER_BYTES = ("\r", "\n", "\0")
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


class UpstreamClientError(Exception):
    """The exchange with the upstream failed (the message is safe to log: no header values)."""


class UpstreamConnectError(UpstreamClientError):
    """No connection could be made (refused, unreachable, TLS handshake or certificate failed)."""


class UpstreamProtocolError(UpstreamClientError):
    """The upstream's answer is not valid HTTP/1.1, or it switched protocols unasked."""


class UpstreamDisconnected(UpstreamClientError):
    """The connection closed before the answer (or its body) was complete."""


class _Response:
    """One answer being read. Body bytes arrive through `_Connection` and are taken by
    `UpstreamResponse.chunks`."""

    __slots__ = (
        "body",
        "body_size",
        "complete",
        "error",
        "headers",
        "reason",
        "status",
        "until_eof",
        "waiter",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.body: collections.deque[bytes] = collections.deque()
        self.body_size = 0
        self.complete = False
        self.until_eof = False  # no length, not chunked: the body ends when the connection does
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection: the transport, its llhttp parser, the answer in progress.

    A buffered protocol, so the loop decrypts straight into the pool's read buffer: as a plain
    protocol, uvloop's TLS layer allocates a fresh 256 KiB object per read, which glibc serves
    with mmap and munmap (apiproxy/memory.py) - a quarter of the proxy's CPU under watch churn.
    The buffer is shared by the pool's connections: it is parsed, and the body copied out of it,
    before the loop reads into it again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer: memoryview) -> None:
        self.loop = loop
        self._buffer = buffer
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: _Response | None = None
        self.head_done: asyncio.Future[None] | None = None
        self.closed = False
        self.reusable = True
        self.paused = False
        self.used = 0  # answers read so far (0: a fresh connection)
        self.idle_since = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the answer

    def data_received(self, data: bytes | memoryview) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"unparsable answer ({type(exc).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        r = self.response
        if r is not None and not r.complete and r.error is None:
            if r.until_eof and r.status:
                r.complete = True
            else:
                r.error = UpstreamDisconnected("the upstream closed the connection")
            r.wake()
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_exception(UpstreamDisconnected("the upstream closed the connection"))

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        r = self.response
        if r is None or r.complete:
            # A second answer to one request: stop parsing; the connection is not reused.
            raise UpstreamProtocolError("the upstream sent an answer nobody asked for")

    def on_status(self, status: bytes) -> None:
        assert self.response is not None
        self.response.reason += status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools joins a name or value split across reads before it calls this.
        assert self.response is not None
        self.response.headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )

    def on_headers_complete(self) -> None:
        r = self.response
        assert r is not None
        r.status = self.parser.get_status_code()
        if 100 <= r.status < 200:  # 1xx before the final answer: forget it and read on
            r.reason = ""
            r.headers = CIMultiDict()
            return
        if not self.parser.should_keep_alive():
            self.reusable = False
        te = r.headers.get("Transfer-Encoding", "").lower()
        if "Content-Length" not in r.headers and "chunked" not in te and r.status not in (204, 304):
            r.until_eof = True
            self.reusable = False
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        r = self.response
        assert r is not None
        r.body.append(body)
        r.body_size += len(body)
        if r.body_size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        r.wake()

    def on_message_complete(self) -> None:
        r = self.response
        assert r is not None
        if 100 <= r.status < 200:
            return
        r.complete = True
        r.wake()

    # -- used by the pool and the response ----------------------------------------------------

    def _fail(self, exc: UpstreamClientError) -> None:
        r = self.response
        if r is not None and r.error is None and not r.complete:
            r.error = exc
            r.wake()
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_exception(exc)
        self.close()

    def drained(self) -> None:
        """The reader took everything buffered: read from the upstream again."""
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class UpstreamResponse:
    """The upstream's answer: status, reason, headers, and a body to read once."""

    __slots__ = ("_conn", "_pool", "_r", "_read_timeout", "_released", "headers")

    def __init__(
        self, pool: ConnectionPool, conn: _Connection, r: _Response, read_timeout: float | None
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._r = r
        self._read_timeout = read_timeout
        self._released = False
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(r.headers)

    @property
    def status(self) -> int:
        return self._r.status

    @property
    def reason(self) -> str:
        return self._r.reason

    @property
    def content_length(self) -> int | None:
        value = self._r.headers.get("Content-Length")
        if value is None or not (value.isascii() and value.isdigit()):
            return None
        return int(value)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each piece as it was read (at most READ_BUFFER bytes).
        Raises UpstreamDisconnected/UpstreamProtocolError if the body is cut short or broken,
        TimeoutError if no byte comes within the read timeout."""
        r = self._r
        conn = self._conn
        loop = conn.loop
        while True:
            if r.body:
                # Not joined: joining up to HIGH_WATER + READ_BUFFER bytes per wake-up made glibc
                # map fresh memory for nearly every byte of a large answer, and the page faults
                # were half of a pass-through LIST's CPU (docs/performance.md).
                pieces = list(r.body)
                r.body.clear()
                r.body_size = 0
                conn.drained()
                for data in pieces:
                    yield data
                continue
            if r.complete:
                return
            if r.error is not None:
                raise r.error
            r.waiter = loop.create_future()
            timer = (
                loop.call_later(self._read_timeout, self._timed_out, r.waiter)
                if self._read_timeout is not None
                else None
            )
            try:
                await r.waiter
            finally:
                r.waiter = None
                if timer is not None:
                    timer.cancel()

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())
            self._conn.abort()

    async def read(self, limit: int) -> bytes:
        """The whole body, or UpstreamProtocolError if it is longer than `limit` bytes."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise UpstreamProtocolError(f"answer body longer than {limit} bytes")
        return bytes(data)

    def release(self) -> None:
        """Done with this answer: a fully read body on a keep-alive connection goes back to the
        pool; anything else closes the connection (an unread rest must not reach the next)."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._conn, self._r.complete and not self._r.body)


class ConnectionPool:
    """Keep-alive connections to one upstream origin."""

    def __init__(
        self,
        url: URL,
        ssl_context: ssl.SSLContext | bool,
        *,
        server_hostname: str | None = None,
        limit: int = 0,
        connect_timeout: float = 10.0,
        keepalive_timeout: float = 60.0,
    ) -> None:
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl_context if isinstance(ssl_context, ssl.SSLContext) else None
        self._server_hostname = (server_hostname or self.host) if self._ssl is not None else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if url.scheme == "https" else 80
        host_header = host if self.port == default_port else f"{host}:{self.port}"
        self._host_line = f"Host: {host_header}\r\n"
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self._idle: list[_Connection] = []
        self._open = 0  # connections counted against `limit` (busy, idle or connecting)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._busy: set[_Connection] = set()
        self._closed = False
        self._buffer = memoryview(bytearray(READ_BUFFER))

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        *,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        """Send one request and return once the answer's head has arrived (the body streams).
        `target` is the origin-form request-target, sent byte for byte."""
        head = self._head(method, target, headers, body)
        retry = method in ("GET", "HEAD")
        while True:
            conn = await self._acquire()
            fresh = conn.used == 0
            try:
                return await self._exchange(conn, method, head, body, read_timeout)
            except UpstreamDisconnected:
                self._release(conn, False)
                if fresh or not retry:
                    raise
                retry = False  # once, on a connection we know to be new
            except BaseException:
                self._release(conn, False)
                raise

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        if not target.startswith("/") or any(c in target for c in " \r\n\0"):
            raise UpstreamProtocolError("refusing a request-target with spaces or control bytes")
        parts = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        for name, value in headers:
            if any(c in name or c in value for c in _BAD_HEADER_BYTES) or ":" in name:
                raise UpstreamProtocolError(f"refusing a header with a line break or NUL: {name!r}")
            parts.append(f"{name}: {value}\r\n")
        if body:
            parts.append(f"Content-Length: {len(body)}\r\n")
        elif method not in _NO_BODY_METHODS:
            parts.append("Content-Length: 0\r\n")
        parts.append("\r\n")
        # Header bytes as they came (aiohttp decodes them as UTF-8 with surrogateescape).
        try:
            return "".join(parts).encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise UpstreamProtocolError("refusing a header that cannot be encoded") from None

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | None,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        loop = conn.loop
        r = _Response()
        conn.response = r
        conn.head_done = loop.create_future()
        if method == "HEAD":
            # llhttp cannot be told the answer to HEAD has no body; such a connection is not
            # reused, and the answer is complete with its head.
            conn.reusable = False
        transport = conn.transport
        assert transport is not None
        if conn.closed or transport.is_closing():
            raise UpstreamDisconnected("the upstream closed the connection")
        transport.write(head + body if body else head)
        await conn.head_done
        if method == "HEAD":
            r.complete = True
            r.body.clear()
        conn.used += 1
        return UpstreamResponse(self, conn, r, read_timeout)

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                self._forget(conn)
                continue
            if now - conn.idle_since > self.keepalive_timeout:
                conn.close()
                self._forget(conn)
                continue
            self._busy.add(conn)
            return conn
        while self.limit and self._open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were handed a slot and leave: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._closed:  # woken by a release just before the pool closed
                raise UpstreamConnectError("the upstream pool is closed")
            if self._idle:
                return await self._acquire()
        self._open += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        self._busy.add(conn)
        return conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._buffer),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except TimeoutError:
            raise UpstreamConnectError("connecting to the upstream timed out") from None
        except ssl.SSLCertVerificationError as exc:
            msg = f"upstream certificate rejected: {exc.verify_message}"
            raise UpstreamConnectError(msg) from None
        except (OSError, ssl.SSLError) as exc:
            msg = f"cannot connect to the upstream ({type(exc).__name__})"
            raise UpstreamConnectError(msg) from None
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        conn.response = None
        conn.head_done = None
        if reusable and conn.reusable and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            conn.idle_timer = conn.loop.call_later(self.keepalive_timeout, self._expire, conn)
            self._idle.append(conn)
        else:
            conn.close()
            self._forget(conn)
            return
        self._wake_one()

    def _expire(self, conn: _Connection) -> None:
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
            conn.close()
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._idle) + list(self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()
        self._open = 0
        for w in self._waiters:
            if not w.done():
                w.set_exception(UpstreamConnectError("the upstream pool is closed"))
        self._waiters.clear()
