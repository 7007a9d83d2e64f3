"""Two simulated clusters, each with its own `apiproxy serve` and `apiproxy federate`.

Cluster A's istiod is played by a kubernetes_asyncio client built from nothing but the remote
secret the controller wrote in A: it lists and watches B's pods and endpoints through B's
api-proxy, and sees none of B's secrets (the shipped policy's empty view). The kubelet's
projection of the `apiproxy-peers` Secret into the proxy's --peers file is played by `sync_peers`.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio import watch as kwatch
from kubernetes_asyncio.client.exceptions import ApiException

from apiproxy import pki, upstream
from apiproxy.federation.controller import PRIVATE, PUBLIC, REMOTE_API
from apiproxy.federation.main import Federation
from apiproxy.server import ProxyServer, ServeConfig
from tests.federation.conftest import Cluster, eventually

POLICY = Path(__file__).resolve().parents[2] / "policies" / "istio-remote.yaml"

pytestmark = pytest.mark.slow


@dataclass
class Side:
    cluster: Cluster
    proxy: ProxyServer
    fed: Federation
    peers_file: Path

    async def sync_peers(self) -> None:
        secret = self.cluster.get("secrets", "apiproxy-peers", "apiproxy-system")
        assert secret is not None
        text = base64.b64decode(secret["data"]["peers.yaml"]).decode()
        if self.peers_file.read_text() != text:
            self.peers_file.write_text(text)
            results = await self.proxy.reload_now()
            assert all(ok for _what, ok in results), results


def _write_files(cluster: Cluster, tmp: Path, server_cert: pki.KeyPair) -> None:
    tmp.mkdir()
    (tmp / "tls.crt").write_text(server_cert.cert_pem)
    (tmp / "tls.key").write_text(server_cert.key_pem)
    (tmp / "peers.yaml").write_text("peers: []\n")
    (tmp / "upstream-ca.crt").write_text(cluster.sim.ca_pem)
    (tmp / "token").write_text(cluster.sim.token + "\n")


async def _side(
    cluster: Cluster, tmp: Path, server_cert: pki.KeyPair, exporter_tls: tuple[str, str], **kw: Any
) -> Side:
    _write_files(cluster, tmp, server_cert)
    proxy = ProxyServer(
        ServeConfig(
            tls_cert=str(tmp / "tls.crt"),
            tls_key=str(tmp / "tls.key"),
            peers=str(tmp / "peers.yaml"),
            cluster_uuid=cluster.uuid,
            policy=str(POLICY),
            upstream=upstream.from_flags(
                cluster.sim.url, str(tmp / "upstream-ca.crt"), str(tmp / "token")
            ),
            reload_interval_seconds=0,
        )
    )
    await proxy.start()
    fed = await cluster.federation(
        api_host=f"127.0.0.1:{proxy.port}",
        exporter_tls_cert=exporter_tls[0],
        exporter_tls_key=exporter_tls[1],
        **kw,
    )
    return Side(cluster, proxy, fed, tmp / "peers.yaml")


@pytest.fixture
async def two_sides(clusters, tmp_path, loopback_server_cert, exporter_tls, test_ca):
    a = await _side(
        await clusters("a"), tmp_path / "a", loopback_server_cert, exporter_tls, credential_ttl=6.0
    )
    bb = await clusters("bb")
    # B exports "default" to its peers (the shipped policy shows only exported namespaces), before
    # its proxy starts: a namespace exported moments before a list sends watches resumed from that
    # list back to list (410) for 2 s, and A's 6 s credentials would not outlast the retries.
    default = bb.store.get("namespaces", "default")
    default["metadata"].setdefault("labels", {})["apiproxy.io/export"] = "true"
    bb.store.update(default)
    b = await _side(bb, tmp_path / "b", loopback_server_cert, exporter_tls)
    try:
        a.cluster.create_imc("b", b.fed.exporter_url, test_ca.cert_pem)
        b.cluster.create_imc("a", a.fed.exporter_url, test_ca.cert_pem)
        yield a, b
    finally:
        for side in (a, b):
            await side.proxy.stop()


async def _converge(a: Side, b: Side) -> None:
    for _ in range(2):
        await a.fed.reconcile()
        await b.fed.reconcile()
        await a.sync_peers()
        await b.sync_peers()
    await a.fed.reconcile()


def _kubeconfig(cluster: Cluster, name: str) -> dict[str, Any]:
    secret = cluster.get("secrets", f"istio-remote-secret-{name}", "istio-system")
    assert secret is not None
    (value,) = secret["data"].values()
    return dict(yaml.safe_load(base64.b64decode(value)))


async def _list_pods(kc: dict[str, Any]) -> list[str]:
    api = await kconfig.new_client_from_config_dict(kc)
    async with api:
        pods = await kclient.CoreV1Api(api).list_pod_for_all_namespaces()
        return sorted(p.metadata.name for p in pods.items)


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
    }


async def test_istiod_in_a_discovers_b_through_bs_api_proxy(two_sides):
    a, b = two_sides
    b.cluster.store.create(_pod("web-1"))
    b.cluster.store.create(
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "web", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "10.1.0.5"}], "ports": [{"port": 80}]}],
        }
    )
    await _converge(a, b)
    for side, peer in ((a, "b"), (b, "a")):
        for ctype in (PUBLIC, PRIVATE, REMOTE_API):
            cond = side.cluster.condition(peer, ctype)
            assert cond is not None
            assert cond["status"] == "True", (side.cluster.name, ctype, cond)

    kc = _kubeconfig(a.cluster, "b")
    assert set(kc["users"][0]["user"]) == {"client-certificate-data", "client-key-data", "token"}
    api = await kconfig.new_client_from_config_dict(kc)
    async with api:
        core = kclient.CoreV1Api(api)
        pods = await core.list_pod_for_all_namespaces()
        assert [p.metadata.name for p in pods.items] == ["web-1"]
        eps = await core.list_endpoints_for_all_namespaces()
        assert any(e.metadata.name == "web" for e in eps.items)
        # Watch: a pod created in B arrives as an event through the proxy.
        seen: list[str] = []

        async def watch_pods() -> None:
            w = kwatch.Watch()
            async for event in w.stream(
                core.list_pod_for_all_namespaces,
                resource_version=pods.metadata.resource_version,
                timeout_seconds=20,
            ):
                seen.append(f"{event['type']} {event['object'].metadata.name}")
                if event["object"].metadata.name == "web-2":
                    w.stop()
            await w.close()

        task = asyncio.create_task(watch_pods())
        await asyncio.to_thread(b.cluster.store.wait_for_watchers, "pods")
        b.cluster.store.create(_pod("web-2"))
        await asyncio.wait_for(task, 20)
        assert "ADDED web-2" in seen
        # Endpoints watch: a change made in B after the list arrives as MODIFIED.
        ep = b.cluster.store.get("endpoints", "web", "default")
        ep["subsets"][0]["addresses"].append({"ip": "10.1.0.6"})
        b.cluster.store.update(ep)
        w = kwatch.Watch()
        async for event in w.stream(
            core.list_endpoints_for_all_namespaces,
            resource_version=eps.metadata.resource_version,
            timeout_seconds=20,
        ):
            if event["object"].metadata.name == "web":
                seen.append(f"{event['type']} endpoints")
                w.stop()
        await w.close()
        assert "MODIFIED endpoints" in seen
        # Secrets: the shipped policy's empty view. B holds secrets; A's istiod sees none of them,
        # a named read is NotFound, and a write is refused.
        assert b.cluster.store.list("secrets", "apiproxy-system")
        listed = await core.list_secret_for_all_namespaces()
        assert listed.items == []
        with pytest.raises(ApiException) as hidden:
            await core.read_namespaced_secret("apiproxy-identity", "apiproxy-system")
        assert hidden.value.status == 404
        with pytest.raises(ApiException) as refused:
            await core.delete_namespaced_secret("apiproxy-identity", "apiproxy-system")
        assert refused.value.status == 403


async def test_peer_outage_and_credential_rotation(two_sides, capfd):
    a, b = two_sides
    await _converge(a, b)
    kc1 = _kubeconfig(a.cluster, "b")
    assert await _list_pods(kc1) == []

    # B's exporter goes down: A keeps its artifacts (and access), the condition goes False.
    port = b.fed.exporter_port
    await b.fed.exporter.stop()
    await a.fed.reconcile()
    cond = a.cluster.condition("b", PUBLIC)
    assert cond["status"] == "False"
    assert cond["reason"] == "FetchFailed"
    assert a.cluster.condition("b", REMOTE_API)["status"] == "True"
    assert await _list_pods(_kubeconfig(a.cluster, "b")) == []
    # B comes back: True again.
    await b.fed.exporter.start("127.0.0.1", port, b.fed._exporter_ssl())
    await a.fed.reconcile()
    assert a.cluster.condition("b", PUBLIC)["status"] == "True"

    # Rotation (TTL 6 s, rotated at 2/3) happens on A's own timer; no manual pass.
    before = _kubeconfig(a.cluster, "b")
    after = await eventually(
        lambda: (kc := _kubeconfig(a.cluster, "b")) != before and kc, timeout=15
    )
    old_user, new_user = before["users"][0]["user"], after["users"][0]["user"]
    assert old_user["token"] != new_user["token"]
    assert old_user["client-certificate-data"] != new_user["client-certificate-data"]
    # No gap: the credentials just replaced still work, and so do the new ones.
    assert await _list_pods(before) == []
    assert await _list_pods(after) == []

    # Nothing secret reached logs, status or Events on either side.
    out = capfd.readouterr()
    logs = out.out + out.err
    new_token = new_user["token"]
    assert new_token not in logs
    assert old_user["token"] not in logs
    assert "PRIVATE KEY" not in logs
    for side in (a, b):
        dumped = str(side.cluster.store.list("istiomulticlusters.deckhouse.io"))
        dumped += str(side.cluster.store.list("events", namespace="default"))
        assert "eyJ" not in dumped
        assert "PRIVATE KEY" not in dumped
