"""Simulated clusters for federation tests: a SimAPIServer with the namespaces, CRD, Istio root
and mesh ConfigMap a real cluster would have, plus a kubernetes_asyncio client for it."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.client import ApiClient

from apiproxy import pki
from apiproxy.federation.controller import PRIVATE
from apiproxy.federation.main import Federation, FederationConfig, load_crd
from apiproxy_dev.sim import SimAPIServer

FOREIGN_MESH = {
    "trustDomain": "cluster.local",
    "defaultConfig": {"proxyMetadata": {"PROXY_CONFIG_XDS_AGENT": "true"}},
    "caCertificates": [{"spiffeBundleUrl": "https://bundle.example/foreign"}],
}
FOREIGN_NETWORKS = {"networks": {"net-foreign": {"endpoints": [{"fromCidr": "10.9.0.0/16"}]}}}


# Long enough for any good fetch on a loaded machine; a peer that never answers costs this once.
FETCH_TIMEOUT = 3.0


async def eventually(
    check: Callable[[], Awaitable[Any] | Any],
    *,
    timeout: float = 20.0,  # noqa: ASYNC109 - a polling deadline
    interval: float = 0.05,
) -> Any:
    """Poll `check` until it returns a truthy value (or raise its last failure at the deadline)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            last = None
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            if last is not None:
                raise last
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(interval)


@dataclass
class Cluster:
    name: str
    uuid: str
    sim: SimAPIServer
    client: ApiClient
    root: pki.KeyPair
    feds: list[Federation] = field(default_factory=list)

    @property
    def store(self) -> Any:
        return self.sim.store

    def get(self, resource: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        try:
            return self.store.get(resource, name, namespace)
        except Exception:
            return None

    async def federation(self, **overrides: Any) -> Federation:
        cfg = FederationConfig(
            cluster_domain="cluster.local",
            api_host=overrides.pop("api_host", f"api.{self.name}.example:4443"),
            exporter_listen="127.0.0.1:0",
            leader_elect=False,
            ingress_gateways=[f"192.0.2.{len(self.name)}:15443"],
            resync_interval=60.0,
            backoff_base=0.2,
            backoff_max=1.0,
            fetch_timeout=FETCH_TIMEOUT,
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        fed = Federation(cfg, self.client)
        await fed.start()
        self.feds.append(fed)
        return fed

    def create_imc(self, name: str, endpoint: str, ca: str | None, **spec: Any) -> None:
        body: dict[str, Any] = {
            "apiVersion": "deckhouse.io/v1alpha1",
            "kind": "IstioMulticluster",
            "metadata": {"name": name},
            "spec": {"metadataEndpoint": endpoint, "enableIngressGateway": True, **spec},
        }
        if ca:
            body["spec"]["metadata"] = {"ca": ca}
        self.store.create(body)

    def imc(self, name: str) -> dict[str, Any] | None:
        return self.get("istiomulticlusters.deckhouse.io", name)

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        obj = self.imc(name) or {}
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == ctype:
                return dict(c)
        return None

    def mesh(self) -> tuple[dict[str, Any], dict[str, Any]]:
        cm = self.get("configmaps", "istio", "istio-system") or {}
        data = cm.get("data") or {}
        return (
            yaml.safe_load(data.get("mesh") or "") or {},
            yaml.safe_load(data.get("meshNetworks") or "") or {},
        )


async def make_cluster(name: str, ca: pki.KeyPair) -> Cluster:
    cluster_uuid = str(uuid.uuid4())
    sim = SimAPIServer(kube_system_uid=cluster_uuid, ca=ca)
    await sim.start()
    store = sim.store
    for ns in ("apiproxy-system", "istio-system"):
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    store.create(load_crd())
    root = pki.make_ca(f"istio root {name}")
    store.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "istio-system"},
            "data": {"root-cert.pem": root.cert_pem},
        }
    )
    store.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {
                "mesh": yaml.safe_dump(FOREIGN_MESH),
                "meshNetworks": yaml.safe_dump(FOREIGN_NETWORKS),
            },
        }
    )
    client = await kconfig.new_client_from_config_dict(sim.kubeconfig())
    return Cluster(name, cluster_uuid, sim, client, root)


@pytest.fixture
async def clusters(test_ca: pki.KeyPair) -> AsyncIterator[Callable[[str], Awaitable[Cluster]]]:
    made: list[Cluster] = []

    async def factory(name: str) -> Cluster:
        c = await make_cluster(name, test_ca)
        made.append(c)
        return c

    yield factory
    for c in made:
        for fed in c.feds:
            await fed.stop()
        await c.client.close()
        await c.sim.stop()


