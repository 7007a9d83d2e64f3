"""Namespace filtering and projection end to end: the shipped policy, the proxy over real TLS and
the simulator. A pod in an exported namespace arrives projected; a pod in an unexported one is in
no byte of any answer (lists, pages and their continue tokens, watches, GETs); labelling and
unlabelling a namespace makes open watches end with 410 Expired so clients list again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from apiproxy.projection import LAST_APPLIED
from apiproxy.server import ProxyServer
from apiproxy_dev.sim import SimAPIServer
from tests.proxy.conftest import ProxyFactory, World
from tests.proxy.test_e2e_sim import kubeconfig, kubectl
from tests.proxy.test_empty_view import SHIPPED, proxy_for, records, session

EXPORT = {"apiproxy.io/export": "true"}
HIDDEN_POD = "zz-secret-hidden-pod"
PROTOBUF_FIRST = "application/vnd.kubernetes.protobuf,application/json"


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def rich_pod(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": "web"},
            "annotations": {LAST_APPLIED: '{"spec":"PASSWORD=hunter2"}', "team": "a"},
            "managedFields": [
                {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1"}
            ],
        },
        "spec": {
            "serviceAccountName": "web-sa",
            "nodeName": "node-1",
            "containers": [
                {
                    "name": "app",
                    "image": "registry/app:1",
                    "env": [{"name": "DB_PASSWORD", "value": "hunter2"}],
                    "ports": [{"name": "http-web", "containerPort": 8080, "protocol": "TCP"}],
                }
            ],
        },
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }


@pytest.fixture
async def cluster() -> AsyncIterator[SimAPIServer]:
    async with SimAPIServer() as s:
        s.store.create(namespace("istio-system"))
        s.store.create(namespace("shown", EXPORT))
        s.store.create(namespace("hidden"))
        s.store.create(rich_pod("web-0", "shown"))
        s.store.create(rich_pod("istiod-0", "istio-system"))
        for i in range(3):
            s.store.create(rich_pod(f"{HIDDEN_POD}-{i}", "hidden"))
        yield s


async def started(
    cluster: SimAPIServer, world: World, tmp: Path, make_proxy: ProxyFactory
) -> tuple[ProxyServer, Any]:
    proxy, files = await proxy_for(cluster, world, tmp, make_proxy, SHIPPED)
    await asyncio.wait_for(proxy.nsview.wait_synced(), 10)
    return proxy, files


async def get(
    s: aiohttp.ClientSession, proxy: ProxyServer, path: str, accept: str = "application/json"
) -> tuple[int, bytes, str]:
    async with s.get(proxy.url + path, headers={"Accept": accept}) as r:
        return r.status, await r.read(), r.headers.get("Content-Type", "")


async def test_exported_pod_is_projected_and_hidden_pods_are_in_no_byte(
    world: World, cluster: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await started(cluster, world, tmp_path, make_proxy)
    async with session(world, tmp_path) as s:
        code, body, ctype = await get(
            s, proxy, "/api/v1/namespaces/shown/pods/web-0", PROTOBUF_FIRST
        )
        assert (code, ctype) == (200, "application/json")
        pod = json.loads(body)
        assert pod["metadata"]["labels"] == {"app": "web"}
        assert pod["metadata"]["annotations"] == {"team": "a"}
        assert "managedFields" not in pod["metadata"]
        assert pod["spec"] == {
            "containers": [
                {
                    "name": "",
                    "ports": [{"name": "http-web", "containerPort": 8080, "protocol": "TCP"}],
                }
            ],
            "serviceAccountName": "web-sa",
            "nodeName": "node-1",
        }
        assert pod["status"]["podIP"] == "10.0.0.7"
        assert b"hunter2" not in body

        answers: list[bytes] = []
        # GET of a hidden pod: 404 in kube-apiserver's words, as for a pod that does not exist.
        code, hidden, _ = await get(s, proxy, f"/api/v1/namespaces/hidden/pods/{HIDDEN_POD}-0")
        code_missing, missing, _ = await get(s, proxy, "/api/v1/namespaces/shown/pods/nope")
        assert (code, code_missing) == (404, 404)
        assert json.loads(hidden) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f'pods "{HIDDEN_POD}-0" not found',
            "reason": "NotFound",
            "details": {"name": f"{HIDDEN_POD}-0", "kind": "pods"},
            "code": 404,
        }
        assert json.loads(missing)["reason"] == "NotFound"
        code, body, _ = await get(s, proxy, "/api/v1/namespaces/hidden")
        assert code == 404
        # Cluster-wide and per-namespace lists.
        code, body, _ = await get(s, proxy, "/api/v1/pods", PROTOBUF_FIRST)
        assert code == 200
        answers.append(body)
        listed = json.loads(body)
        assert sorted(p["metadata"]["name"] for p in listed["items"]) == ["istiod-0", "web-0"]
        assert "remainingItemCount" not in listed["metadata"]
        code, body, _ = await get(s, proxy, "/api/v1/namespaces/hidden/pods")
        assert (code, json.loads(body)["items"]) == (200, [])
        answers.append(body)
        code, body, _ = await get(s, proxy, "/api/v1/namespaces")
        assert sorted(n["metadata"]["name"] for n in json.loads(body)["items"]) == [
            "istio-system",
            "shown",
        ]
        answers.append(body)
        # Pages of one item: the hidden pods sort between the visible ones' keys.
        names: list[str] = []
        path = "/api/v1/pods?limit=1"
        pages = 0
        while True:
            code, body, _ = await get(s, proxy, path)
            assert code == 200, body
            answers.append(body)
            page = json.loads(body)
            pages += 1
            assert len(page["items"]) <= 1
            assert "remainingItemCount" not in page["metadata"]
            names += [p["metadata"]["name"] for p in page["items"]]
            token = page["metadata"].get("continue")
            if not token:
                break
            assert token.startswith("apx1.")
            path = f"/api/v1/pods?limit=1&continue={token}"
        assert sorted(names) == ["istiod-0", "web-0"]
        assert pages >= 4  # pages that held only hidden pods came back empty, with a token
        # A token not sealed by the proxy (the upstream's own format) is refused as expired.
        code, body, _ = await get(
            s, proxy, "/api/v1/pods?limit=1&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"
        )
        assert code == 410
        # Only-protobuf: 406; Table only: 406; kubectl's Table-then-JSON Accept: JSON.
        code, body, _ = await get(s, proxy, "/api/v1/pods", "application/vnd.kubernetes.protobuf")
        assert (code, json.loads(body)["reason"]) == (406, "NotAcceptable")
        code, _, _ = await get(
            s, proxy, "/api/v1/pods", "application/json;as=Table;v=v1;g=meta.k8s.io"
        )
        assert code == 406
        # Metadata-only lists (istiod's metadata informers) are filtered too.
        code, body, _ = await get(
            s,
            proxy,
            "/api/v1/pods",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        assert code == 200
        answers.append(body)
        assert sorted(p["metadata"]["name"] for p in json.loads(body)["items"]) == [
            "istiod-0",
            "web-0",
        ]
        for answer in answers:
            assert HIDDEN_POD.encode() not in answer
            assert b"hunter2" not in answer
            assert b"managedFields" not in answer
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    code, out, err = await kubectl(kcfg, "get", "pods", "-A", "-o", "name")
    assert (code, sorted(out.split())) == (0, ["pod/istiod-0", "pod/web-0"]), err
    code, out, err = await kubectl(kcfg, "get", "pods", "-A")  # Table refused, kubectl prints JSON
    assert code == 0, err
    assert "web-0" in out
    assert HIDDEN_POD not in out
    code, out, err = await kubectl(kcfg, "get", "pod", "-n", "hidden", f"{HIDDEN_POD}-1")
    assert code == 1
    # kubectl then asks whether the namespace exists, and it does not either, for this peer.
    assert err == 'Error from server (NotFound): namespaces "hidden" not found\n'
    recs = await records(proxy, files)
    pod_lists = [r for r in recs if r["requestURI"].startswith("/api/v1/pods")]
    assert pod_lists
    assert all(
        r["annotations"]["apiproxy.io/filtered"] == "namespaces,projection=istiod-pod"
        for r in pod_lists
    )
    assert any(r["annotations"].get("apiproxy.io/items-hidden") == "3" for r in pod_lists), [
        r["annotations"] for r in pod_lists
    ][:2]
    sample = proxy.metrics.registry.get_sample_value(
        "apiproxy_filtered_items_total", {"peer": "cluster-a"}
    )
    assert sample is not None
    assert sample >= 6


async def read_events(resp: aiohttp.ClientResponse, until: str) -> list[dict[str, Any]]:
    """Events until one of type `until` (inclusive)."""
    out: list[dict[str, Any]] = []
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line, f"the watch ended before a {until} event: {out}"
        event = json.loads(line)
        out.append(event)
        if event["type"] == until:
            return out


async def test_watch_hides_events_and_expires_when_the_visible_set_changes(
    world: World, cluster: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await started(cluster, world, tmp_path, make_proxy)
    async with session(world, tmp_path) as s:
        _, body, _ = await get(s, proxy, "/api/v1/pods")
        rv = json.loads(body)["metadata"]["resourceVersion"]
        url = f"{proxy.url}/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
        async with s.get(url, headers={"Accept": PROTOBUF_FIRST}) as w:
            assert w.status == 200
            # Created, modified and deleted in the hidden namespace; then a visible marker.
            cluster.store.create(rich_pod(f"{HIDDEN_POD}-new", "hidden"))
            hidden = cluster.store.get("pods", f"{HIDDEN_POD}-new", "hidden")
            hidden["metadata"]["labels"] = {"app": "changed"}
            cluster.store.update(hidden)
            cluster.store.delete("pods", f"{HIDDEN_POD}-new", "hidden")
            cluster.store.create(rich_pod("web-1", "shown"))
            events = await read_events(w, "ADDED")
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", "web-1")
            ]
            assert "env" not in json.dumps(events)
            # The hidden namespace is exported: the watch ends with 410 Expired. A watch inside
            # another namespace is not concerned and stays open.
            inside = await s.get(
                f"{proxy.url}/api/v1/namespaces/shown/pods?watch=true&resourceVersion={rv}"
            )
            assert inside.status == 200
            ns = cluster.store.get("namespaces", "hidden")
            ns["metadata"]["labels"] = EXPORT
            cluster.store.update(ns)
            events = await read_events(w, "ERROR")
            assert events[-1]["object"]["code"] == 410
            assert events[-1]["object"]["reason"] == "Expired"
            assert await asyncio.wait_for(w.content.read(), 10) == b""
            cluster.store.create(rich_pod("web-2", "shown"))
            # web-1 (created after rv), then web-2; no ERROR in between.
            events = await read_events(inside, "ADDED") + await read_events(inside, "ADDED")
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", "web-1"),
                ("ADDED", "web-2"),
            ]
            inside.close()
        # Resuming from the old resourceVersion would skip what just became visible: 410.
        async with s.get(url) as w:
            assert w.status == 410
        # A fresh list shows the pods.
        _, body, _ = await get(s, proxy, "/api/v1/pods")
        names = {p["metadata"]["name"] for p in json.loads(body)["items"]}
        assert {f"{HIDDEN_POD}-0", "web-1"} <= names
        # WatchList (sendInitialEvents): the state as ADDED events, then the end bookmark.
        wl = (
            f"{proxy.url}/api/v1/pods?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"
            "&resourceVersionMatch=NotOlderThan"
        )
        async with s.get(wl) as w:
            events = await read_events(w, "BOOKMARK")
            added = {e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED"}
            assert added == names
            assert events[-1]["object"]["metadata"]["annotations"] == {
                "k8s.io/initial-events-end": "true"
            }
            # Unexported again: 410, and the next list no longer has them.
            ns = cluster.store.get("namespaces", "hidden")
            ns["metadata"]["labels"] = {}
            cluster.store.update(ns)
            events = await read_events(w, "ERROR")
            assert events[-1]["object"]["code"] == 410
        _code, body, _ = await get(s, proxy, "/api/v1/pods")
        assert HIDDEN_POD.encode() not in body


async def test_unfiltered_resources_are_still_copied_byte_for_byte(
    world: World, cluster: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await started(cluster, world, tmp_path, make_proxy)
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    async with session(world, tmp_path) as s:
        code, through, _ = await get(s, proxy, crd_path)
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=__import__("ssl").create_default_context(cadata=cluster.ca_pem)
                ),
                headers={"Authorization": f"Bearer {cluster.token}"},
            ) as direct,
            direct.get(cluster.url + crd_path) as r,
        ):
            upstream = await r.read()
        assert code == 200
        assert json.loads(through)["items"] == json.loads(upstream)["items"]
    recs = await records(proxy, files)
    crd = [r for r in recs if "customresourcedefinitions" in r["requestURI"]]
    assert crd
    assert all("apiproxy.io/filtered" not in r["annotations"] for r in crd)


PER_PEER = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: a-pods
  peers: [cluster-a]
  apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
  namespaces: {names: [shown]}
- name: b-pods
  peers: [cluster-b]
  apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
  namespaces: {names: [hidden]}
  projection: istiod-pod
"""


