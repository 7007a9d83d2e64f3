"""Forwarding: which headers cross the proxy, the upstream connection pool, the streaming copy.

Request headers go upstream by **allowlist** (`FORWARDED_REQUEST_HEADERS`): content negotiation,
conditional requests and the user agent. Everything else — the client's `Authorization`,
`Impersonate-*`, `X-Remote-*`, `X-Forwarded-*`, `Proxy-*`, cookies, hop-by-hop headers and any
header the client names in `Connection` — stays behind. The proxy adds its own `Authorization` and
`Audit-ID`; aiohttp adds `Host` and, for a body, `Content-Length`. Nothing else is auto-added:
`Accept`, `Accept-Encoding`, `User-Agent` and `Content-Type` are sent only if the client sent them.

Bodies are bytes both ways (protobuf, JSON, gzip): no decompression, no re-encoding. Responses are
copied chunk by chunk as they arrive (`iter_any`), so a watch event never waits for the next one.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

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