@pytest.fixture
def exporter_tls(tmp_path: Path, loopback_server_cert: pki.KeyPair) -> tuple[str, str]:
    cert, key = tmp_path / "exporter.crt", tmp_path / "exporter.key"
    cert.write_text(loopback_server_cert.cert_pem)
    key.write_text(loopback_server_cert.key_pem)
    return str(cert), str(key)


# ---------------------------------------------------------------------- three clusters

PUBLIC_PATH = "/metadata/public/public.json"
PRIVATE_PATH = "/metadata/private/multicluster.json"


class FakePeer:
    """A TLS exporter in front of a real one; `mode` decides what it answers."""

    def __init__(self, upstream: str, test_ca: pki.KeyPair, tls: tuple[str, str]) -> None:
        self.upstream = upstream.removesuffix("/metadata")
        self.client_ssl = ssl.create_default_context(cadata=test_ca.cert_pem)
        self.server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ssl.load_cert_chain(*tls)
        self.mode = "good"
        # Fields replaced in the private document (crafted identities for conflict tests).
        self.private_overrides: dict[str, Any] = {}
        self.release = asyncio.Event()
        self.stalled = asyncio.Event()  # a request reached mode "slow" and is being held
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/metadata"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _upstream(self, request: web.Request) -> tuple[int, bytes]:
        headers = {}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with (
            aiohttp.ClientSession(trust_env=False) as s,
            s.get(self.upstream + request.path, headers=headers, ssl=self.client_ssl) as resp,
        ):
            return resp.status, await resp.read()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[self.mode] = self.hits.get(self.mode, 0) + 1
        if self.mode == "slow" and request.path == PUBLIC_PATH:
            self.stalled.set()
            await self.release.wait()  # answers only after the test is over
        if self.mode == "invalid-json":
            return web.Response(text='{"clusterUUID": ', content_type="application/json")
        if self.mode == "nested-json":
            return web.Response(text="[" * 200_000, content_type="application/json")
        status, body = await self._upstream(request)
        if status == 200 and request.path == PRIVATE_PATH and self.private_overrides:
            return web.json_response({**json.loads(body), **self.private_overrides})
        if status != 200 or request.path != PUBLIC_PATH:
            return web.Response(status=status, body=body, content_type="application/json")
        doc: dict[str, Any] = json.loads(body)
        if self.mode == "no-root":
            del doc["rootCA"]
        if self.mode == "large":
            # A big but valid document sent in many small chunks (separate TLS records).
            doc["padding"] = "x" * 300_000
            raw = json.dumps(doc).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(raw), 8192):
                await resp.write(raw[i : i + 8192])
                await asyncio.sleep(0)
            await resp.write_eof()
            return resp
        return web.json_response(doc)


class Three(NamedTuple):
    a: Cluster
    b: Cluster
    c: Cluster
    fa: Federation
    fb: Federation
    fc: Federation
    fake: FakePeer


async def setup_three(
    clusters: Callable[[str], Awaitable[Cluster]],
    exporter_tls: tuple[str, str],
    test_ca: pki.KeyPair,
) -> Three:
    """A federates with B (behind a FakePeer, IstioMulticluster "b", created first) and C
    ("c"); both federate back. Returns them after convergence."""
    a, b, c = await clusters("a"), await clusters("bb"), await clusters("ccc")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls)
    fb = await b.federation(**tls)
    fc = await c.federation(**tls)
    fake = FakePeer(fb.exporter_url, test_ca, exporter_tls)
    await fake.start()
    a.create_imc("b", fake.url, test_ca.cert_pem)
    a.create_imc("c", fc.exporter_url, test_ca.cert_pem)
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    c.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    await fa.reconcile()
    await fb.reconcile()
    await fc.reconcile()
    await fa.reconcile()
    for peer in ("b", "c"):
        assert a.condition(peer, PRIVATE)["status"] == "True", a.condition(peer, PRIVATE)
    return Three(a, b, c, fa, fb, fc, fake)


@pytest.fixture
async def three(
    clusters: Callable[[str], Awaitable[Cluster]],
    exporter_tls: tuple[str, str],
    test_ca: pki.KeyPair,
) -> AsyncIterator[Three]:
    """Three federated clusters (`setup_three`); the FakePeer stops before the clusters do."""
    t = await setup_three(clusters, exporter_tls, test_ca)
    yield t
    await t.fake.stop()
