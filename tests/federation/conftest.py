"""Simulated clusters for federation tests: a SimAPIServer with the namespaces, CRD, Istio root
and mesh ConfigMap a real cluster would have, plus a kubernetes_asyncio client for it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.client import ApiClient

from apiproxy import pki
from apiproxy.federation.main import Federation, FederationConfig, load_crd
from apiproxy.sim import SimAPIServer

FOREIGN_MESH = {
    "trustDomain": "cluster.local",
    "defaultConfig": {"proxyMetadata": {"PROXY_CONFIG_XDS_AGENT": "true"}},
    "caCertificates": [{"spiffeBundleUrl": "https://bundle.example/foreign"}],
}
FOREIGN_NETWORKS = {"networks": {"net-foreign": {"endpoints": [{"fromCidr": "10.9.0.0/16"}]}}}


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
            fetch_timeout=3.0,
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
