"""Forwarding: which headers cross the proxy, the upstream connection pool, the streaming copy.

Request headers go upstream by **allowlist** (`FORWARDED_REQUEST_HEADERS`): content negotiation,
conditional requests and the user agent. Everything else — the client's `Authorization`,
`Impersonate-*`, `X-Remote-*`, `X-Forwarded-*`, `Proxy-*`, cookies, hop-by-hop headers and any
header the client names in `Connection` — stays behind. The proxy adds its own `Authorization` and
`Audit-ID`; aiohttp adds `Host` and, for a body, `Content-Length`. Nothing else is auto-added:
`Accept`, `Accept-Encoding`, `User-Agent` and `Content-Type` are sent only if the client sent them.

Bodies are bytes both ways (protobuf, JSON, gzip): no decompression, no re-encoding. Responses are
copied chunk by chunk as they arrive (`iter_any`), so a watch event never waits for the next one.

`forward` is the pipeline's last stage for an allowed, admitted request: it depends only on the
request's `Exchange` and a `ForwardContext` (upstream, pool, recorder, open streams, limits); the
pipeline writes the exchange's final record however `forward` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from apiproxy.audit import events as ev
from apiproxy.exchange import EndReason, Exchange, Recorder, UpstreamFailure
from apiproxy.streams import OpenStreams
from apiproxy.upstream import UpstreamConfig

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
# aiohttp would otherwise add these itself; they must mirror the client's choice exactly.
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


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
    exactly across chunk splits. A gzip-encoded stream cannot be counted without decoding; it is
    reported as 0 events (watches are not gzip-encoded by kube-apiserver).
    """

    def __init__(self, content_type: str, content_encoding: str = "") -> None:
        ct = content_type.lower()
        self.framed = "protobuf" in ct
        self.countable = not content_encoding or content_encoding.lower() == "identity"
        self.events = 0
        self._need = 0  # protobuf: payload bytes still to skip in the current frame
        self._header = bytearray()

    def feed(self, chunk: bytes) -> None:
        if not self.countable:
            return
        if not self.framed:
            self.events += chunk.count(b"\n")
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
    per_host: int = 0  # 0: no per-host cap beyond `total`
    connect_timeout: float = 10.0
    keepalive_timeout: float = 60.0


class UpstreamPool:
    """Keep-alive pools to the upstream for the life of the proxy: one for requests, bounded by
    `limits.total`, and one for watches (`send(..., watch=True)`), which is not: a watch holds its
    connection for up to --max-watch-seconds, so sharing the bounded pool would let open watches
    starve requests (and the pool's bound would silently cap watches). Watches are bounded by
    --max-watches-per-peer instead."""

    def __init__(self, ssl_context: ssl.SSLContext | bool, limits: PoolLimits) -> None:
        self._ssl = ssl_context
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    def _new_session(self, limit: int, limit_per_host: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl,
            limit=limit,
            limit_per_host=limit_per_host,
            keepalive_timeout=self.limits.keepalive_timeout,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def start(self) -> None:
        self._session = self._new_session(self.limits.total, self.limits.per_host)
        self._watch_session = self._new_session(0, 0)  # bounded by the per-peer watch limit

    @property
    def ssl_context(self) -> ssl.SSLContext | bool:
        """The upstream TLS context (False: plain HTTP), for connections outside the pool."""
        return self._ssl

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamPool.start() not called"
        return self._session

    async def close(self) -> None:
        for s in (self._session, self._watch_session):
            if s is not None:
                await s.close()
        self._session = self._watch_session = None

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        read_timeout: float | None,
        server_hostname: str | None = None,
        watch: bool = False,
    ) -> aiohttp.ClientResponse:
        timeout = self._timeouts.get(read_timeout)
        if timeout is None:  # a handful of distinct values: build each ClientTimeout once
            timeout = self._timeouts[read_timeout] = aiohttp.ClientTimeout(
                total=None,
                connect=self.limits.connect_timeout,
                sock_connect=self.limits.connect_timeout,
                sock_read=read_timeout,
            )
        session = self._watch_session if watch else self._session
        assert session is not None, "UpstreamPool.start() not called"
        return await session.request(
            method,
            url,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            timeout=timeout,
            compress=None,
            chunked=None,
            server_hostname=server_hostname,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )


@dataclass
class CopyResult:
    bytes_sent: int = 0
    events: int = 0
    ended_by: str = "upstream"  # upstream | client | upstream_error


async def copy_stream(
    source: aiohttp.ClientResponse,
    write: Callable[[bytes], Awaitable[None]],
    counter: EventCounter | None,
    result: CopyResult,
) -> CopyResult:
    """Copy the upstream body to `write` chunk by chunk as it arrives, until the upstream ends or
    writing fails (the client went away). `result` is updated as it goes, so a caller that is
    cancelled (client gone, deadline, shutdown) still knows how much was sent."""
    async for chunk in _chunks(source, result):
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


async def _chunks(source: aiohttp.ClientResponse, result: CopyResult) -> AsyncIterator[bytes]:
    iterator = source.content.iter_any().__aiter__()
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except (aiohttp.ClientError, ConnectionError):
            result.ended_by = "upstream_error"
            return
        yield chunk


def release_quietly(resp: aiohttp.ClientResponse) -> None:
    """Close the upstream response (and its connection, if the body was not fully read)."""
    with contextlib.suppress(Exception):
        resp.close()


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
) -> aiohttp.ClientResponse:
    url = ctx.upstream.target(ex.target)
    timeout = ctx.limits.upstream_timeout
    for attempt in (1, 2):
        try:
            # Response headers must come within the timeout even for watches, whose body has no
            # read timeout: a hung upstream must not hold a watch slot forever.
            async with asyncio.timeout(timeout):
                up = await ctx.pool.send(
                    ex.method,
                    url,
                    headers,
                    body,
                    read_timeout=None if watch else timeout,
                    server_hostname=ctx.upstream.tls_server_name,
                    watch=watch,
                )
        except aiohttp.ClientConnectorError as exc:
            raise _UpstreamFailed("connect", type(exc).__name__) from None
        except TimeoutError:
            raise _UpstreamFailed("timeout", "TimeoutError") from None
        except aiohttp.ClientError as exc:
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
    up: aiohttp.ClientResponse,
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
