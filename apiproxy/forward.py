"""Forwarding: which headers cross the proxy, the upstream connection pool, the streaming copy.

Request headers go upstream by **allowlist** (`FORWARDED_REQUEST_HEADERS`): content negotiation,
conditional requests and the user agent. Everything else — the client's `Authorization`,
`Impersonate-*`, `X-Remote-*`, `X-Forwarded-*`, `Proxy-*`, cookies, hop-by-hop headers and any
header the client names in `Connection` — stays behind. The proxy adds its own `Authorization` and
`Audit-ID`; the upstream client adds `Host` and, for a body, `Content-Length`. Nothing else is
added: `Accept`, `Accept-Encoding`, `User-Agent` and `Content-Type` go only if the client sent them.

Bodies are bytes both ways (protobuf, JSON, gzip): no decompression, no re-encoding. Responses are
copied as they arrive (apiproxy/upstream_client.py), so a watch event never waits for the next one.

`forward` is the pipeline's last stage for an allowed, admitted request: it depends only on the
request's `Exchange` and a `ForwardContext` (upstream, pool, recorder, open streams, limits); the
pipeline writes the exchange's final record however `forward` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from apiproxy.audit import events as ev
from apiproxy.exchange import EndReason, Exchange, Recorder, UpstreamFailure
from apiproxy.streams import OpenStreams
from apiproxy.upstream import UpstreamConfig
from apiproxy.upstream_client import (
    ConnectionPool,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamResponse,
)

# A watch's own `timeoutSeconds` ends it upstream; the proxy's deadline allows this much slack.
WATCH_DEADLINE_SLACK = 30.0

FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-encoding",
        "user-agent",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
    }
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Response headers the proxy owns or that describe the upstream hop, not the response.
_DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"audit-id", "server", "date", "set-cookie", "alt-svc"}


def connection_named(headers: Mapping[str, str] | CIMultiDict[str]) -> set[str]:
    named: set[str] = set()
    getall = getattr(headers, "getall", None)
    values = getall("Connection", []) if getall else [headers.get("Connection", "")]
    for value in values:
        named.update(t.strip().lower() for t in str(value).split(",") if t.strip())
    return named


def upstream_request_headers(incoming: CIMultiDict[str] | Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers that may go upstream (allowlist, minus any named in Connection)."""
    named = connection_named(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in incoming.items():
        low = key.lower()
        if low in FORWARDED_REQUEST_HEADERS and low not in named:
            out.add(key, value)
    return out


# What a protocol switch needs on top of the allowlist (WebSocket handshake, SPDY stream versions).
UPGRADE_REQUEST_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "x-stream-protocol-version",
    }
)


def upgrade_request_headers(incoming: CIMultiDict[str] | Mapping[str, str]) -> CIMultiDict[str]:
    """`upstream_request_headers` plus what an upgrade needs: the client's `Upgrade` value,
    `Connection: Upgrade` (the proxy's, not the client's list), `Sec-WebSocket-*` and every
    `X-Stream-Protocol-Version`. Headers the client names in `Connection` still stay behind."""
    named = connection_named(incoming) - {"upgrade"}
    out = upstream_request_headers(incoming)
    for key, value in incoming.items():
        low = key.lower()
        if low in UPGRADE_REQUEST_HEADERS and low not in named:
            out.add(key, value)
    out["Upgrade"] = str(incoming.get("Upgrade", ""))
    out["Connection"] = "Upgrade"
    return out


def is_upgrade(headers: CIMultiDict[str] | Mapping[str, str]) -> bool:
    """A protocol switch (SPDY/WebSocket for exec, attach, port-forward), by any spelling."""
    if "Upgrade" in headers:
        return True
    return "upgrade" in connection_named(headers)


