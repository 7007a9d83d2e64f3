"""istiod's informer set with the real client-go, through the proxy and the shipped policy, against
a real kube-apiserver whose RBAC for the proxy is exactly `apiproxy policy rbac` of that policy."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from apiproxy import upstream
from apiproxy.policy import Policy
from apiproxy.policy.rbac import rbac_documents
from apiproxy.policy.shipped import shipped_policy
from apiproxy.server import ProxyServer, ServeConfig
from tests import informers
from tests.proxy.conftest import OWN_UUID, Files, World, audit_records, make_files
from tests.proxy.conftest import world as world  # the proxy tier's PKI fixture, reused
from tests.proxy.test_e2e_sim import kubeconfig
from tests.real.cluster import KubeCluster

SHIPPED = shipped_policy("istio-remote.yaml")
# kube-apiserver 1.20 serves discovery.k8s.io/v1beta1 only (v1 from 1.21), and no WatchList
# (sendInitialEvents, 1.27+): what that version lacks is skipped, with that reason.
ENDPOINTSLICE_V1 = (1, 21)
WATCH_LIST = (1, 27)


@pytest.fixture(scope="module")
def clientgo() -> Path:
    return informers.binary()


def _path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    ns = obj["metadata"].get("namespace")
    plural = {
        "WorkloadEntry": "workloadentries",
        "EndpointSlice": "endpointslices",
        "ConfigMap": "configmaps",
        "CustomResourceDefinition": "customresourcedefinitions",
    }.get(obj["kind"], obj["kind"].lower() + "s")
    return f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"


@pytest.fixture(scope="module")
def seeded(kube: KubeCluster, kube_version: tuple[int, int]) -> KubeCluster:
    for crd in informers.CRDS:
        kube.apply(crd)
    for crd in informers.CRDS:
        _wait_established(kube, crd["metadata"]["name"])
    for obj in informers.objects():
        if obj["kind"] == "EndpointSlice" and kube_version < ENDPOINTSLICE_V1:
            continue
        status, out = kube.request("POST", _path(obj), obj)
        assert status in (201, 409), (obj["kind"], status, out)
    return kube


def _wait_established(kube: KubeCluster, name: str) -> None:
    """Watch the CRD until it is Established (an event, not a poll)."""
    path = (
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        f"?watch=1&fieldSelector=metadata.name%3D{name}&timeoutSeconds=30"
    )
    req = urllib.request.Request(kube.url + path)  # noqa: S310
    req.add_header("Authorization", f"Bearer {kube.admin_token}")
    with urllib.request.urlopen(req, context=kube.ssl_context(), timeout=40) as resp:  # noqa: S310
        for line in resp:
            obj = json.loads(line)["object"]
            # A CRD just created may carry `conditions: null` in its first event.
            conditions = (obj.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
    raise AssertionError(f"CRD {name} was not Established within 30 s")


def _proxy_token(kube: KubeCluster) -> str:
    """A real service-account token for the proxy, bound to exactly the generated RBAC."""
    docs = rbac_documents(Policy.load(SHIPPED).rules, service_account=("apiproxy-system", "proxy"))
    token = kube.service_account_token("apiproxy-system", "proxy")
    for doc in docs:
        if doc["kind"] == "Role":
            kube.ensure_namespace(doc["metadata"]["namespace"])
        kube.apply(doc)
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "apiproxy:upstream"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": docs[0]["metadata"]["name"],
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "proxy", "namespace": "apiproxy-system"}
            ],
        }
    )
    # The proxy's identity cannot read secrets at all: a forwarded secrets request would be 403.
    status, _ = kube.request("GET", "/api/v1/secrets", token=token)
    assert status == 403
    return token


async def _shipped_proxy(
    kube: KubeCluster, world: World, tmp_path: Path
) -> tuple[ProxyServer, Files]:
    """A started proxy in front of `kube` under the shipped policy and its generated RBAC."""
    files = make_files(world, tmp_path, policy=SHIPPED.read_text())
    files.token.write_text(_proxy_token(kube))
    files.upstream_ca.write_text(kube.ca.cert_pem)
    proxy = ProxyServer(
        ServeConfig(
            tls_cert=str(files.tls_cert),
            tls_key=str(files.tls_key),
            peers=str(files.peers),
            cluster_uuid=OWN_UUID,
            policy=str(files.policy),
            upstream=upstream.from_flags(kube.url, str(files.upstream_ca), str(files.token)),
            audit_log=str(files.audit),
            reload_interval_seconds=0,
        )
    )
    await proxy.start()
    return proxy, files


def _expected(kube: KubeCluster, skipped: set[str]) -> dict[str, int]:
    queries = {
        "namespaces": "/api/v1/namespaces",
        "services": "/api/v1/services",
        "nodes": "/api/v1/nodes",
        "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
        "pods": "/api/v1/pods?fieldSelector=status.phase%21%3DFailed",
        "configmaps": "/api/v1/namespaces/istio-system/configmaps"
        "?fieldSelector=metadata.name%3Distio",
        "customresourcedefinitions": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        "gateways": "/apis/gateway.networking.k8s.io/v1/gateways",
        "workloadentries": "/apis/networking.istio.io/v1/workloadentries",
    }
    out = {"secrets": 0}
    namespaces = kube.ok("GET", "/api/v1/namespaces")["items"]
    for name, path in queries.items():
        if name not in skipped:
            items = kube.ok("GET", path)["items"]
            out[name] = informers.shipped_visible(name, items, namespaces)
    assert len(kube.ok("GET", "/api/v1/namespaces/x/secrets")["items"]) >= 1
    return out


@pytest.mark.parametrize("watchlist", [False, True], ids=["list-watch", "watch-list"])
async def test_istiod_informer_set_syncs_against_the_real_apiserver(
    seeded: KubeCluster,
    kube_version: tuple[int, int],
    world: World,
    tmp_path: Path,
    clientgo: Path,
    watchlist: bool,
) -> None:
    kube = seeded
    if watchlist and kube_version < WATCH_LIST:
        pytest.skip(
            f"kube-apiserver {kube_version[0]}.{kube_version[1]} has no WatchList "
            "(sendInitialEvents, 1.27+)"
        )
    skipped = set() if kube_version >= ENDPOINTSLICE_V1 else {"endpointslices"}
    proxy, files = await _shipped_proxy(kube, world, tmp_path)
    try:
        kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
        args = ("-skip", ",".join(sorted(skipped))) if skipped else ()
        report = await informers.run(clientgo, kcfg, watchlist=watchlist, args=args)
        await proxy.audit.flush()
    finally:
        await proxy.stop()
    assert report["synced"], (report["unsynced"], report["watchErrors"], report["stderr"])
    assert report["watching"], [
        (r["method"], r["path"], r["query"][:80], r["status"], r.get("error", ""))
        for r in report["requests"]
    ]
    assert report["counts"] == _expected(kube, skipped)
    refused = [r for r in report["requests"] if r["status"] >= 400 or r.get("error")]
    assert refused == [], refused
    for name in set(informers.INFORMERS) - skipped:
        if watchlist:
            assert informers.used_watch_list(report, name), name
        else:
            assert informers.used_list_then_watch(report, name), name
    records = audit_records(files.audit)
    assert {
        r["annotations"]["authorization.k8s.io/decision"]
        for r in records
        if "authorization.k8s.io/decision" in r.get("annotations", {})
    } == {"allow"}
    # Every secrets request was answered by the proxy (decision allow, view) with 200.
    secrets = [r for r in records if r.get("objectRef", {}).get("resource") == "secrets"]
    assert secrets
    assert {r["annotations"].get("apiproxy.io/view") for r in secrets} == {"empty"}


# How long client-go's informer may take to show, or drop, the pods of a namespace whose export
# label changed: the proxy's namespace watch, then the ERROR 410 on the open pod watch, then
# client-go's re-list (WatchList or LIST+WATCH). Measured at well under a second here.
EXPORT_BOUND = 30.0


@pytest.mark.parametrize("watchlist", [False, True], ids=["list-watch", "watch-list"])
async def test_exporting_a_namespace_shows_its_pods_to_client_go_and_unexporting_hides_them(
    seeded: KubeCluster, world: World, tmp_path: Path, clientgo: Path, watchlist: bool
) -> None:
    kube = seeded
    ns = f"cg-export-{'wl' if watchlist else 'lw'}"
    kube.ensure_namespace(ns)
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "cg-pod", "namespace": ns},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }
    )
    key = f"{ns}/cg-pod"

    def label(value: str | None) -> None:
        kube.ok(
            "PATCH",
            f"/api/v1/namespaces/{ns}",
            {"metadata": {"labels": {informers.EXPORT_LABEL: value}}},
            content_type="application/merge-patch+json",
        )

    proxy, files = await _shipped_proxy(kube, world, tmp_path)
    try:
        kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
        async with informers.follow(clientgo, kcfg, watchlist=watchlist) as following:
            assert following.report["synced"], following.report["unsynced"]
            await following.until(lambda pods: bool(pods))
            assert key not in following.pods  # not exported: hidden
            label("true")
            async with asyncio.timeout(EXPORT_BOUND):
                shown = await following.until(lambda pods: key in pods)
            label(None)
            async with asyncio.timeout(EXPORT_BOUND):
                hidden = await following.until(lambda pods: key not in pods)
            print(
                f"client-go ({'WatchList' if watchlist else 'LIST+WATCH'}): pods shown "
                f"{shown:.2f}s after export, gone {hidden:.2f}s after unexport"
            )
    finally:
        await proxy.stop()
        kube.ok("DELETE", f"/api/v1/namespaces/{ns}")
    # The proxy sent the informer back to list each time (ERROR 410 Expired on the pod watch).
    records = audit_records(files.audit)
    expired = [r for r in records if "apiproxy.io/filter-expired" in r.get("annotations", {})]
    assert expired, "no watch was sent back to list"
