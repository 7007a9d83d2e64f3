"""Federation between two real clusters: two etcd + kube-apiserver pairs, each with the shipped
deploy/base objects (namespace, CRD, ServiceAccounts, RBAC, Lease), an `apiproxy serve` whose
upstream identity is the `api-proxy` ServiceAccount bound to the generated api-proxy RBAC, and an
`apiproxy federate` running as the `apiproxy-federation` ServiceAccount bound to
deploy/base/federation-rbac.yaml (so a verb the controller uses but the Role lacks fails here).

The kubelet's projection of the `apiproxy-peers` Secret into the proxy's --peers file is played by
`sync_peers`; istiod is played by kubectl and the official client using the remote secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient_sync
from kubernetes import config as kconfig_sync
from kubernetes_asyncio import config as kconfig

from apiproxy import pki, upstream
from apiproxy.federation.controller import FINALIZER, PRIVATE, PUBLIC, REMOTE_API
from apiproxy.federation.main import LEASE_NAME, Federation, FederationConfig
from apiproxy.server import ProxyServer, ServeConfig
from tests.federation.conftest import eventually
from tests.federation.process import Federate, SilentPeer
from tests.real.cluster import KubeCluster
from tests.real.deploy import IMC, ROOT, docs, provision, ready_node, wait_established
from tests.tools import KUBECTL

POLICY = ROOT / "policies" / "istio-remote.yaml"

GATEWAY_NODE_IP = "192.0.2.77"
GATEWAY_NODE_PORT = 31443

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_clusters(kube_assets: Path) -> Iterator[tuple[KubeCluster, KubeCluster]]:
    a, b = KubeCluster(kube_assets, name="fed-a"), KubeCluster(kube_assets, name="fed-b")
    errors: list[BaseException] = []

    def start(c: KubeCluster) -> None:
        try:
            c.start()
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield a, b
        a.check_alive()
        b.check_alive()
    finally:
        for c in (a, b):
            if hasattr(c, "workdir"):
                c.stop()


@dataclass
class Side:
    name: str
    kube: KubeCluster
    uuid: str
    proxy: ProxyServer
    fed: Federation
    peers_file: Path

    async def sync_peers(self) -> None:
        secret = self.kube.ok("GET", "/api/v1/namespaces/apiproxy-system/secrets/apiproxy-peers")
        text = base64.b64decode(secret["data"]["peers.yaml"]).decode()
        if self.peers_file.read_text() != text:
            self.peers_file.write_text(text)
            results = await self.proxy.reload_now()
            assert all(ok for _what, ok in results), results

    def imc(self, name: str) -> dict[str, Any]:
        return dict(self.kube.ok("GET", f"{IMC}/{name}"))

    def condition(self, peer: str, ctype: str) -> dict[str, Any]:
        for c in (self.imc(peer).get("status") or {}).get("conditions") or []:
            if c["type"] == ctype:
                return dict(c)
        raise AssertionError(f"{self.name}: no {ctype} condition on {peer}")


def _prepare(name: str, kube: KubeCluster, tmp: Path, cert: pki.KeyPair) -> tuple[str, str]:
    """Install deploy/base, write the proxy's files; (cluster UUID, the controller's token)."""
    provision(kube, pki.make_ca(f"istio root {name}"))
    tmp.mkdir()
    uuid = kube.ok("GET", "/api/v1/namespaces/kube-system")["metadata"]["uid"]
    (tmp / "tls.crt").write_text(cert.cert_pem)
    (tmp / "tls.key").write_text(cert.key_pem)
    (tmp / "peers.yaml").write_text("peers: []\n")
    (tmp / "upstream-ca.crt").write_text(kube.ca.cert_pem)
    (tmp / "token").write_text(kube.service_account_token("apiproxy-system", "api-proxy") + "\n")
    fed_token = kube.service_account_token("apiproxy-system", "apiproxy-federation")
    kube.kubeconfig(tmp / "federation.kubeconfig", token=fed_token)
    return str(uuid), fed_token


def _node_port_gateway(kube: KubeCluster) -> None:
    """istio-eastwestgateway as a NodePort Service with one Running pod on a Ready node; no
    kubelet runs, so the admin writes the pod's and the node's status."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system"},
            "spec": {
                "type": "NodePort",
                "selector": {"istio": "eastwestgateway"},
                "ports": [{"name": "tls", "port": 15443, "nodePort": GATEWAY_NODE_PORT}],
            },
        }
    )
    ready_node(kube, "node-1", GATEWAY_NODE_IP)
    pods = "/api/v1/namespaces/istio-system/pods"
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "eastwestgateway-1",
                "namespace": "istio-system",
                "labels": {"istio": "eastwestgateway"},
            },
            "spec": {
                "nodeName": "node-1",
                "automountServiceAccountToken": False,
                "containers": [{"name": "istio-proxy", "image": "istio/proxyv2"}],
            },
        }
    )
    kube.ok(
        "PATCH",
        f"{pods}/eastwestgateway-1/status",
        {"status": {"phase": "Running"}},
        content_type="application/merge-patch+json",
    )