async def test_different_peers_see_different_namespaces(
    world: World, cluster: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await proxy_for(cluster, world, tmp_path, make_proxy, PER_PEER)
    assert not proxy.nsview.running  # names only: no namespace informer is needed
    seen: dict[str, set[str]] = {}
    for peer, cert in (("cluster-a", world.client_a), ("cluster-b", world.client_b)):
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=world.client_ssl(cert, tmp_path))
        ) as s:
            code, body, _ = await get(s, proxy, "/api/v1/pods")
            assert code == 200
            seen[peer] = {p["metadata"]["namespace"] for p in json.loads(body)["items"]}
            code, _, _ = await get(s, proxy, "/api/v1/namespaces/shown/pods/web-0")
            assert code == (200 if peer == "cluster-a" else 404)
    assert seen == {"cluster-a": {"shown"}, "cluster-b": {"hidden"}}


async def test_reload_that_changes_a_rules_namespaces_revokes_its_watches(
    world: World, cluster: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await started(cluster, world, tmp_path, make_proxy)
    async with (
        session(world, tmp_path) as s,
        s.get(proxy.url + "/api/v1/pods?watch=1") as pods,
        s.get(proxy.url + "/api/v1/services?watch=1") as services,
    ):
        assert (pods.status, services.status) == (200, 200)
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 2), 30)
        # Pods now also visible in "hidden"; services unchanged.
        widened = SHIPPED.replace(
            "    namespaces:\n      names: [istio-system]\n      selector:\n"
            '        matchLabels:\n          apiproxy.io/export: "true"\n'
            "    projection: istiod-pod\n",
            "    namespaces:\n      names: [istio-system, hidden]\n      selector:\n"
            '        matchLabels:\n          apiproxy.io/export: "true"\n'
            "    projection: istiod-pod\n",
        )
        assert widened != SHIPPED
        files.policy.write_text(widened)
        assert ("policy", True) in await proxy.reload_now()
        await asyncio.wait_for(pods.content.read(), 30)  # initial events, then the end
        assert pods.content.at_eof()
        assert proxy.open_watches("cluster-a") == 1
        assert not services.content.at_eof()
    recs = await records(proxy, files)
    ends = {
        r["requestURI"]: r["annotations"].get("apiproxy.io/stream-ended-by")
        for r in recs
        if "watch=1" in r["requestURI"]
    }
    assert ends["/api/v1/pods?watch=1"] == "revoked"
