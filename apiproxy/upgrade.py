"""Protocol upgrades: exec, attach, port-forward (and proxy) over WebSocket or SPDY, relayed raw.

Only reached when a `dangerous: true` rule allows the request (server.py refuses every other
upgrade with 403). Behaviour follows kube-apiserver's `UpgradeAwareHandler`
(k8s.io/apimachinery/pkg/util/proxy/upgradeaware.go):

1. The request must be an HTTP/1.1 `Connection: Upgrade` + `Upgrade: websocket|SPDY/3.1` request
   without a body, for an `exec`, `attach`, `portforward` or `proxy` subresource. Anything else is
   refused before the upstream is contacted (`h2c` in particular: after an HTTP/2 switch the client
   could send any request on a connection that carries the proxy's identity).
2. A fresh upstream connection (`asyncio.open_connection` with the pool's TLS context; never a
   pooled one) gets the request line with the raw request-target exactly as classified, `Host`,
   the allowlisted headers plus the upgrade headers (`forward.upgrade_request_headers`), the
   proxy's `Authorization` and `Audit-ID`.
3. The upstream's status line and headers are parsed here (bounded by `MAX_HEAD_BYTES`). Anything
   but `101` is relayed as an ordinary response (body bounded by `MAX_REFUSAL_BODY`) and the client
   connection is closed afterwards, as kube-apiserver does.
4. On `101` the client gets `101` with the upstream's upgrade headers, then bytes are spliced both
   ways until either side closes, the deadline (`--max-watch-seconds`) passes or the proxy shuts
   down. Bytes are counted both ways for the audit record.

How the client's post-upgrade bytes are read: aiohttp has no public "hijack". Its request handler
(`web_protocol.RequestHandler`) hands every byte that arrives after `set_parser(p)` to
`p.feed_data()` instead of its HTTP parser, and calls `p.feed_eof()` when the connection is lost;
`WebSocketResponse` relies on exactly this. `attach_client_stream` is the only place that touches
it (tests/proxy/test_upgrade.py::test_aiohttp_set_parser_contract fails loudly if it changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from apiproxy.audit import events as ev
from apiproxy.exchange import EndReason, Exchange
from apiproxy.forward import ForwardContext, downstream_response_headers, upgrade_request_headers

PROTOCOLS = frozenset({"websocket", "spdy/3.1"})  # what exec/attach/port-forward clients use
SUBRESOURCES = frozenset({"exec", "attach", "portforward", "proxy"})
MAX_HEAD_BYTES = 64 * 1024  # upstream status line + headers, and each chunk-size line
MAX_REFUSAL_BODY = 1024 * 1024  # body of a non-101 upstream answer
CHUNK = 64 * 1024
CLIENT_BUFFER = 256 * 1024  # client bytes buffered before the client socket stops being read


class UpgradeRefused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 we accept (reason is safe to log)."""


def check_request(request: web.BaseRequest, subresource: str) -> str:
    """The requested protocol, if this upgrade may be relayed; else `UpgradeRefused`."""
    wanted = request.headers.getall("Upgrade", [])
    connection = ",".join(request.headers.getall("Connection", [])).lower()
    if request.version != (1, 1):
        raise UpgradeRefused(400, "protocol upgrades need HTTP/1.1")
    if len(wanted) != 1 or "upgrade" not in {t.strip() for t in connection.split(",")}:
        raise UpgradeRefused(400, "a protocol upgrade needs one Upgrade and Connection: Upgrade")
    protocol = wanted[0].strip()
    if protocol.lower() not in PROTOCOLS:
        raise UpgradeRefused(400, f"protocol upgrade to {protocol[:40]!r} is not supported")
    if subresource not in SUBRESOURCES:
        raise UpgradeRefused(
            403, "protocol upgrades are only relayed for exec, attach, portforward and proxy"
        )
    if request.body_exists:
        raise UpgradeRefused(400, "a protocol upgrade request must not have a body")
    return protocol


# -- the upstream side ---------------------------------------------------------------------------


@dataclass
class UpstreamHead:
    status: int
    reason: str
    headers: CIMultiDict[str]


def _encode(value: str) -> bytes:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this restores them exactly.
    data = value.encode("utf-8", "surrogateescape")
    if any(b in data for b in (b"\r", b"\n", b"\0")):
        raise UpgradeRefused(400, "control characters in a header")
    return data


