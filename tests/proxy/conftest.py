"""Fixtures of the proxy area: PKI for two peers, a recording upstream, a proxy factory."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from apiproxy import pki, tokens, upstream
from apiproxy.server import ProxyServer, ServeConfig
from apiproxy_dev.sim import SimAPIServer
from tests.proxy.data import POLICY as POLICY  # test_upgrade, test_workers import it here

OWN_UUID = "11111111-1111-4111-8111-111111111111"
UUID_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
UUID_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"

POLICY_NO_ENDPOINTS = POLICY.replace("endpoints, ", "")


@dataclass
class World:
    server_ca: pki.KeyPair
    server: pki.KeyPair
    ca_a: pki.KeyPair
    ca_b: pki.KeyPair
    ca_unknown: pki.KeyPair
    client_a: pki.KeyPair
    client_b: pki.KeyPair
    client_unknown: pki.KeyPair
    key_a: ed25519.Ed25519PrivateKey
    key_b: ec.EllipticCurvePrivateKey

    def token_a(self, **kw: Any) -> str:
        args: dict[str, Any] = {
            "subject": UUID_A,
            "audience": OWN_UUID,
            "scope": "api",
            "ttl_seconds": 600,
        }
        args.update(kw)
        return tokens.mint(self.key_a, **args)

    def token_b(self, **kw: Any) -> str:
        args: dict[str, Any] = {
            "subject": UUID_B,
            "audience": OWN_UUID,
            "scope": "api",
            "ttl_seconds": 600,
        }
        args.update(kw)
        return tokens.mint(self.key_b, **args)

    def peers_yaml(self, *, with_b: bool = True) -> str:
        def block(text: str) -> str:
            return "\n".join("      " + line for line in text.strip().splitlines())

        out = [
            "peers:",
            "  - name: cluster-a",
            f"    clusterUUID: {UUID_A}",
            "    clientCA: |",
            block(self.ca_a.cert_pem),
            "    jwtPublicKey: |",
            block(tokens.public_key_pem(self.key_a)),
        ]
        if with_b:
            out += [
                "  - name: cluster-b",
                f"    clusterUUID: {UUID_B}",
                "    clientCA: |",
                block(self.ca_b.cert_pem),
                "    jwtPublicKey: |",
                block(tokens.public_key_pem(self.key_b)),
            ]
        return "\n".join(out) + "\n"

    def client_ssl(self, cert: pki.KeyPair | None, tmp: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.server_ca.cert_pem)
        if cert is not None:
            name = uuid.uuid4().hex
            c = tmp / f"{name}.crt"
            k = tmp / f"{name}.key"
            c.write_text(cert.cert_pem)
            k.write_text(cert.key_pem)
            ctx.load_cert_chain(c, k)
        return ctx


@pytest.fixture(scope="session")
def world() -> World:
    server_ca = pki.make_ca("proxy serving CA")
    ca_a = pki.make_ca("cluster-a client CA")
    ca_b = pki.make_ca("cluster-b client CA")
    ca_unknown = pki.make_ca("unknown CA")
    return World(
        server_ca=server_ca,
        server=pki.server_cert_for_loopback(server_ca),
        ca_a=ca_a,
        ca_b=ca_b,
        ca_unknown=ca_unknown,
        # One SPIFFE trust domain for both clusters: only the issuing anchor tells them apart.
        client_a=pki.issue(
            ca_a, "istiod", uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",), client=True
        ),
        client_b=pki.issue(
            ca_b, "istiod", uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",), client=True
        ),
        client_unknown=pki.issue(ca_unknown, "istiod", client=True),
        key_a=ed25519.Ed25519PrivateKey.generate(),
        key_b=ec.generate_private_key(ec.SECP256R1()),
    )


@dataclass
class Recorded:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    """A tiny upstream that records exactly what reached it. Watches (`watch=` in the query) stream
    whatever the test puts into `events`; `None` ends the stream."""

    url: str = ""
    ca_pem: str = ""
    requests: list[Recorded] = field(default_factory=list)
    events: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    watch_started: asyncio.Event = field(default_factory=asyncio.Event)
    watch_ended: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 200
    content_type: str = "application/json"
    list_body: bytes = b'{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}'
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/version":  # the proxy's readiness probe
            return web.json_response({"major": "1", "minor": "32", "gitVersion": "v1.32.0"})
        self.requests.append(
            Recorded(request.method, request.raw_path, list(request.headers.items()), body)
        )
        if "watch=" in request.query_string:
            resp = web.StreamResponse(status=200)
            resp.content_type = self.content_type
            resp.headers["Content-Type"] = self.content_type + ";stream=watch"
            await resp.prepare(request)
            self.watch_started.set()
            try:
                while True:
                    ev = await self.events.get()
                    if ev is None:
                        break
                    await resp.write(ev)
                await resp.write_eof()
            finally:
                self.watch_ended.set()
            return resp
        return web.Response(status=self.status, body=self.list_body, content_type=self.content_type)


async def start_recorder(world: World) -> Recorder:
    rec = Recorder(ca_pem=world.server_ca.cert_pem)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await rec.runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    d = Path(__import__("tempfile").mkdtemp())
    (d / "c").write_text(world.server.cert_pem)
    (d / "k").write_text(world.server.key_pem)
    ctx.load_cert_chain(d / "c", d / "k")
    site = web.TCPSite(rec.runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    rec.url = f"https://127.0.0.1:{rec.runner.addresses[0][1]}"
    return rec


@pytest.fixture
async def recorder(world: World) -> AsyncIterator[Recorder]:
    rec = await start_recorder(world)
    yield rec
    rec.events.put_nowait(None)
    assert rec.runner is not None
    await rec.runner.cleanup()


@dataclass
class Files:
    dir: Path
    tls_cert: Path
    tls_key: Path
    peers: Path
    policy: Path
    token: Path
    upstream_ca: Path
    audit: Path


def make_files(world: World, tmp: Path, *, policy: str = POLICY) -> Files:
    f = Files(
        dir=tmp,
        tls_cert=tmp / "tls.crt",
        tls_key=tmp / "tls.key",
        peers=tmp / "peers.yaml",
        policy=tmp / "policy.yaml",
        token=tmp / "token",
        upstream_ca=tmp / "upstream-ca.crt",
        audit=tmp / "audit.log",
    )
    f.tls_cert.write_text(world.server.cert_pem)
    f.tls_key.write_text(world.server.key_pem)
    f.peers.write_text(world.peers_yaml())
    f.policy.write_text(policy)
    f.token.write_text("upstream-token-1\n")
    f.upstream_ca.write_text(world.server_ca.cert_pem)
    return f


ProxyFactory = Callable[..., Awaitable[tuple[ProxyServer, Files]]]


@pytest.fixture
async def make_proxy(world: World, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    started: list[ProxyServer] = []

    async def factory(
        upstream_url: str, *, files: Files | None = None, **overrides: Any
    ) -> tuple[ProxyServer, Files]:
        f = files or make_files(world, tmp_path)
        cfg = ServeConfig(
            tls_cert=str(f.tls_cert),
            tls_key=str(f.tls_key),
            peers=str(f.peers),
            cluster_uuid=OWN_UUID,
            policy=str(f.policy),
            upstream=upstream.from_flags(upstream_url, str(f.upstream_ca), str(f.token)),
            audit_log=str(f.audit),
            metrics_listen=("127.0.0.1", 0),
            reload_interval_seconds=0,  # tests call reload_now()
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        proxy = ProxyServer(cfg)
        await proxy.start()
        started.append(proxy)
        return proxy, f

    yield factory
    for p in started:
        await p.stop()


def audit_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pod(name: str, ns: str = "x") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }


@pytest.fixture
async def sim() -> AsyncIterator[SimAPIServer]:
    async with SimAPIServer() as s:
        s.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
        s.store.create(pod("web-0"))
        s.store.create(
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": "web", "namespace": "x"},
                "subsets": [{"addresses": [{"ip": "10.0.0.7"}], "ports": [{"port": 80}]}],
            }
        )
        s.store.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "cacerts", "namespace": "x"},
                "data": {"ca-key.pem": base64.b64encode(b"private").decode()},
            }
        )
        yield s


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound, so no other process can
    take it (as it could a port picked free and released), but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