async def _side(
    name: str,
    kube: KubeCluster,
    tmp: Path,
    cert: pki.KeyPair,
    *,
    node_port_gateway: bool = False,
) -> Side:
    uuid, _token = await asyncio.to_thread(_prepare, name, kube, tmp, cert)
    if node_port_gateway:
        await asyncio.to_thread(_node_port_gateway, kube)
    proxy = ProxyServer(
        ServeConfig(
            tls_cert=str(tmp / "tls.crt"),
            tls_key=str(tmp / "tls.key"),
            peers=str(tmp / "peers.yaml"),
            cluster_uuid=uuid,
            policy=str(POLICY),
            upstream=upstream.from_flags(
                kube.url, str(tmp / "upstream-ca.crt"), str(tmp / "token")
            ),
            reload_interval_seconds=0,
        )
    )
    await proxy.start()
    kc = json.loads((tmp / "federation.kubeconfig").read_text())
    client = await kconfig.new_client_from_config_dict(kc)
    fed = Federation(
        FederationConfig(
            cluster_domain="cluster.local",
            api_host=f"127.0.0.1:{proxy.port}",
            exporter_listen="127.0.0.1:0",
            exporter_tls_cert=str(tmp / "tls.crt"),
            exporter_tls_key=str(tmp / "tls.key"),
            leader_elect=True,
            identity=f"federate-{name}",
            # Static, or discovered from the NodePort Service (services, pods, nodes reads).
            ingress_gateways=[] if node_port_gateway else [f"192.0.2.{len(name)}:15443"],
            resync_interval=60.0,
            backoff_base=0.2,
            backoff_max=1.0,
            fetch_timeout=5.0,
        ),
        client,
    )
    try:
        await fed.start()
        await fed.wait_leader(30)
    except BaseException:
        await fed.stop()
        await client.close()
        await proxy.stop()
        raise
    return Side(name, kube, uuid, proxy, fed, tmp / "peers.yaml")


@pytest.fixture
async def sides(
    two_clusters: tuple[KubeCluster, KubeCluster],
    tmp_path: Path,
    loopback_server_cert: pki.KeyPair,
    test_ca: pki.KeyPair,
) -> AsyncIterator[tuple[Side, Side]]:
    ka, kb = two_clusters
    a = await _side("a", ka, tmp_path / "a", loopback_server_cert)
    try:
        b = await _side("bb", kb, tmp_path / "b", loopback_server_cert, node_port_gateway=True)
    except BaseException:
        await _close(a)
        raise
    try:
        for side, peer, name in ((a, b, "b"), (b, a, "a")):
            side.kube.ok(
                "POST",
                IMC,
                {
                    "apiVersion": "deckhouse.io/v1alpha1",
                    "kind": "IstioMulticluster",
                    "metadata": {"name": name},
                    "spec": {
                        "metadataEndpoint": peer.fed.exporter_url,
                        "metadata": {"ca": test_ca.cert_pem},
                    },
                },
            )
        yield a, b
    finally:
        await _close(a)
        await _close(b)


async def _close(side: Side) -> None:
    await side.fed.stop()
    await side.fed.kube.api_client.close()
    await side.proxy.stop()


async def _converge(a: Side, b: Side) -> None:
    for _ in range(2):
        for side in (a, b):
            report = await side.fed.reconcile()
            assert not report.errors, (side.name, report.errors)
        await a.sync_peers()
        await b.sync_peers()
    for side in (a, b):
        report = await side.fed.reconcile()
        assert not report.errors, (side.name, report.errors)