def host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def request_head(method: str, url: URL, raw_target: str, headers: CIMultiDict[str]) -> bytes:
    """The upstream request line and headers; the target is the classified bytes, unchanged."""
    target = url.raw_path.rstrip("/") + raw_target
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise UpgradeRefused(400, "invalid request target")
    lines = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + _encode(host_header(url))]
    lines += [_encode(k) + b": " + _encode(v) for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_head(data: bytes) -> UpstreamHead:
    lines = data[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise UpstreamProtocolError("bad status line")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise UpstreamProtocolError("bad header line")
        headers.add(name.decode("latin-1"), value.strip(b" \t").decode("latin-1"))
    return UpstreamHead(int(code), reason.decode("latin-1"), headers)


async def read_head(reader: asyncio.StreamReader) -> UpstreamHead:
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise UpstreamProtocolError("response head too large") from None
    except asyncio.IncompleteReadError:
        raise UpstreamProtocolError("connection closed before a response") from None
    return parse_head(data)


async def read_body(reader: asyncio.StreamReader, head: UpstreamHead, method: str) -> bytes:
    """The body of a non-101 answer (Content-Length, chunked or until EOF), at most
    `MAX_REFUSAL_BODY` bytes."""
    if head.status in (204, 304) or head.status < 200 or method == "HEAD":
        return b""
    try:
        te = ",".join(head.headers.getall("Transfer-Encoding", [])).lower()
        if te:
            if [t.strip() for t in te.split(",")][-1] != "chunked":
                raise UpstreamProtocolError("unsupported transfer-encoding")
            return await _read_chunked(reader)
        lengths = set(head.headers.getall("Content-Length", []))
        if lengths:
            value = lengths.pop()
            if lengths or not value.isdigit():
                raise UpstreamProtocolError("bad content-length")
            if int(value) > MAX_REFUSAL_BODY:
                raise UpstreamProtocolError("response body too large")
            return await reader.readexactly(int(value))
        data = await reader.read(MAX_REFUSAL_BODY + 1)
        while data and len(data) <= MAX_REFUSAL_BODY:
            more = await reader.read(MAX_REFUSAL_BODY + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > MAX_REFUSAL_BODY:
            raise UpstreamProtocolError("response body too large")
        return data
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise UpstreamProtocolError("response body cut short") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = (await reader.readuntil(b"\r\n"))[:-2]
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise UpstreamProtocolError("bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, dropped
                pass
            return bytes(body)
        if len(body) + size > MAX_REFUSAL_BODY:
            raise UpstreamProtocolError("response body too large")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise UpstreamProtocolError("bad chunk end")


class UpstreamConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def aclose(self) -> None:
        """Close (TLS close_notify, then FIN); wait a moment for it, never for long."""
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(2.0):
                await self.writer.wait_closed()


async def connect(
    url: URL, ssl_context: ssl.SSLContext | bool, server_hostname: str | None
) -> UpstreamConnection:
    """A new connection to the upstream (OSError when it cannot be reached)."""
    tls = ssl_context if isinstance(ssl_context, ssl.SSLContext) else None
    reader, writer = await asyncio.open_connection(
        url.raw_host,
        url.port,
        ssl=tls,
        server_hostname=(server_hostname or url.raw_host) if tls is not None else None,
        limit=MAX_HEAD_BYTES,
    )
    return UpstreamConnection(reader, writer)


# -- the client side -----------------------------------------------------------------------------


class ClientStream:
    """The client's bytes after the upgrade. aiohttp calls `feed_data`/`feed_eof` (it takes this
    for a payload parser); the relay awaits `read()`. Beyond `limit` buffered bytes the client
    socket is paused until the relay catches up."""

    def __init__(self, transport: asyncio.Transport | None, limit: int = CLIENT_BUFFER) -> None:
        self._transport = transport
        self._limit = limit
        self._buf = bytearray()
        self._eof = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self._eof:
            self._buf += data
            if len(self._buf) >= self._limit and not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()
            self._wake()
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """Whatever has arrived (waiting for something); b"" once the client is gone."""
        while not self._buf and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused:
            self._paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return data


def attach_client_stream(request: web.BaseRequest) -> ClientStream:
    """Route the client's bytes after this request to a `ClientStream`, as `WebSocketResponse`
    does (`RequestHandler.set_parser`; undocumented but not underscored, stable since aiohttp 3.0).
    Call right before sending 101, so no client byte can reach aiohttp's HTTP parser. Also ends
    HTTP keep-alive: the connection belongs to the tunnel now."""
    protocol = request.protocol
    stream = ClientStream(request.transport)
    protocol.set_parser(cast(Any, stream))
    protocol.keep_alive(False)
    return stream


# -- the splice ----------------------------------------------------------------------------------


SpliceEnd = Literal["upstream", "client", "upstream_error"]


@dataclass
class SpliceResult:
    to_client: int = 0
    to_upstream: int = 0
    ended_by: SpliceEnd = "upstream"


async def splice(
    client: ClientStream, resp: web.StreamResponse, up: UpstreamConnection, result: SpliceResult
) -> None:
    """Copy bytes both ways until either side ends; both copies are finished on return."""

    async def downstream() -> SpliceEnd:
        while True:
            try:
                chunk = await up.reader.read(CHUNK)
            except (OSError, ssl.SSLError):
                return "upstream_error"
            if not chunk:
                return "upstream"
            try:
                await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                return "client"
            result.to_client += len(chunk)

    async def upstream() -> SpliceEnd:
        while True:
            chunk = await client.read()
            if not chunk:
                return "client"
            try:
                up.writer.write(chunk)
                await up.writer.drain()
            except (OSError, ssl.SSLError, RuntimeError):
                return "upstream_error"
            result.to_upstream += len(chunk)

    tasks = [
        asyncio.create_task(downstream(), name="apiproxy-upgrade-downstream"),
        asyncio.create_task(upstream(), name="apiproxy-upgrade-upstream"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        result.ended_by = next(t for t in tasks if t in done).result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the handler ---------------------------------------------------------------------------------


async def relay(ctx: ForwardContext, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
    """Relay an upgrade request that a dangerous rule allows (see the module docstring)."""
    info = ex.info
    assert info is not None, "an upgrade is relayed only after classification"
    try:
        protocol = check_request(request, info.subresource if info.is_resource_request else "")
        headers = upgrade_request_headers(request.headers)
        ctx.upstream.authorize(headers)
        headers["Audit-ID"] = ex.audit_id
        head = request_head(ex.method, ctx.upstream.url, ex.target, headers)
    except UpgradeRefused as exc:
        if exc.code == 403:
            ex.forbid(exc.message)
        return ctx.recorder.refuse(ex, exc.code, exc.message)
    ex.annotations[ev.UPGRADE] = protocol
    started = time.monotonic()
    try:
        async with asyncio.timeout(ctx.limits.connect_timeout):
            up = await connect(ctx.upstream.url, ctx.pool.ssl_context, ctx.upstream.tls_server_name)
    except TimeoutError:
        return ctx.recorder.upstream_failed(ex, "timeout", "TimeoutError")
    except OSError as exc:
        return ctx.recorder.upstream_failed(ex, "connect", type(exc).__name__)
    try:
        try:
            async with asyncio.timeout(ctx.limits.upstream_timeout):
                up.writer.write(head)
                await up.writer.drain()
                answer = await read_head(up.reader)
                if answer.status < 200 and answer.status != 101:
                    raise UpstreamProtocolError("unexpected informational response")
                body = (
                    b"" if answer.status == 101 else await read_body(up.reader, answer, ex.method)
                )
        except TimeoutError:
            return ctx.recorder.upstream_failed(ex, "timeout", "TimeoutError")
        except (UpstreamProtocolError, OSError, ssl.SSLError) as exc:
            return ctx.recorder.upstream_failed(ex, "protocol", str(exc)[:100])
        ctx.recorder.upstream_answered(ex, started)
        if answer.status != 101:
            return _relay_answer(ctx, ex, answer, body)
        if answer.headers.get("Upgrade", "").strip().lower() != protocol.lower():
            return ctx.recorder.upstream_failed(
                ex,
                "protocol",
                "switched to another protocol",
                "upstream API server switched to another protocol",
            )
        return await _tunnel(ctx, request, ex, answer, up)
    finally:
        await up.aclose()


def _relay_answer(
    ctx: ForwardContext, ex: Exchange, answer: UpstreamHead, body: bytes
) -> web.StreamResponse:
    """A non-101 answer, passed on like any response; the client connection closes after it."""
    resp = web.Response(status=answer.status, reason=answer.reason or None, body=body)
    for k, v in downstream_response_headers(answer.headers).items():
        if k.lower() != "content-length":
            resp.headers.add(k, v)
    resp.headers["Audit-ID"] = ex.audit_id
    resp.force_close()
    ex.bytes_sent = len(body)
    ex.end(EndReason.COMPLETED, answer.status)
    return resp


async def _tunnel(
    ctx: ForwardContext,
    request: web.BaseRequest,
    ex: Exchange,
    answer: UpstreamHead,
    up: UpstreamConnection,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=101, reason=answer.reason or "Switching Protocols")
    for k, v in downstream_response_headers(answer.headers).items():
        resp.headers.add(k, v)
    resp.headers["Upgrade"] = answer.headers["Upgrade"]
    resp.headers["Connection"] = "Upgrade"
    resp.headers["Audit-ID"] = ex.audit_id
    resp.force_close()
    result = SpliceResult()
    started = time.monotonic()
    try:
        client = attach_client_stream(request)
        try:
            await resp.prepare(request)
        except (ConnectionError, RuntimeError):
            ex.end(EndReason.CLIENT)
            return resp
        ex.streamed = True
        await ctx.recorder.started(ex, 101)
        async with ctx.streams.bounded(ex, ctx.limits.max_stream_seconds):
            await splice(client, resp, up, result)
        if result.ended_by == "upstream_error":
            ctx.recorder.upstream_reset()
        ex.end(_SPLICE_ENDS[result.ended_by])
        return resp
    finally:
        ex.annotations[ev.BYTES_RECEIVED] = result.to_upstream
        ex.annotations[ev.STREAM_DURATION] = round(time.monotonic() - started, 3)
        ctx.recorder.body_sent(ex, result.to_client)


_SPLICE_ENDS = {
    "upstream": EndReason.UPSTREAM,
    "client": EndReason.CLIENT,
    "upstream_error": EndReason.UPSTREAM_ERROR,
}
