"""Namespace filtering and projection through the shipped policy in front of the real
kube-apiserver, under the RBAC `apiproxy policy rbac` generates for it (namespaces list/watch for
the proxy's own namespace informer included).

A pod with a secret in its env, the last-applied annotation and managedFields, in an exported
namespace, arrives without them but with ports, labels, serviceAccountName, nodeName and podIP.
A pod in an unexported namespace is absent from lists, pages (continue tokens included),
watches (created, modified, deleted) and 404 on GET: its name is in no byte of any answer.
Labelling the namespace makes an informer show its pods; unlabelling makes them disappear."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.client import CoreV1Api

from apiproxy.policy.shipped import shipped_policy
from apiproxy.projection import LAST_APPLIED
from apiproxy_dev.demo_kit import Informer
from tests.real.cluster import KubeCluster
from tests.real.proxied import Peers, RealProxy, run_kubectl

SHOWN, HIDDEN = "filter-shown", "filter-hidden"
HIDDEN_POD = "zz-payroll-secret-pod"
EXPORT = {"apiproxy.io/export": "true"}
PROTOBUF_FIRST = "application/vnd.kubernetes.protobuf,application/json"
SECRET = "hunter2-real"


def rich_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": "payroll"},
            "annotations": {LAST_APPLIED: json.dumps({"env": SECRET}), "team": "a"},
        },
        "spec": {
            "serviceAccountName": "default",
            "nodeName": "node-1",
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "command": ["/app", f"--password={SECRET}"],
                    "env": [{"name": "DB_PASSWORD", "value": SECRET}],
                    "ports": [{"name": "http-web", "containerPort": 8080, "protocol": "TCP"}],
                }
            ],
        },
    }


def label_namespace(kube: KubeCluster, name: str, labels: dict[str, str] | None) -> None:
    patch = {"metadata": {"labels": labels or {"apiproxy.io/export": None}}}
    kube.ok(
        "PATCH",
        f"/api/v1/namespaces/{name}",
        patch,
        content_type="application/merge-patch+json",
    )


def create_pod(kube: KubeCluster, namespace: str, name: str) -> None:
    kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", rich_pod(name))
    kube.ok(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/pods/{name}/status",
        {"status": {"podIP": "10.9.8.7", "podIPs": [{"ip": "10.9.8.7"}]}},
        content_type="application/merge-patch+json",
    )


@pytest.fixture(scope="module")
def shipped_proxy(
    kube: KubeCluster, peers: Peers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealProxy]:
    kube.ensure_namespace(SHOWN)
    kube.ensure_namespace(HIDDEN)
    label_namespace(kube, SHOWN, EXPORT)
    create_pod(kube, SHOWN, "web-0")
    for i in range(3):
        create_pod(kube, HIDDEN, f"{HIDDEN_POD}-{i}")
    proxy = RealProxy(
        kube,
        peers,
        tmp_path_factory.mktemp("filter-proxy"),
        policy_text=shipped_policy("istio-remote.yaml").read_text(),
        service_account=("apiproxy-system", "filter-proxy"),
        role_name="apiproxy:filter-upstream",
    ).start()
    try:
        yield proxy
        proxy.check_alive()
    finally:
        proxy.stop()


def answer(proxy: RealProxy, path: str, accept: str = "application/json") -> tuple[int, bytes]:
    code, headers, body = proxy.request("GET", path, headers={"Accept": accept})
    if code == 200:
        assert headers.get("Content-Type", "").startswith("application/json"), headers
    return code, body


def test_rbac_grants_the_namespace_informer(shipped_proxy: RealProxy) -> None:
    role = next(d for d in shipped_proxy.rbac if d["kind"] == "ClusterRole")
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]} in role[
        "rules"
    ]


def test_exported_pod_is_projected_and_hidden_pods_are_in_no_byte(
    shipped_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    direct = kube.ok("GET", f"/api/v1/namespaces/{SHOWN}/pods/web-0")
    assert direct["metadata"]["managedFields"]  # the real server keeps them
    code, body = answer(shipped_proxy, f"/api/v1/namespaces/{SHOWN}/pods/web-0", PROTOBUF_FIRST)
    assert code == 200
    pod = json.loads(body)
    # Labels as stored (1.37 may add the node's topology labels to a bound pod).
    assert pod["metadata"]["labels"] == direct["metadata"]["labels"]
    assert pod["metadata"]["labels"]["app"] == "payroll"
    assert pod["metadata"]["annotations"] == {"team": "a"}
    assert "managedFields" not in pod["metadata"]
    assert pod["metadata"]["uid"] == direct["metadata"]["uid"]
    assert pod["spec"]["containers"] == [
        {
            "name": "",
            "ports": [{"name": "http-web", "containerPort": 8080, "protocol": "TCP"}],
        }
    ]
    assert pod["spec"]["serviceAccountName"] == "default"
    assert pod["spec"]["nodeName"] == "node-1"
    assert pod["status"]["podIP"] == "10.9.8.7"
    assert SECRET.encode() not in body

    answers = [body]
    code, body = answer(shipped_proxy, f"/api/v1/namespaces/{HIDDEN}/pods/{HIDDEN_POD}-0")
    assert code == 404
    # The name in it is the one the client asked for, as for a pod that does not exist.
    assert json.loads(body)["message"] == f'pods "{HIDDEN_POD}-0" not found'
    code, body = answer(shipped_proxy, "/api/v1/pods", PROTOBUF_FIRST)
    assert code == 200
    names = {p["metadata"]["name"] for p in json.loads(body)["items"]}
    assert "web-0" in names
    answers.append(body)
    code, body = answer(shipped_proxy, "/api/v1/pods", "application/vnd.kubernetes.protobuf")
    assert code == 406
    # Pages of one item across the whole cluster: hidden pods sort among the visible ones.
    path, seen, pages = "/api/v1/pods?limit=1", set(), 0
    while True:
        code, body = answer(shipped_proxy, path)
        assert code == 200, body
        answers.append(body)
        page = json.loads(body)
        pages += 1
        seen |= {p["metadata"]["name"] for p in page["items"]}
        token = page["metadata"].get("continue")
        if not token:
            break
        path = f"/api/v1/pods?limit=1&continue={token}"
    assert seen == names
    assert pages > len(names)  # pages of hidden pods came back empty, with a sealed token
    code, body = answer(shipped_proxy, "/api/v1/namespaces")
    answers.append(body)
    assert HIDDEN not in {n["metadata"]["name"] for n in json.loads(body)["items"]}
    for raw in answers:
        assert HIDDEN_POD.encode() not in raw
        assert SECRET.encode() not in raw
        assert b"managedFields" not in raw
    kcfg = shipped_proxy.kubeconfig(tmp_path / "kubeconfig")
    out = run_kubectl(kcfg, "get", "pods", "-A", "-o", "name")
    assert f"pod/{HIDDEN_POD}" not in out.stdout
    assert "pod/web-0" in out.stdout
    records = [r for r in shipped_proxy.audit_records() if r["stage"] == "ResponseComplete"]
    filtered = [r for r in records if r["requestURI"].startswith("/api/v1/pods")]
    assert filtered
    assert all(
        r["annotations"].get("apiproxy.io/filtered") == "namespaces,projection=istiod-pod"
        for r in filtered
    )


def _watch_lines(
    proxy: RealProxy, path: str, out: list[dict[str, Any]], done: threading.Event
) -> None:
    req = urllib.request.Request(proxy.url + path, headers={"Accept": PROTOBUF_FIRST})  # noqa: S310
    with urllib.request.urlopen(req, context=proxy.ssl_context(), timeout=60) as resp:  # noqa: S310
        for line in resp:
            out.append(json.loads(line))
            if out[-1]["type"] == "ERROR":
                break
    done.set()


def test_watch_hides_created_modified_deleted_and_expires_on_export(
    shipped_proxy: RealProxy, kube: KubeCluster
) -> None:
    listed = kube.ok("GET", "/api/v1/pods")
    rv = listed["metadata"]["resourceVersion"]
    events: list[dict[str, Any]] = []
    done = threading.Event()
    path = f"/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
    t = threading.Thread(target=_watch_lines, args=(shipped_proxy, path, events, done), daemon=True)
    t.start()
    name = f"{HIDDEN_POD}-w"
    create_pod(kube, HIDDEN, name)
    kube.ok(
        "PATCH",
        f"/api/v1/namespaces/{HIDDEN}/pods/{name}",
        {"metadata": {"labels": {"changed": "yes"}}},
        content_type="application/merge-patch+json",
    )
    kube.ok("DELETE", f"/api/v1/namespaces/{HIDDEN}/pods/{name}?gracePeriodSeconds=0")
    create_pod(kube, SHOWN, "web-w")
    label_namespace(kube, HIDDEN, EXPORT)
    assert done.wait(30), events
    t.join(5)
    label_namespace(kube, HIDDEN, None)
    seen = [(e["type"], e["object"].get("metadata", {}).get("name")) for e in events]
    assert ("ADDED", "web-w") in seen
    assert events[-1]["type"] == "ERROR"
    assert events[-1]["object"]["code"] == 410
    assert events[-1]["object"]["reason"] == "Expired"
    assert not any(HIDDEN_POD in json.dumps(e) for e in events)
    # Resuming from the old resourceVersion would miss what became visible: 410 at once.
    code, _ = answer(shipped_proxy, path)
    assert code == 410


async def test_informer_converges_when_a_namespace_is_exported_and_unexported(
    shipped_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    cfg = yaml.safe_load(shipped_proxy.kubeconfig(tmp_path / "kubeconfig").read_text())
    api = await kconfig.new_client_from_config_dict(cfg)
    try:
        informer = Informer("pods", CoreV1Api(api).list_pod_for_all_namespaces)
        informer.start()
        try:
            await informer.wait_until(informer.synced.is_set, timeout=30)
            hidden = {f"{HIDDEN}/{HIDDEN_POD}-{i}" for i in range(3)}
            assert not hidden & set(informer.cache)
            await asyncio.to_thread(label_namespace, kube, HIDDEN, EXPORT)
            await informer.wait_until(lambda: hidden <= set(informer.cache), timeout=30)
            await asyncio.to_thread(label_namespace, kube, HIDDEN, None)
            await informer.wait_until(lambda: not hidden & set(informer.cache), timeout=30)
            assert f"{SHOWN}/web-0" in informer.cache
        finally:
            await informer.stop()
    finally:
        await api.close()


def test_protobuf_passes_through_unfiltered_resources_only(shipped_proxy: RealProxy) -> None:
    """Rules without namespace selection or projection keep protobuf byte for byte; a projected
    resource answers a protobuf-first Accept with JSON and a protobuf-only Accept with 406."""
    code, headers, body = shipped_proxy.request(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        headers={"Accept": "application/vnd.kubernetes.protobuf"},
    )
    assert code == 200
    assert headers["Content-Type"] == "application/vnd.kubernetes.protobuf"
    assert body.startswith(b"k8s\x00")
    code, body = answer(shipped_proxy, "/api/v1/nodes", PROTOBUF_FIRST)
    assert code == 200
    assert json.loads(body)["kind"] == "NodeList"
    code, body = answer(shipped_proxy, "/api/v1/nodes", "application/vnd.kubernetes.protobuf")
    assert code == 406
    assert json.loads(body)["reason"] == "NotAcceptable"


def test_watch_list_streams_only_visible_objects_then_the_end_bookmark(
    shipped_proxy: RealProxy, kube: KubeCluster
) -> None:
    """WatchList (client-go 0.35+ informers' first sync): the initial ADDED events are filtered
    and projected, and the `k8s.io/initial-events-end` bookmark always gets through."""
    path = (
        "/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"
        "&resourceVersionMatch=NotOlderThan&timeoutSeconds=5"
    )
    req = urllib.request.Request(  # noqa: S310
        shipped_proxy.url + path, headers={"Accept": PROTOBUF_FIRST}
    )
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, context=shipped_proxy.ssl_context(), timeout=30) as resp:  # noqa: S310
        for line in resp:
            events.append(json.loads(line))
            if events[-1]["type"] == "BOOKMARK":
                break
    added = [e["object"] for e in events if e["type"] == "ADDED"]
    # Only exported namespaces (other modules of the session export their own, e.g. "x").
    shown = {p["metadata"]["namespace"] for p in added}
    exported = {
        n["metadata"]["name"]
        for n in kube.ok("GET", "/api/v1/namespaces")["items"]
        if (n["metadata"].get("labels") or {}).get("apiproxy.io/export") == "true"
    }
    assert SHOWN in shown
    assert HIDDEN not in shown
    assert shown <= exported | {"istio-system"}, (shown, exported)
    assert "web-0" in {p["metadata"]["name"] for p in added}
    assert all("managedFields" not in p["metadata"] for p in added)
    assert all("env" not in c for p in added for c in p["spec"]["containers"])
    assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
