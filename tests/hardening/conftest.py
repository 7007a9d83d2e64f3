"""Fixtures of the hardening suite: PKI for two peers, the raw recording upstream, the real proxy,
and a raw TLS client that sends bytes aiohttp's client would refuse to send."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from apiproxy import pki, upstream
from apiproxy.server import ProxyServer, ServeConfig
from tests.hardening.data import POLICY
from tests.hardening.upstream import RawUpstream
from tests.proxy.conftest import OWN_UUID, UUID_A, UUID_B, Files, World, make_files

__all__ = ["OWN_UUID", "POLICY", "UUID_A", "UUID_B", "HWorld", "Response", "Stack"]


@dataclass
class HWorld(World):
    client_a_expired: pki.KeyPair | None = None
    client_a_future: pki.KeyPair | None = None


def _make_world() -> HWorld:
    server_ca = pki.make_ca("proxy serving CA")
    ca_a = pki.make_ca("cluster-a client CA")
    ca_b = pki.make_ca("cluster-b client CA")
    ca_unknown = pki.make_ca("unknown CA")
    spiffe = ("spiffe://cluster.local/ns/istio-system/sa/istiod",)
    now = dt.datetime.now(dt.UTC)
    w = HWorld(
        server_ca=server_ca,
        server=pki.server_cert_for_loopback(server_ca),
        ca_a=ca_a,
        ca_b=ca_b,
        ca_unknown=ca_unknown,
        client_a=pki.issue(ca_a, "istiod", uris=spiffe, client=True),
        client_b=pki.issue(ca_b, "istiod", uris=spiffe, client=True),
        client_unknown=pki.issue(ca_unknown, "istiod", client=True),
        key_a=ed25519.Ed25519PrivateKey.generate(),
        key_b=ec.generate_private_key(ec.SECP256R1()),
    )
    w.client_a_expired = pki.issue(
        ca_a,
        "istiod",
        client=True,
        not_before=now - dt.timedelta(days=10),
        valid_for=dt.timedelta(days=1),
    )
    w.client_a_future = pki.issue(
        ca_a, "istiod", client=True, not_before=now + dt.timedelta(days=1)
    )
    return w


@pytest.fixture(scope="session")
def hworld() -> HWorld:
    return _make_world()


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def assert_anonymous(self) -> None:
        """No `Server` header: an answer never names the implementation (or the upstream's)."""
        assert not [v for k, v in self.headers if k.lower() == "server"], self.headers


def parse_responses(raw: bytes) -> list[Response]:
    """Split a byte stream of HTTP/1.1 responses (Content-Length, chunked or read-to-EOF)."""
    out: list[Response] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        hmap = {k.lower(): v for k, v in headers}
        if hmap.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    rest = rest[2:] if rest.startswith(b"\r\n") else rest
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            out.append(Response(status, headers, bytes(body)))
        elif "content-length" in hmap:
            n = int(hmap["content-length"])
            out.append(Response(status, headers, rest[:n]))
            rest = rest[n:]
        else:
            out.append(Response(status, headers, rest))
            rest = b""
    return out


class Stack:
    """An upstream and a real proxy in front of it, plus client helpers."""

    def __init__(self, world: HWorld, tmp: Path, up: RawUpstream, proxy: ProxyServer, files: Files):
        self.world = world
        self.tmp = tmp
        self.up = up
        self.proxy = proxy
        self.files = files
        self._ctx: dict[str, ssl.SSLContext] = {}

    def ctx(self, who: str | pki.KeyPair | None = "a") -> ssl.SSLContext:
        """Client TLS context presenting peer A's ("a") or B's ("b") certificate, none, or any."""
        if isinstance(who, pki.KeyPair):
            key, cert = who.cert_pem, who
        elif who is None:
            key, cert = "none", None
        else:
            key, cert = who, {"a": self.world.client_a, "b": self.world.client_b}[who]
        if key not in self._ctx:
            self._ctx[key] = self.world.client_ssl(cert, self.tmp)
        return self._ctx[key]

    async def raw(
        self, data: bytes, who: str | pki.KeyPair | None = "a", limit: float = 10.0
    ) -> bytes:
        """Send raw bytes over TLS and read until the proxy closes the connection."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.proxy.port, ssl=self.ctx(who)
        )
        try:
            writer.write(data)
            await writer.drain()
            chunks = []
            async with asyncio.timeout(limit):
                while True:
                    try:
                        chunk = await reader.read(65536)
                    except (ConnectionError, ssl.SSLError):
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
            return b"".join(chunks)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        who: str | pki.KeyPair | None = "a",
    ) -> Response:
        lines = [f"{method} {target} HTTP/1.1", "Host: apiproxy"]
        for k, v in headers or []:
            lines.append(f"{k}: {v}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        raw = await self.raw(data, who)
        responses = parse_responses(raw)
        assert responses, f"no response to {method} {target!r}: {raw[:200]!r}"
        for resp in responses:  # whatever a hardening test sends, the answer names nothing
            resp.assert_anonymous()
        return responses[0]

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxy.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


StackFactory = Callable[..., Awaitable[Stack]]


async def start_stack(world: HWorld, tmp: Path, *, policy: str = POLICY, **overrides: Any) -> Stack:
    up = RawUpstream(world.server.cert_pem, world.server.key_pem, tempfile.mkdtemp(dir=tmp))
    await up.start()
    files = make_files(world, tmp, policy=policy)
    cfg = ServeConfig(
        tls_cert=str(files.tls_cert),
        tls_key=str(files.tls_key),
        peers=str(files.peers),
        cluster_uuid=OWN_UUID,
        policy=str(files.policy),
        upstream=upstream.from_flags(up.url, str(files.upstream_ca), str(files.token)),
        audit_log=str(files.audit),
        metrics_listen=("127.0.0.1", 0),
        reload_interval_seconds=0,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    proxy = ProxyServer(cfg)
    await proxy.start()
    return Stack(world, tmp, up, proxy, files)


async def stop_stack(stack: Stack) -> None:
    await stack.proxy.stop()
    await stack.up.stop()


@pytest.fixture
async def make_stack(hworld: HWorld, tmp_path: Path) -> AsyncIterator[StackFactory]:
    started: list[Stack] = []

    async def factory(**kw: Any) -> Stack:
        d = tmp_path / uuid.uuid4().hex[:8]
        d.mkdir()
        s = await start_stack(hworld, d, **kw)
        started.append(s)
        return s

    yield factory
    for s in started:
        await stop_stack(s)


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read exactly one response with a Content-Length body (keep-alive connections)."""
    head = await reader.readuntil(b"\r\n\r\n")
    (resp,) = parse_responses(head)
    n = int(resp.header("Content-Length") or 0)
    resp.body = await reader.readexactly(n)
    return resp


async def open_tls(
    stack: Stack, who: str | pki.KeyPair | None = "a"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", stack.proxy.port, ssl=stack.ctx(who))


def get(target: str, *, close: bool = False, extra: str = "") -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}{conn}\r\n".encode()