def downstream_response_headers(upstream: CIMultiDict[str] | Mapping[str, str]) -> CIMultiDict[str]:
    named = connection_named(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.items():
        low = key.lower()
        if low in _DROPPED_RESPONSE_HEADERS or low in named:
            continue
        out.add(key, value)
    return out


def is_watch_stream(content_type: str) -> bool:
    return "stream=watch" in content_type.replace(" ", "").lower()


class EventCounter:
    """Counts watch events in a response stream as it passes.

    JSON watch streams (`application/json`) carry one event per line, so events are newlines.
    Protobuf watch streams (`application/vnd.kubernetes.protobuf;stream=watch`) are frames of a
    4-byte big-endian length followed by that many bytes; the counter follows the frame boundaries
    exactly across chunk splits. A gzip-encoded stream is inflated for counting only (the bytes
    forwarded stay compressed): kube-apiserver 1.37 gzips WatchList streams for clients that
    accept it, as client-go and so istiod do. Another encoding, or gzip that does not inflate,
    stops the count where it is; it never affects the stream.
    """

    # Inflated bytes per step: an upstream's tiny gzip chunk must not become a huge buffer.
    INFLATE_STEP = 256 * 1024

    def __init__(self, content_type: str, content_encoding: str = "") -> None:
        ct = content_type.lower()
        enc = content_encoding.lower().strip()
        self.framed = "protobuf" in ct
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if enc == "gzip" else None
        self.countable = enc in ("", "identity") or self._inflate is not None
        self.events = 0
        self._need = 0  # protobuf: payload bytes still to skip in the current frame
        self._header = bytearray()

    def feed(self, chunk: bytes) -> None:
        if not self.countable:
            return
        inflate = self._inflate
        if inflate is None:
            self._count(chunk)
            return
        try:
            data = inflate.decompress(chunk, self.INFLATE_STEP)
            while True:
                self._count(data)
                if not inflate.unconsumed_tail:
                    break
                data = inflate.decompress(inflate.unconsumed_tail, self.INFLATE_STEP)
        except zlib.error:
            self.countable = False

    def _count(self, chunk: bytes) -> None:
        if not self.framed:
            # One memchr per event: bytes.count scans byte by byte, ten times slower on Pods.
            find = chunk.find
            i = find(b"\n")
            while i >= 0:
                self.events += 1
                i = find(b"\n", i + 1)
            return
        view = memoryview(chunk)
        i = 0
        n = len(view)
        while i < n:
            if self._need:
                step = min(self._need, n - i)
                self._need -= step
                i += step
                continue
            take = min(4 - len(self._header), n - i)
            self._header += view[i : i + take]
            i += take
            if len(self._header) == 4:
                self._need = int.from_bytes(self._header, "big")
                self._header.clear()
                self.events += 1


@dataclass
class PoolLimits:
    total: int = 1000
    connect_timeout: float = 10.0
    keepalive_timeout: float = 60.0


class UpstreamPool:
    """Keep-alive pools to the upstream for the life of the proxy: one for requests, bounded by
    `limits.total`, and one for watches (`send(..., watch=True)`), which is not: a watch holds its
    connection for up to --max-watch-seconds, so sharing the bounded pool would let open watches
    starve requests (and the pool's bound would silently cap watches). Watches are bounded by
    --max-watches-per-peer instead. The client itself is apiproxy/upstream_client.py."""

    def __init__(self, upstream: UpstreamConfig, limits: PoolLimits) -> None:
        self._upstream = upstream
        self._ssl = upstream.ssl_context()
        self.limits = limits
        self._requests: ConnectionPool | None = None
        self._watches: ConnectionPool | None = None

    def _new_pool(self, limit: int) -> ConnectionPool:
        return ConnectionPool(
            self._upstream.url,
            self._ssl,
            server_hostname=self._upstream.tls_server_name,
            limit=limit,
            connect_timeout=self.limits.connect_timeout,
            keepalive_timeout=self.limits.keepalive_timeout,
        )

    async def start(self) -> None:
        self._requests = self._new_pool(self.limits.total)
        self._watches = self._new_pool(0)  # bounded by the per-peer watch limit

    @property
    def ssl_context(self) -> ssl.SSLContext | bool:
        """The upstream TLS context (False: plain HTTP), for connections outside the pool."""
        return self._ssl

    async def close(self) -> None:
        for p in (self._requests, self._watches):
            if p is not None:
                await p.close()
        self._requests = self._watches = None

    async def send(
        self,
        method: str,
        raw_target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        read_timeout: float | None,
        watch: bool = False,
    ) -> UpstreamResponse:
        """Send a request (`raw_target` as the client sent it) and return at its answer's head."""
        pool = self._watches if watch else self._requests
        assert pool is not None, "UpstreamPool.start() not called"
        return await pool.request(
            method,
            self._upstream.request_target(raw_target),
            headers.items(),
            body,
            read_timeout=read_timeout,
        )


@dataclass
class CopyResult:
    bytes_sent: int = 0
    events: int = 0
    ended_by: str = "upstream"  # upstream | client | upstream_error


async def copy_stream(
    source: UpstreamResponse,
    write: Callable[[bytes], Awaitable[None]],
    counter: EventCounter | None,
    result: CopyResult,
) -> CopyResult:
    """Copy the upstream body to `write` as it arrives (each piece as it was read), until the
    upstream ends or writing fails (the client went away). `result` is
    updated as it goes, so a caller that is cancelled (client gone, deadline, shutdown) still
    knows how much was sent."""
    chunks = source.chunks().__aiter__()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except (UpstreamClientError, TimeoutError, ConnectionError):
            result.ended_by = "upstream_error"
            break
        if counter is not None:
            counter.feed(chunk)
            result.events = counter.events
        try:
            await write(chunk)
        except (ConnectionError, RuntimeError):
            result.ended_by = "client"
            break
        result.bytes_sent += len(chunk)
    return result


def release_quietly(resp: UpstreamResponse) -> None:
    """Done with the upstream answer: its connection goes back to the pool if the body was read
    to the end, else it is closed."""
    with contextlib.suppress(Exception):
        resp.release()


# -- forwarding one exchange ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForwardLimits:
    upstream_timeout: float  # to the response headers (all), between body reads (non-watches)
    connect_timeout: float  # to a new upstream connection (upgrades; the pool has its own)
    max_stream_seconds: float  # longest watch or upgraded session
    max_body_bytes: int


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """What forwarding needs from the proxy, and nothing else."""

    upstream: UpstreamConfig
    pool: UpstreamPool
    recorder: Recorder
    streams: OpenStreams
    limits: ForwardLimits


class _TooLarge(Exception):
    pass


class _UpstreamFailed(Exception):
    def __init__(self, kind: UpstreamFailure, error: str) -> None:
        super().__init__(kind)
        self.kind: UpstreamFailure = kind
        self.error = error


async def forward(
    ctx: ForwardContext, request: web.BaseRequest, ex: Exchange
) -> web.StreamResponse:
    """Send the request upstream with the proxy's credential and stream the answer back."""
    try:
        body = await _read_body(request, ctx.limits.max_body_bytes)
    except _TooLarge:
        return ctx.recorder.refuse(
            ex, 413, f"request body larger than {ctx.limits.max_body_bytes} bytes"
        )
    headers = upstream_request_headers(request.headers)
    ctx.upstream.authorize(headers)
    headers["Audit-ID"] = ex.audit_id
    watch = ex.verb == "watch"
    started = time.monotonic()
    try:
        up = await _send(ctx, ex, headers, body, watch)
    except _UpstreamFailed as failed:
        return ctx.recorder.upstream_failed(ex, failed.kind, failed.error)
    ctx.recorder.upstream_answered(ex, started)
    try:
        return await _stream(ctx, request, ex, up, watch)
    finally:
        release_quietly(up)


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    if not request.body_exists:
        return None
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise _TooLarge
    return bytes(data)


async def _send(
    ctx: ForwardContext,
    ex: Exchange,
    headers: CIMultiDict[str],
    body: bytes | None,
    watch: bool,
) -> UpstreamResponse:
    timeout = ctx.limits.upstream_timeout
    for attempt in (1, 2):
        try:
            # Response headers must come within the timeout even for watches, whose body has no
            # read timeout: a hung upstream must not hold a watch slot forever.
            async with asyncio.timeout(timeout):
                up = await ctx.pool.send(
                    ex.method,
                    ex.target,
                    headers,
                    body,
                    read_timeout=None if watch else timeout,
                    watch=watch,
                )
        except UpstreamConnectError as exc:
            raise _UpstreamFailed("connect", type(exc).__name__) from None
        except TimeoutError:
            raise _UpstreamFailed("timeout", "TimeoutError") from None
        except UpstreamClientError as exc:
            raise _UpstreamFailed("protocol", type(exc).__name__) from None
        # A rotated token may have been rejected before the watcher saw the new file.
        tok = ctx.upstream.token
        if (
            up.status == 401
            and attempt == 1
            and ex.method in ("GET", "HEAD")
            and tok is not None
            and tok.refresh()
        ):
            release_quietly(up)
            ctx.upstream.authorize(headers)
            continue
        return up
    raise AssertionError("unreachable: the second attempt always returns")


def _watch_deadline(ctx: ForwardContext, ex: Exchange) -> float:
    deadline = ctx.limits.max_stream_seconds
    try:
        value = URL(ex.target, encoded=True).query.get("timeoutSeconds")
        asked = float(value) if value is not None and float(value) > 0 else None
    except ValueError:
        asked = None
    return deadline if asked is None else min(asked + WATCH_DEADLINE_SLACK, deadline)


async def _stream(
    ctx: ForwardContext,
    request: web.BaseRequest,
    ex: Exchange,
    up: UpstreamResponse,
    watch: bool,
) -> web.StreamResponse:
    headers = downstream_response_headers(up.headers)
    headers["Audit-ID"] = ex.audit_id
    streaming = watch and up.status == 200
    if streaming:
        headers.popall("Content-Length", None)
    resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
    if not watch and up.content_length is not None:
        # A fixed-length body: send the headers together with its first bytes (or at the end
        # for an empty body), one TLS record and one socket write for a small response instead
        # of two, as aiohttp's own web.Response does. Open-ended (chunked) answers such as
        # `logs?follow=true`, and watches, still get their headers at once.
        resp._send_headers_immediately = False
    result = CopyResult()
    try:
        try:
            await resp.prepare(request)
        except ConnectionError:
            ex.end(EndReason.CLIENT)
            return resp
        ex.code = up.status
        if watch:
            ex.streamed = True
            await ctx.recorder.started(ex, up.status)
        counter = (
            EventCounter(up.headers.get("Content-Type", ""), up.headers.get("Content-Encoding", ""))
            if streaming
            else None
        )
        deadline = _watch_deadline(ctx, ex) if watch else None
        async with ctx.streams.bounded(ex, deadline):
            await copy_stream(up, resp.write, counter, result)
        if ex.ended_by is not None:  # deadline, revocation or shutdown: end the body cleanly
            pass
        elif result.ended_by == "client":
            ex.end(EndReason.CLIENT)
            return resp
        elif result.ended_by == "upstream_error":
            ctx.recorder.upstream_reset()
            ex.end(EndReason.UPSTREAM_ERROR)
            if not streaming:
                # A truncated fixed-length body must not look complete: drop the connection.
                if request.transport is not None:
                    request.transport.close()
                return resp
        else:
            ex.end(EndReason.UPSTREAM if watch else EndReason.COMPLETED)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp
    finally:
        if watch:
            ex.annotations[ev.WATCH_EVENTS] = result.events
            ex.annotations[ev.WATCH_DURATION] = round(time.monotonic() - ex.started, 3)
        ctx.recorder.body_sent(ex, result.bytes_sent, result.events if watch else None)
