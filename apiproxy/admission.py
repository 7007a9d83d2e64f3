"""Connections before authentication: bounded in time, in number and in request-head size.

Anyone who can reach the port can open TCP connections and finish TLS without a client
certificate (JWT-only peers exist), so nothing a stranger does before a request authenticates
may hold a descriptor for long or in large numbers:

- **time**: the TLS handshake must finish within `handshake_timeout` of the accept, and then the
  complete head of the first request within `head_timeout`. Once a connection has authenticated,
  it is closed after `idle_timeout` without a request between requests, and the head of each later
  request again has `head_timeout` from its first byte. Nothing bounds a request being handled: an
  authorised watch runs its whole allowed duration.
- **number**: connections that have not authenticated yet are capped per source address (the
  excess is reset right after `accept`, before any TLS work) and in total (the oldest connection
  of the source holding the most is cut to make room, so a peer's new connection still gets in
  while strangers fill the cap). Authenticated connections do not count: a peer's own limits
  (`--max-watches-per-peer`, `--max-requests-per-peer`) are unchanged.
- **size**: aiohttp's parser refuses a request-target, a header field or a header count over the
  bounds before the handler (and so authentication) runs; the answer is a `Status` 431 (or 400
  for a malformed head), and the connection closes.
- A connection whose request did not authenticate is closed after its response (`Connection:
  close`): an unauthenticated connection carries exactly one request.

The accept loop is our own (a listening socket, `loop.connect_accepted_socket` with TLS), since
asyncio's `create_server` gives neither the source address before the handshake nor any notice
when a handshake fails or times out. It works the same on asyncio's loop and on uvloop.

Closed connections are counted by reason (`apiproxy_connections_closed_total`) and cuts are logged
as `connections_cut`, at most one line per reason per `log_interval` (counts and top sources of
the rest), so a flood cannot flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import ssl
import struct
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter, Gauge

from apiproxy import log
from apiproxy.httpserver import make_request
from apiproxy.status import status_bytes

_log = log.get_logger("apiproxy.admission")

KiB = 1024

# Why the proxy closed a connection (the `reason` label; every value is pre-created at zero).
WHY: dict[str, str] = {
    "handshake_timeout": "TLS handshake not finished within the handshake timeout",
    "handshake_failed": "TLS handshake refused: a certificate no peer anchor issued, plain HTTP,"
    " or no common TLS version or cipher",
    "head_timeout": "request head not complete within the head timeout",
    "idle_timeout": "no new request on a keep-alive connection within the idle timeout",
    "source_limit": "too many unauthenticated connections from this source address",
    "unauthenticated_limit": "too many unauthenticated connections in total: the oldest of the"
    " source holding the most was cut",
    "head_too_large": "request line, a header or the header count over the limits",
    "bad_request": "malformed request head",
    "unauthenticated": "the request did not authenticate: one request per such connection",
    "shutdown": "the proxy is stopping",
}

# Stopping is logged once by the server; a 401 is logged with its request already.
READ_BUFFER = 64 * 1024  # what TLS may decrypt at once for a client connection (records: 16 KiB)
_NOT_LOGGED = frozenset({"shutdown", "unauthenticated"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Defaults: kube-apiserver allows 32 s for the TLS handshake and 32 s for the request head
    (Go's ReadHeaderTimeout covers both, separately), 90 s idle, 1 MiB of head. We allow 10 s +
    20 s = 30 s before a request is known (client-go gives up on a handshake after 10 s itself),
    the same 90 s idle, and 16 KiB request-target + 64 fields of ≤ 16 KiB ≈ 1 MiB of head."""

    handshake_timeout: float = 10.0
    head_timeout: float = 20.0
    idle_timeout: float = 90.0
    max_unauthenticated: int = 1000
    max_unauthenticated_per_source: int = 250
    max_request_line: int = 16 * KiB  # the request-target (path and query)
    max_header_field: int = 16 * KiB  # one header: name + value
    max_headers: int = 64
    backlog: int = 1024
    log_interval: float = 10.0