def _versions(side: Side) -> list[str]:
    """resourceVersions of everything the controller writes in this cluster."""
    paths = [
        IMC,
        "/api/v1/namespaces/istio-system/secrets",
        "/api/v1/namespaces/istio-system/configmaps",
        "/api/v1/namespaces/apiproxy-system/secrets",
    ]
    out = []
    for path in paths:
        for item in side.kube.ok("GET", path)["items"]:
            meta = item["metadata"]
            out.append(f"{path}/{meta['name']}@{meta['resourceVersion']}")
    return sorted(out)


def _remote_kubeconfig(side: Side, peer: str, path: Path) -> Path:
    secret = side.kube.ok(
        "GET", f"/api/v1/namespaces/istio-system/secrets/istio-remote-secret-{peer}"
    )
    (value,) = secret["data"].values()
    path.write_bytes(base64.b64decode(value))
    path.chmod(0o600)
    return path


async def test_federation_converges_between_two_real_clusters(
    sides: tuple[Side, Side], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    a, b = sides
    # Both clusters export "default" to their peers (the shipped policy shows a peer only
    # istio-system and namespaces labelled apiproxy.io/export=true).
    for side in (a, b):
        side.kube.ok(
            "PATCH",
            "/api/v1/namespaces/default",
            {"metadata": {"labels": {"apiproxy.io/export": "true"}}},
            content_type="application/merge-patch+json",
        )
    b.kube.ok(
        "POST",
        "/api/v1/namespaces/default/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-1", "labels": {"app": "web"}},
            "spec": {
                "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "nginx"}],
            },
        },
    )
    await _converge(a, b)

    for side, peer in ((a, "b"), (b, "a")):
        obj = side.imc(peer)
        # The real status subresource took the conditions; the finalizer is on the object.
        assert FINALIZER in obj["metadata"]["finalizers"], obj["metadata"]
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        for ctype in (PUBLIC, PRIVATE, REMOTE_API):
            cond = side.condition(peer, ctype)
            assert cond["status"] == "True", (side.name, ctype, cond)
        other = b if side is a else a
        assert obj["status"]["pinnedClusterUUID"] == other.uuid
        # The Lease shipped in deploy/ is held by this replica.
        lease = side.kube.ok(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/apiproxy-system/leases/{LEASE_NAME}"
        )
        assert lease["spec"]["holderIdentity"] == f"federate-{side.name}"
        # Mesh config: the peer's root CA and network were written into the istio ConfigMap.
        cm = side.kube.ok("GET", "/api/v1/namespaces/istio-system/configmaps/istio")
        mesh = yaml.safe_load(cm["data"]["mesh"])
        assert len(mesh["caCertificates"]) == 1, mesh
        # Events about the IstioMulticluster, in namespace default, through the real Events API.
        events = side.kube.ok("GET", "/api/v1/namespaces/default/events")["items"]
        reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == peer}
        assert f"{REMOTE_API}True" in reasons, reasons

    # Converged means quiet: a pass with nothing due writes nothing. A status field the CRD's
    # schema does not declare would be pruned by the real server, so the stored status would
    # differ from the controller's and be rewritten on every pass. (A forced pass refetches and
    # so refreshes the *LastFetchTimestamp fields, by design.)
    before = _versions(a) + _versions(b)
    for side in (a, b):
        report = await side.fed.reconcile(force=False)
        assert not report.errors, report.errors
    assert _versions(a) + _versions(b) == before

    # istiod in A: kubectl with nothing but the remote secret lists B's pods through B's proxy.
    kc = _remote_kubeconfig(a, "b", tmp_path / "a-to-b.kubeconfig")
    # Clients run on threads: the proxies they reach serve from this test's event loop.
    got = await asyncio.to_thread(
        subprocess.run,
        [KUBECTL, "--kubeconfig", str(kc), "get", "pods", "-A", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 0, got.stderr
    assert sorted(got.stdout.split()) == ["pod/eastwestgateway-1", "pod/web-1"]
    # Secrets exist on B (remote secrets, the proxy's identity), but the shipped policy answers
    # a peer's secrets read with the empty view: it syncs and sees none.
    secrets = await asyncio.to_thread(
        subprocess.run,
        [KUBECTL, "--kubeconfig", str(kc), "get", "secrets", "-A", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert secrets.returncode == 0, secrets.stderr
    assert secrets.stdout.split() == []
    # A write is still refused.
    refused = await asyncio.to_thread(
        subprocess.run,
        [KUBECTL, "--kubeconfig", str(kc), "create", "namespace", "intruder"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr or "forbidden" in refused.stderr, refused.stderr
    # The official client from B's remote secret lists A's services through A's proxy.
    api = kconfig_sync.new_client_from_config(str(_remote_kubeconfig(b, "a", tmp_path / "b-a")))
    with api:
        services = await asyncio.to_thread(
            kclient_sync.CoreV1Api(api).list_service_for_all_namespaces
        )
    assert "kubernetes" in {s.metadata.name for s in services.items}

    # B's gateway came from its NodePort Service, the Running pod behind it and its node.
    cm = a.kube.ok("GET", "/api/v1/namespaces/istio-system/configmaps/istio")
    networks = yaml.safe_load(cm["data"]["meshNetworks"])["networks"]
    gateways = [g for net in networks.values() for g in net.get("gateways", [])]
    assert {"address": GATEWAY_NODE_IP, "port": GATEWAY_NODE_PORT} in gateways, networks

    # Deleting the peer in A: the finalizer holds the object until the controller removed the
    # remote secret and the mesh entries, then lets it go.
    secret = "/api/v1/namespaces/istio-system/secrets/istio-remote-secret-b"
    a.kube.ok("DELETE", f"{IMC}/b")
    assert "deletionTimestamp" in a.imc("b")["metadata"]
    report = await a.fed.reconcile()
    assert not report.errors, report.errors
    assert a.kube.request("GET", secret)[0] == 404
    assert a.kube.request("GET", f"{IMC}/b")[0] == 404
    cm = a.kube.ok("GET", "/api/v1/namespaces/istio-system/configmaps/istio")
    assert not yaml.safe_load(cm["data"]["mesh"]).get("caCertificates"), cm["data"]["mesh"]

    # Nothing was refused by the real authorizer (events are best effort and only logged), and
    # no credential reached the logs.
    logs = "".join(capfd.readouterr())
    assert "forbidden" not in logs.lower()
    assert "event not recorded" not in logs
    for side in (a, b):
        token = (side.peers_file.parent / "token").read_text().strip()
        assert token not in logs
    assert "PRIVATE KEY" not in logs


def test_the_shipped_crd_is_structural_and_validates(
    two_clusters: tuple[KubeCluster, KubeCluster],
) -> None:
    kube = two_clusters[0]
    for doc in docs("crd-istiomulticluster.yaml"):
        kube.apply(doc)
        wait_established(kube, doc["metadata"]["name"])
    crd = kube.ok(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/istiomulticlusters.deckhouse.io",
    )
    conds = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conds["Established"]["status"] == "True"
    assert conds["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conds, conds

    def create(spec: Any, **extra: Any) -> tuple[int, Any]:
        body = {
            "apiVersion": "deckhouse.io/v1alpha1",
            "kind": "IstioMulticluster",
            "metadata": {"name": "probe"},
            "spec": spec,
            **extra,
        }
        return kube.request("POST", f"{IMC}?dryRun=All", body)

    ok_status, ok_obj = create({"metadataEndpoint": "https://peer.example:8443/metadata"})
    assert ok_status == 201, ok_obj
    assert ok_obj["spec"]["enableIngressGateway"] is True  # the schema's default applied
    for spec, field in (
        ({"metadataEndpoint": "ftp://peer.example/metadata"}, "spec.metadataEndpoint"),
        ({}, "spec.metadataEndpoint"),
        (
            {"metadataEndpoint": "https://p/m", "enableIngressGateway": "yes"},
            "spec.enableIngressGateway",
        ),
        ({"metadataEndpoint": "https://p/m", "metadata": {"ca": 5}}, "spec.metadata.ca"),
        (None, "spec"),
    ):
        status, out = create(spec)
        assert status == 422, (spec, out)
        assert out["reason"] == "Invalid"
        assert any(c.get("field") == field for c in out["details"]["causes"]), (field, out)


async def test_two_replicas_share_the_shipped_lease(
    two_clusters: tuple[KubeCluster, KubeCluster], tmp_path: Path
) -> None:
    """Leader election on the real Lease (get/update only, as the Role allows): one replica
    leads, the other stands by; stopping the leader releases the Lease to the standby."""
    kube = two_clusters[0]
    await asyncio.to_thread(provision, kube, pki.make_ca("istio root a"))
    token = await asyncio.to_thread(
        kube.service_account_token, "apiproxy-system", "apiproxy-federation"
    )
    kc = json.loads(kube.kubeconfig(tmp_path / "kc", token=token).read_text())
    replicas: list[Federation] = []
    try:
        for identity in ("replica-1", "replica-2"):
            fed = Federation(
                FederationConfig(
                    cluster_domain="cluster.local",
                    api_host="127.0.0.1:4443",
                    exporter_listen="127.0.0.1:0",
                    leader_elect=True,
                    identity=identity,
                    ingress_gateways=["192.0.2.1:15443"],
                    lease_duration=4.0,
                    renew_deadline=3.0,
                    retry_period=0.5,
                ),
                await kconfig.new_client_from_config_dict(kc),
            )
            replicas.append(fed)
            await fed.start()
        done, pending = await asyncio.wait(
            [asyncio.create_task(f.wait_leader(30)) for f in replicas],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in pending:  # the standby's wait: it must not lead now
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        leader = next(f for f in replicas if f.is_leader)
        standby = next(f for f in replicas if f is not leader)
        assert not standby.is_leader
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/apiproxy-system/leases/{LEASE_NAME}"
        lease = await asyncio.to_thread(kube.ok, "GET", lease_path)
        assert lease["spec"]["holderIdentity"] == leader.config.identity

        await leader.stop()  # releases the Lease
        await standby.wait_leader(30)
        lease = await asyncio.to_thread(kube.ok, "GET", lease_path)
        assert lease["spec"]["holderIdentity"] == standby.config.identity
    finally:
        for fed in replicas:
            await fed.stop()
            await fed.kube.api_client.close()


async def test_federate_process_stops_promptly_on_sigterm(
    two_clusters: tuple[KubeCluster, KubeCluster], tmp_path: Path
) -> None:
    """`python -m apiproxy federate` as the shipped ServiceAccount on a real kube-apiserver,
    leading, its watch open, its pass held by a peer that accepted the connection and never
    answers: SIGTERM ends it within SHUTDOWN_BOUND with exit 0, `federation_stopped` last, and
    the Lease handed back (holder empty)."""
    kube = two_clusters[1]
    await asyncio.to_thread(provision, kube, pki.make_ca("istio root b"))
    token = await asyncio.to_thread(
        kube.service_account_token, "apiproxy-system", "apiproxy-federation"
    )
    kubeconfig = kube.kubeconfig(tmp_path / "federation.kubeconfig", token=token)
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/apiproxy-system/leases/{LEASE_NAME}"
    name = "silent-peer"
    async with SilentPeer() as peer:
        await asyncio.to_thread(
            kube.ok,
            "POST",
            IMC,
            {
                "apiVersion": "deckhouse.io/v1alpha1",
                "kind": "IstioMulticluster",
                "metadata": {"name": name},
                "spec": {"metadataEndpoint": f"https://127.0.0.1:{peer.port}/metadata"},
            },
        )
        f = await Federate.start(kubeconfig, tmp_path, "--identity=federate-sigterm")
        try:
            await f.wait_event("federation_started", timeout=60)

            # The Lease may still name a replica of an earlier test until it expires (15 s).
            async def leading() -> bool:
                f.alive()
                lease = await asyncio.to_thread(kube.ok, "GET", lease_path)
                return bool(lease["spec"].get("holderIdentity") == "federate-sigterm")

            await eventually(leading, timeout=60, interval=0.2)
            await asyncio.wait_for(peer.connected.wait(), 60)
            rc, took = await f.sigterm()
        finally:
            await f.kill()
            # Our finalizer is on it and no controller runs any more: take it off, then delete.
            await asyncio.to_thread(
                kube.request,
                "PATCH",
                f"{IMC}/{name}",
                {"metadata": {"finalizers": None}},
                content_type="application/merge-patch+json",
            )
            await asyncio.to_thread(kube.request, "DELETE", f"{IMC}/{name}")
    last = f.assert_clean_exit(rc)
    assert last["abandoned"] == []
    lease = await asyncio.to_thread(kube.ok, "GET", lease_path)
    assert lease["spec"].get("holderIdentity") in (None, "")
    print(f"real kube-apiserver: SIGTERM mid-pass exited in {took:.2f}s")
