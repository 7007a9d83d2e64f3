"""A byte-exact recording upstream for the hardening suite.

A raw asyncio TLS server that parses HTTP/1.1 itself (so nothing normalises what the proxy sent)
and records the request line, the raw head, the headers in order and the decoded body of every
request. It answers like kube-apiserver would for the paths the suite uses: `/version`, a list
(fixed JSON body with Content-Length) and watches (chunked JSON lines fed from `broadcast()`).

Every answer names its server (`SERVER`), as an upstream behind a load balancer might; the
proxy must never pass it on. Mode "upgrade" answers an upgrade request with `101` and closes.

Fault modes (`mode`): "normal", "garbage" (non-HTTP bytes), "reset" (RST instead of an answer),
"hang" (never answers), "slow" (answers after `delay` seconds), "kill_watch" (watches send one
event and then the socket is aborted mid-chunk), "truncate" (a Content-Length answer whose body is
cut short, then the connection closed). `statuses` answers the next requests with those codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

VERSION_BODY = b'{"major":"1","minor":"32","gitVersion":"v1.32.0"}'
SERVER = b"Server: upstream-product/9.9.9 (Linux)\r\n"
UPGRADED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    + SERVER
    + b"\r\n"
)
LIST_BODY = b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}'


@dataclass
class RawRequest:
    method: str
    target: str
    version: str
    head: bytes  # everything up to and including the blank line
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class BadRequest(Exception):
    pass


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(f"request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip() or not name:
            raise BadRequest(f"header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    method, target, version = (p.decode("latin-1") for p in parts)
    return method, target, version, headers


async def read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    te = [v.lower() for k, v in headers if k.lower() == "transfer-encoding"]
    cl = [v for k, v in headers if k.lower() == "content-length"]
    if te and cl:
        raise BadRequest("both Transfer-Encoding and Content-Length")
    if te:
        if te != ["chunked"]:
            raise BadRequest(f"transfer-encoding {te}")
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return bytes(out)
            out += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest("chunk framing")
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise BadRequest(f"content-length {cl}")
        return await reader.readexactly(int(cl[0]))
    return b""


def _is_watch(target: str) -> bool:
    _, _, query = target.partition("?")
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == "watch" and value.lower() not in ("0", "false"):
            return True
    return "/watch/" in target.partition("?")[0]


@dataclass
class RawUpstream:
    server_cert: str
    server_key: str
    tmpdir: str
    mode: str = "normal"
    delay: float = 0.0
    list_body: bytes = LIST_BODY
    # When set, a watch sends these events and ends at once (no broadcast() needed).
    watch_script: tuple[bytes, ...] | None = None
    # Status codes for the next (non-probe) requests, first one first; then 200.
    statuses: list[int] = field(default_factory=list)
    requests: list[RawRequest] = field(default_factory=list)
    probes: int = 0
    open_connections: int = 0
    total_connections: int = 0
    watch_queues: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    on_change: Callable[[], None] | None = None
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        import pathlib

        d = pathlib.Path(self.tmpdir)
        (d / "up.crt").write_text(self.server_cert)
        (d / "up.key").write_text(self.server_key)
        ctx.load_cert_chain(d / "up.crt", d / "up.key")
        self._server = await asyncio.start_server(
            self._conn, "127.0.0.1", 0, ssl=ctx, backlog=4096, limit=1024 * 1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for q in list(self.watch_queues):
            q.put_nowait(None)
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def broadcast(self, event: bytes | None) -> None:
        for q in list(self.watch_queues):
            q.put_nowait(event)

    @property
    def open_watches(self) -> int:
        return len(self.watch_queues)

    def abort_all(self) -> None:
        """Kill every open upstream connection at once (an apiserver crash)."""
        for w in list(self._writers):
            _rst(w)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.total_connections += 1
        self._writers.add(writer)
        self._notify()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                try:
                    method, target, version, headers = parse_head(head)
                    body = await read_body(reader, headers)
                except (BadRequest, ValueError, asyncio.IncompleteReadError) as exc:
                    self.requests.append(RawRequest("!BAD", str(exc), "", head, [], b""))
                    self._notify()
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    return
                if (
                    method == "GET"
                    and target == "/version"
                    and not any(k.lower() == "audit-id" for k, _ in headers)
                ):
                    self.probes += 1
                    if self.mode in ("normal", "slow", "kill_watch"):
                        await _respond(writer, 200, VERSION_BODY)
                        continue
                else:
                    self.requests.append(RawRequest(method, target, version, head, headers, body))
                    self._notify()
                if self.mode == "garbage":
                    writer.write(b"\x16\x03\x01 this is not HTTP \x00\xff\r\n\r\n")
                    await writer.drain()
                    return
                if self.mode == "reset":
                    _rst(writer)
                    return
                if self.mode == "hang":
                    await reader.read()  # until the proxy gives up on us
                    return
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                if self.mode == "truncate":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(self.list_body), self.list_body[:10])
                    )
                    await writer.drain()
                    return
                if self.mode == "upgrade" and any(k.lower() == "upgrade" for k, _ in headers):
                    writer.write(UPGRADED)
                    await writer.drain()
                    return
                if self.statuses:
                    await _respond(writer, self.statuses.pop(0), self.list_body)
                    continue
                if _is_watch(target) and method == "GET":
                    await self._watch(reader, writer)
                    return
                await _respond(writer, 200, b"" if method == "HEAD" else self.list_body)
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()
            self._notify()

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json;stream=watch\r\n"
            + SERVER
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.watch_queues.add(queue)
        self._notify()
        eof = asyncio.ensure_future(reader.read(1))
        try:
            if self.mode == "kill_watch":
                ev = b'{"type":"ADDED","object":{}}\n'
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev) + b'40\r\n{"type":')
                await writer.drain()
                _rst(writer)
                return
            if self.watch_script is not None:
                for ev in self.watch_script:
                    writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    get.cancel()
                    return
                ev = get.result()
                if ev is None:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
        finally:
            eof.cancel()
            self.watch_queues.discard(queue)
            self._notify()


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (status, SERVER, len(body), body)
    )
    await writer.drain()