def source_key(host: str) -> str:
    """The address a per-source limit counts: IPv4 as is, IPv6 by its /64 (one host usually
    owns a whole /64, so counting single addresses would bound nothing)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Conn:
    """One accepted connection, from `accept` until it is closed."""

    __slots__ = (
        "authenticated",
        "closed",
        "handler",
        "key",
        "reason",
        "since",
        "sock",
        "source",
        "task",
        "transport",
    )

    def __init__(self, source: str, key: str, sock: socket.socket) -> None:
        self.source = source
        self.key = key
        self.since = time.monotonic()
        self.sock: socket.socket | None = sock  # until the event loop owns it
        self.task: asyncio.Task[None] | None = None
        self.handler: _GatedHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.reason = ""  # set when the proxy decides to close it
        self.closed = False


class _CutLog:
    """`connections_cut` lines, at most one per reason per interval: the first cut of a quiet
    period at once, the rest summed up (count, top sources) when the interval ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._windows: dict[str, tuple[Tally[str], asyncio.TimerHandle | None]] = {}

    def note(self, reason: str, source: str) -> None:
        window = self._windows.get(reason)
        if window is None:
            _log.warning("connections_cut", reason=reason, why=WHY[reason], source=source, count=1)
            self._open(reason)
            return
        tally = window[0]
        if source in tally or len(tally) < 64:  # bounded whatever the number of sources
            tally[source] += 1
        else:
            tally["(other)"] += 1

    def _open(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.interval, self._flush, reason)
        self._windows[reason] = (Tally(), handle)

    def _flush(self, reason: str) -> None:
        tally, _ = self._windows.pop(reason)
        if tally:
            self._summary(reason, tally)
            self._open(reason)

    def _summary(self, reason: str, tally: Tally[str]) -> None:
        _log.warning(
            "connections_cut",
            reason=reason,
            why=WHY[reason],
            count=sum(tally.values()),
            sources=dict(tally.most_common(5)),
            interval_seconds=self.interval,
        )

    def close(self) -> None:
        windows, self._windows = self._windows, {}
        for reason, (tally, handle) in windows.items():
            if handle is not None:
                handle.cancel()
            if tally:  # say what is still untold before going away
                self._summary(reason, tally)


class ConnectionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.closed = Counter(
            "apiproxy_connections_closed",
            "Connections the proxy closed, by reason (handshake_timeout, head_timeout, "
            "idle_timeout, source_limit, unauthenticated_limit, head_too_large, bad_request, "
            "unauthenticated, handshake_failed, shutdown).",
            ["reason"],
            registry=registry,
        )
        for reason in WHY:
            self.closed.labels(reason)
        self.open = Gauge(
            "apiproxy_open_connections",
            "Client connections held, by whether one of their requests has authenticated.",
            ["state"],
            registry=registry,
        )
        self.unauthenticated = self.open.labels("unauthenticated")
        self.authenticated = self.open.labels("authenticated")


class Admission:
    """Owns the listener and the accounting of every client connection of one proxy."""

    def __init__(
        self, limits: Limits, registry: CollectorRegistry, ssl_context: ssl.SSLContext
    ) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.metrics = ConnectionMetrics(registry)
        self._cuts = _CutLog(limits.log_interval)
        # Unauthenticated connections by source key, each in accept order.
        self._sources: dict[str, dict[_Conn, None]] = {}
        self._unauthenticated = 0
        self._open = 0
        self._handshaking: dict[asyncio.Task[None], _Conn] = {}
        self._server: web.Server | None = None
        self._changed: asyncio.Event | None = None

    # -- what the rest of the proxy sees --------------------------------------------------------

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated

    @property
    def open_connections(self) -> int:
        return self._open

    def unauthenticated_from(self, source: str) -> int:
        return len(self._sources.get(source_key(source), ()))

    def authenticated(self, request: web.BaseRequest) -> None:
        """A request on this connection authenticated: it no longer counts as a stranger's, and
        from now on it is bounded only by the idle timeout and the peer's own limits."""
        handler = request.protocol
        conn = handler.admission_conn if isinstance(handler, _GatedHandler) else None
        if conn is None or conn.authenticated or conn.closed:
            return
        conn.authenticated = True
        self._forget(conn)
        self.metrics.authenticated.inc()
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked whenever a connection opens, authenticates
        or closes (tests await this instead of polling)."""
        while not predicate():
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def server(self, handler: Callable[[web.BaseRequest], Any]) -> web.Server:
        """The aiohttp server (connection registry, request handler) behind `site`."""
        self._server = web.Server(
            handler,
            handler_cancellation=True,
            access_log=None,
            request_factory=self._make_request,
        )
        return self._server

    def site(
        self, runner: web.BaseRunner, host: str, port: int, *, reuse_port: bool = False
    ) -> web.BaseSite:
        return _GateSite(runner, self, host, port, reuse_port)

    # -- accept ---------------------------------------------------------------------------------

    def accepted(self, sock: socket.socket, addr: Any) -> None:
        source = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        key = source_key(source)
        same = self._sources.get(key)
        if same is not None and len(same) >= self.limits.max_unauthenticated_per_source:
            self._reset(sock)
            self._count(source, "source_limit")
            return
        if self._unauthenticated >= self.limits.max_unauthenticated:
            self._evict()
        conn = _Conn(source, key, sock)
        self._sources.setdefault(key, {})[conn] = None
        self._unauthenticated += 1
        self._open += 1
        self.metrics.unauthenticated.inc()
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        conn.task = task
        self._handshaking[task] = conn
        task.add_done_callback(lambda t, c=conn: self._handshake_done(t, c))  # type: ignore[misc]
        self._notify()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # RST instead of FIN: nothing lingers in TIME_WAIT on our side for a refused stranger.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _evict(self) -> None:
        """Cut one unauthenticated connection to make room: the oldest of the source holding the
        most, so a flood from few sources pays first and a peer's fresh connection (the newest,
        from a source with few pending) is the last in line."""
        victims = max(
            self._sources.values(), key=lambda conns: (len(conns), -next(iter(conns)).since)
        )
        self.cut(next(iter(victims)), "unauthenticated_limit")

    async def _handshake(self, conn: _Conn) -> None:
        sock, conn.sock = conn.sock, None
        assert sock is not None
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        lim = self.limits
        async with asyncio.timeout(lim.handshake_timeout):
            # The handler's connection_made records the transport once TLS is up.
            await loop.connect_accepted_socket(
                lambda: _BufferedReads(self._make_handler(conn), self._read_buffer),
                sock,
                ssl=self.ssl_context,
                # Our own timeout above is the one that counts; this one only backs it up.
                ssl_handshake_timeout=lim.handshake_timeout + 5,
                # A closing connection gets this long to flush and exchange close_notify; a
                # stranger that never answers must not keep the descriptor for asyncio's 30 s.
                ssl_shutdown_timeout=lim.handshake_timeout,
            )

    def _handshake_done(self, task: asyncio.Task[None], conn: _Conn) -> None:
        self._handshaking.pop(task, None)
        if conn.sock is not None:  # cancelled before the loop took the socket over
            conn.sock.close()
            conn.sock = None
        if task.cancelled():
            self._closed(conn)
            return
        exc = task.exception()
        if exc is None:
            return
        if conn.transport is not None:  # timed out right as the handshake completed
            conn.transport.abort()
        if isinstance(exc, TimeoutError):
            self._count(conn.source, "handshake_timeout", conn)
        elif isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            pass  # the client went away mid-handshake (a TCP probe, a health check): not a cut
        elif isinstance(exc, ssl.SSLError):
            self._count(conn.source, "handshake_failed", conn)
        elif isinstance(exc, OSError | EOFError):
            pass  # the client went away
        else:  # a bug: let it be seen
            task.get_loop().call_exception_handler(
                {"message": "TLS handshake task failed", "exception": exc}
            )
        self._closed(conn)

    # -- per connection -------------------------------------------------------------------------

    @functools.cached_property
    def _read_buffer(self) -> memoryview:
        return memoryview(bytearray(READ_BUFFER))

    def _make_handler(self, conn: _Conn) -> _GatedHandler:
        assert self._server is not None
        lim = self.limits
        handler = _GatedHandler(
            self._server,
            admission=self,
            conn=conn,
            loop=asyncio.get_running_loop(),
            access_log=None,
            # aiohttp's own keep-alive timer only backs ours up (ours counts and logs).
            keepalive_timeout=lim.idle_timeout + lim.head_timeout + 5,
            max_line_size=lim.max_request_line,
            max_field_size=lim.max_header_field,
            max_headers=lim.max_headers,
        )
        conn.handler = handler
        return handler

    def _make_request(
        self,
        message: Any,
        payload: Any,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # Called by aiohttp for every complete (or unparsable) request head.
        if isinstance(protocol, _GatedHandler):
            protocol.head_complete()
        return make_request(message, payload, protocol, writer, task)  # no Server header

    def cut(self, conn: _Conn, reason: str) -> None:
        """Close `conn` now (counted for `reason` unless it was already closing for another).
        It stops counting against the caps at once: its descriptor goes on the next loop turn."""
        if conn.closed:
            return
        self._count(conn.source, reason, conn)
        self._forget(conn)
        if conn.transport is not None:
            conn.transport.abort()
        elif conn.task is not None:
            # Still in the TLS handshake: cancelling aborts it (the loop closes the socket).
            conn.task.cancel()

    def _count(self, source: str, reason: str, conn: _Conn | None = None) -> None:
        if conn is not None:
            if conn.reason:
                return
            conn.reason = reason
        self.metrics.closed.labels(reason).inc()
        if reason not in _NOT_LOGGED:
            self._cuts.note(reason, source)

    def _forget(self, conn: _Conn) -> None:
        same = self._sources.get(conn.key)
        if same is not None and same.pop(conn, False) is None:
            if not same:
                del self._sources[conn.key]
            self._unauthenticated -= 1
            self.metrics.unauthenticated.dec()

    def _closed(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._open -= 1
        if conn.authenticated:
            self.metrics.authenticated.dec()
        else:
            self._forget(conn)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def stop_handshakes(self) -> None:
        """Abort every connection still in its TLS handshake (the listener is closed)."""
        tasks = list(self._handshaking.items())
        for _, conn in tasks:
            self.cut(conn, "shutdown")
        for task, _ in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._cuts.close()


class _GatedHandler(RequestHandler):
    """aiohttp's connection protocol plus our deadlines and the close-after-401 rule."""

    def __init__(
        self, manager: web.Server, *, admission: Admission, conn: _Conn, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self.admission = admission
        self.admission_conn = conn
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_reason = ""

    def _arm(self, reason: str, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline_reason = reason
        self._deadline = self._loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_reason = ""

    def _expired(self) -> None:
        self._deadline = None
        conn = self.admission_conn
        if conn.authenticated:
            # A peer's connection: a clean TLS close, as aiohttp's keep-alive timer would.
            self.admission._count(conn.source, self._deadline_reason, conn)
            self.force_close()
        else:
            self.admission.cut(conn, self._deadline_reason)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport has the Transport methods without being a subclass.
        self.admission_conn.transport = cast(asyncio.Transport, transport)
        super().connection_made(transport)
        self._arm("head_timeout", self.admission.limits.head_timeout)

    def data_received(self, data: bytes) -> None:
        if data and self._deadline_reason == "idle_timeout":
            # The next request has begun: its head gets the head timeout, not the idle one.
            self._arm("head_timeout", self.admission.limits.head_timeout)
        super().data_received(data)

    def head_complete(self) -> None:
        self._disarm()  # a request being handled is never cut by these deadlines

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        conn = self.admission_conn
        if not conn.authenticated:
            resp.force_close()
            self.admission._count(conn.source, "unauthenticated", conn)
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if conn.authenticated and self.transport is not None:
                self._arm("idle_timeout", self.admission.limits.idle_timeout)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # An unparsable or oversized head: answered here, before any handler (or authentication)
        # runs, without aiohttp's traceback in the log.
        too_large = isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower()
        conn = self.admission_conn
        lim = self.admission.limits
        if too_large:
            code, reason = 431, "head_too_large"
            text = (
                f"request head too large: at most {lim.max_request_line} bytes of request-target,"
                f" {lim.max_header_field} bytes per header and {lim.max_headers} headers"
            )
            kind = "RequestHeaderFieldsTooLarge"
        else:
            code, reason, text, kind = 400, "bad_request", "malformed request head", "BadRequest"
        self.admission._count(conn.source, reason, conn)
        resp = web.Response(
            status=code,
            body=status_bytes(code, text, reason=kind),
            content_type="application/json",
        )
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.admission._closed(self.admission_conn)
        super().connection_lost(exc)


class _BufferedReads(asyncio.BufferedProtocol):
    """aiohttp's handler behind a buffered protocol, so TLS decrypts into one buffer shared by
    every connection (the handler gets a copy of exactly what arrived). Given a plain protocol,
    the loop's TLS layer allocates a fresh 256 KiB object per read, which glibc maps and unmaps
    (apiproxy/memory.py's fixed mmap threshold): a syscall pair and page faults per request."""

    __slots__ = ("_buffer", "handler")

    def __init__(self, handler: _GatedHandler, buffer: memoryview) -> None:
        self.handler = handler
        self._buffer = buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def eof_received(self) -> None:
        self.handler.eof_received()  # aiohttp's: None, so the transport closes

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out before the loop reads into the shared buffer again.
        self.handler.data_received(self._buffer[:nbytes].tobytes())


class _Listener:
    """The listening sockets and their accept loop (what `BaseSite._server` holds)."""

    def __init__(self, sockets: list[socket.socket], admission: Admission) -> None:
        self.sockets = sockets
        self._admission = admission
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._admission.limits.backlog):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): stop accepting
                # for a second, as asyncio's own server does, instead of spinning.
                _log.error("accept_failed", error=exc.strerror or str(exc), paused_seconds=1)
                self._pause(1.0)
                return
            self._admission.accepted(conn, addr)

    def _pause(self, seconds: float) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._paused = self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._paused = None
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()


def _bind(host: str, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # several worker processes on one port; the kernel spreads accepts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _GateSite(web.BaseSite):
    __slots__ = ("_admission", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        admission: Admission,
        host: str,
        port: int,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=admission.limits.backlog)
        self._admission = admission
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        sockets = _bind(self._host, self._port, self._backlog, self._reuse_port)
        self._server = _Listener(sockets, self._admission)  # type: ignore[assignment]

    async def stop(self) -> None:
        await super().stop()  # closes the listener
        await self._admission.stop_handshakes()


# Descriptors held whatever the traffic: listeners, epoll, audit log, watched files, stdio, Python.
FD_BASE = 64


def fd_budget(
    limits: Limits,
    *,
    peers: int,
    watches_per_peer: int,
    requests_per_peer: int,
    upstream_connections: int,
) -> int:
    """Descriptors the proxy may need at its limits: strangers up to their cap; per peer, two per
    watch (its own connection and its own upstream connection) and one per request in flight;
    the upstream pool for requests; the fixed rest. docs/proxy.md explains the sizing."""
    return (
        FD_BASE
        + limits.max_unauthenticated
        + peers * (2 * watches_per_peer + requests_per_peer)
        + upstream_connections
    )


def raise_fd_limit(needed: int) -> None:
    """Raise the soft descriptor limit to the hard one (as Go programs such as kube-apiserver do
    when they start: container runtimes often set a soft limit of 1024), and say in the log when
    even that is short of `needed`."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warning(
            "fd_limit_low",
            limit=soft,
            needed=needed,
            hint="raise the container's nofile limit or lower the per-peer and"
            " unauthenticated limits (docs/proxy.md, sizing)",
        )
    else:
        _log.info("fd_limit", limit=soft, needed=needed)


__all__ = [
    "WHY",
    "Admission",
    "ConnectionMetrics",
    "Limits",
    "fd_budget",
    "raise_fd_limit",
    "source_key",
]
