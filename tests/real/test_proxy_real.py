"""apiproxy in front of the real kube-apiserver: kubectl, `kubernetes` and `kubernetes_asyncio`
go through it as peers (client certificate or peer JWT), and what they get is what the real server
says, under the least-privilege RBAC generated from the proxy's own policy."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.real.cluster import KubeCluster
from tests.real.conftest import UNCACHED
from tests.real.proxied import RealProxy, run_kubectl

PROTOBUF = "application/vnd.kubernetes.protobuf"
PROTOBUF_MAGIC = b"k8s\x00"


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def pod_template(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}},
    }


def create_pods(kube: KubeCluster, namespace: str, names: list[str]) -> None:
    kube.ensure_namespace(namespace)
    for name in names:
        kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", pod(name))


@pytest.fixture(scope="module")
def web_ns(kube: KubeCluster) -> str:
    create_pods(kube, "web", ["web-0", "web-1"])
    kube.ensure_namespace("team-a")
    for name in ("settings", "other"):
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "team-a"},
                "data": {"k": name},
            }
        )
    return "web"


def etcd_compact(kube: KubeCluster) -> int:
    """Compact etcd at its current revision through etcd 3.4's gRPC gateway (`/v3/kv/...`), as the
    apiserver's own compactor would after --etcd-compaction-interval; returns that revision."""

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{kube.etcd_port}{path}", data=json.dumps(body).encode()
        )
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            out: dict[str, Any] = json.loads(resp.read())
            return out

    head = call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
    revision = int(head["header"]["revision"])
    call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
    return revision


# -------------------------------------------------------------------------------------- kubectl


def test_kubectl_reads_a_table_through_the_proxy_with_a_client_certificate(
    real_proxy: RealProxy, web_ns: str, tmp_path: Path
) -> None:
    kcfg = real_proxy.kubeconfig(tmp_path / "kubeconfig")
    done = run_kubectl(kcfg, "get", "pods", "-n", web_ns)  # kubectl asks for as=Table
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert sorted(r.split()[0] for r in rows) == ["web-0", "web-1"]
    assert [r.split()[2] for r in rows] == ["Pending", "Pending"]  # no kubelet: never scheduled


def test_kubectl_with_a_peer_jwt_gets_the_real_servers_not_found_and_the_proxys_forbidden(
    real_proxy: RealProxy, web_ns: str, tmp_path: Path
) -> None:
    kcfg = real_proxy.kubeconfig(tmp_path / "kubeconfig", peer="cluster-b")
    done = run_kubectl(kcfg, "get", "pod", "nope", "-n", web_ns)
    assert done.returncode == 1
    assert done.stderr.strip() == 'Error from server (NotFound): pods "nope" not found'
    # cluster-b is not in the team-settings rule: the proxy refuses, in the server's words.
    done = run_kubectl(kcfg, "get", "configmap", "settings", "-n", "team-a")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        'Error from server (Forbidden): configmaps "settings" is forbidden: User "peer:cluster-b"'
        ' cannot get resource "configmaps" in API group "" in the namespace "team-a"'
    )
    # cluster-a is: the namespaced, named rule lets exactly that object through.
    kcfg_a = real_proxy.kubeconfig(tmp_path / "kubeconfig-a")
    done = run_kubectl(kcfg_a, "get", "configmap", "settings", "-n", "team-a", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"] == {"k": "settings"}
    done = run_kubectl(kcfg_a, "get", "configmap", "other", "-n", "team-a")
    assert done.returncode == 1
    assert '"peer:cluster-a" cannot get resource "configmaps"' in done.stderr


# ------------------------------------------------------------------- the official client (sync)


def test_official_client_pages_a_list_with_limit_and_continue(
    real_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    import kubernetes

    names = [f"page-{i}" for i in range(7)]
    create_pods(kube, "paging", names)
    api = kubernetes.config.new_client_from_config(
        config_file=str(real_proxy.kubeconfig(tmp_path / "kc", peer="cluster-b"))
    )
    try:
        v1 = kubernetes.client.CoreV1Api(api)
        seen: list[str] = []
        pages: list[int] = []
        token = None
        while True:
            page = v1.list_namespaced_pod("paging", limit=3, _continue=token)
            pages.append(len(page.items))
            seen += [p.metadata.name for p in page.items]
            token = page.metadata._continue
            if not token:
                break
            assert page.metadata.remaining_item_count == 7 - len(seen)
    finally:
        api.close()
    assert pages == [3, 3, 1]
    assert seen == sorted(names)


def test_continue_after_etcd_compaction_is_410_expired_and_the_client_relists(
    real_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    import kubernetes

    ns = "compacted"
    kube.ensure_namespace(ns)
    for i in range(5):
        kube.ok("POST", f"/api/v1/namespaces/{ns}/{UNCACHED}", pod_template(f"t-{i}"))
    api = kubernetes.config.new_client_from_config(
        config_file=str(real_proxy.kubeconfig(tmp_path / "kc"))
    )
    try:
        v1 = kubernetes.client.CoreV1Api(api)
        first = v1.list_namespaced_pod_template(ns, limit=2)
        listed_rv = first.metadata.resource_version
        # Two writes, then a compaction at the newest revision: the one right after the list
        # (where a watch from listed_rv would start) is gone.
        for name in ("t-5", "t-6"):
            kube.ok("POST", f"/api/v1/namespaces/{ns}/{UNCACHED}", pod_template(name))
        etcd_compact(kube)
        with pytest.raises(kubernetes.client.ApiException) as gone:
            v1.list_namespaced_pod_template(ns, limit=2, _continue=first.metadata._continue)
        assert gone.value.status == 410
        status = json.loads(gone.value.body)
        assert status["reason"] == "Expired"
        assert status["message"].startswith("The provided continue parameter is too old")

        # A watch from before the compaction: the server's ERROR event (410) reaches the client,
        # which gives up on that resourceVersion...
        w = kubernetes.watch.Watch()
        with pytest.raises(kubernetes.client.ApiException) as expired:
            for _ in w.stream(
                v1.list_namespaced_pod_template,
                ns,
                resource_version=listed_rv,
                timeout_seconds=10,
            ):
                pass
        assert expired.value.status == 410
        # ... and re-lists, as an informer does, then watches from the fresh resourceVersion.
        fresh = v1.list_namespaced_pod_template(ns)
        assert sorted(t.metadata.name for t in fresh.items) == [f"t-{i}" for i in range(7)]
        # t-7, created after the re-list: a watch from the list's resourceVersion must deliver it
        # (and nothing listed before), whenever the watch itself opens.
        kube.ok("POST", f"/api/v1/namespaces/{ns}/{UNCACHED}", pod_template("t-7"))
        got: list[tuple[str, str]] = []
        w = kubernetes.watch.Watch()
        for ev in w.stream(
            v1.list_namespaced_pod_template,
            ns,
            resource_version=fresh.metadata.resource_version,
            timeout_seconds=30,
            _request_timeout=60,
        ):
            got.append((ev["type"], ev["object"].metadata.name))
            w.stop()
    finally:
        api.close()
    assert got == [("ADDED", "t-7")]


# ------------------------------------------------------------- kubernetes_asyncio: watch resume


async def test_asyncio_client_resumes_a_watch_from_a_resource_version(
    real_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    from kubernetes_asyncio import client, config, watch

    ns = "resume"
    await asyncio.to_thread(create_pods, kube, ns, ["old-0", "old-1"])
    api = await config.new_client_from_config(
        config_file=str(real_proxy.kubeconfig(tmp_path / "kc"))
    )
    try:
        v1 = client.CoreV1Api(api)
        listed = await v1.list_namespaced_pod(ns)
        assert sorted(p.metadata.name for p in listed.items) == ["old-0", "old-1"]

        async def next_events(rv: str, create: str) -> list[tuple[str, str, str]]:
            """Create a pod, then watch from rv (older): events up to that pod's arrival."""
            await asyncio.to_thread(kube.ok, "POST", f"/api/v1/namespaces/{ns}/pods", pod(create))
            out: list[tuple[str, str, str]] = []
            w = watch.Watch()
            stream = w.stream(v1.list_namespaced_pod, ns, resource_version=rv, timeout_seconds=30)
            async with asyncio.timeout(60):
                async for ev in stream:
                    meta = ev["object"].metadata
                    out.append((ev["type"], meta.name, meta.resource_version))
                    if meta.name == create:
                        break
            w.stop()
            return out

        first = await next_events(listed.metadata.resource_version, "new-0")
        # Nothing listed before is replayed: the watch starts exactly after the list.
        assert [(t, n) for t, n, _ in first] == [("ADDED", "new-0")]
        # Resume from the last event seen, as a reconnecting informer does.
        second = await next_events(first[-1][2], "new-1")
        assert [(t, n) for t, n, _ in second] == [("ADDED", "new-1")]
    finally:
        await api.close()


async def test_asyncio_client_gets_bookmarks_through_the_proxy(
    real_proxy: RealProxy, kube: KubeCluster, tmp_path: Path
) -> None:
    from kubernetes_asyncio import client, config, watch

    ns = "bookmarks"
    await asyncio.to_thread(create_pods, kube, ns, ["b-0"])
    await asyncio.to_thread(kube.ensure_namespace, "bookmarks-other")
    api = await config.new_client_from_config(
        config_file=str(real_proxy.kubeconfig(tmp_path / "kc", peer="cluster-b"))  # a peer JWT
    )
    events: list[tuple[str, str, str]] = []
    other_rv = ""
    try:
        v1 = client.CoreV1Api(api)
        w = watch.Watch()
        # The watch cache sends a bookmark 2 s before the watch's deadline, carrying the newest
        # resourceVersion it processed: the other namespace's pod comes after the watch opened.
        async with asyncio.timeout(60):
            async for ev in w.stream(
                v1.list_namespaced_pod, ns, allow_watch_bookmarks=True, timeout_seconds=3
            ):
                meta = ev["raw_object"]["metadata"]
                events.append((ev["type"], meta.get("name", ""), meta["resourceVersion"]))
                if len(events) == 1:
                    created = await asyncio.to_thread(
                        kube.ok,
                        "POST",
                        "/api/v1/namespaces/bookmarks-other/pods",
                        pod("elsewhere"),
                    )
                    other_rv = created["metadata"]["resourceVersion"]
        w.stop()
    finally:
        await api.close()
    assert events[0][:2] == ("ADDED", "b-0")
    bookmarks = [e for e in events if e[0] == "BOOKMARK"]
    assert bookmarks, events
    assert int(bookmarks[-1][2]) >= int(other_rv)
    # The client keeps the bookmark's resourceVersion to resume from, as informers do.
    assert w.resource_version == bookmarks[-1][2]


# ---------------------------------------------------------------- representations and errors


def test_protobuf_passes_through_byte_for_byte(
    real_proxy: RealProxy, kube: KubeCluster, web_ns: str
) -> None:
    path = f"/api/v1/namespaces/{web_ns}/pods/web-0"
    code, headers, via_proxy = real_proxy.request("GET", path, headers={"Accept": PROTOBUF})
    assert code == 200
    assert headers["Content-Type"] == PROTOBUF
    assert via_proxy.startswith(PROTOBUF_MAGIC)
    direct = kube_raw(kube, path, {"Accept": PROTOBUF})
    assert via_proxy == direct
    code, headers, listed = real_proxy.request(
        "GET", f"/api/v1/namespaces/{web_ns}/pods", headers={"Accept": PROTOBUF}
    )
    assert (code, headers["Content-Type"]) == (200, PROTOBUF)
    assert listed.startswith(PROTOBUF_MAGIC)
    assert b"web-0" in listed
    assert b"web-1" in listed


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        ("application/json;as=Table;v=v1;g=meta.k8s.io", "Table"),
        ("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1", None),
    ],
)
def test_server_side_representations_of_a_list(
    real_proxy: RealProxy, web_ns: str, accept: str, kind: str | None
) -> None:
    code, _headers, raw = real_proxy.request(
        "GET", f"/api/v1/namespaces/{web_ns}/pods", headers={"Accept": accept}
    )
    assert code == 200
    body = json.loads(raw)
    if kind == "Table":
        assert body["kind"] == "Table"
        assert [c["name"] for c in body["columnDefinitions"]][:3] == ["Name", "Ready", "Status"]
        assert sorted(r["cells"][0] for r in body["rows"]) == ["web-0", "web-1"]
    else:
        assert body["kind"] == "PartialObjectMetadataList"
        assert body["apiVersion"] == "meta.k8s.io/v1"
        assert sorted(i["metadata"]["name"] for i in body["items"]) == ["web-0", "web-1"]
        assert all(set(i) == {"kind", "apiVersion", "metadata"} for i in body["items"])


def test_not_found_passes_through_unchanged(
    real_proxy: RealProxy, kube: KubeCluster, web_ns: str
) -> None:
    path = f"/api/v1/namespaces/{web_ns}/pods/nope"
    code, _, via_proxy = real_proxy.request("GET", path)
    assert code == 404
    assert via_proxy == kube_raw(kube, path, {"Accept": "application/json"}, expect=404)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/web/secrets",
        "/api/v1/namespaces/web/secrets/cacerts",
        "/api/v1/secrets",
        "/api/v1/namespaces/web/pods/web-0/log",
        "/api/v1/namespaces/team-a/configmaps/other",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/apps/v1/namespaces/web/deployments/app",
        "/api/v1/namespaces/web/secrets?watch=1",
        "/metrics",
    ],
)
def test_a_refusal_is_worded_as_the_real_server_words_it(
    real_proxy: RealProxy, kube: KubeCluster, web_ns: str, path: str
) -> None:
    """The proxy refuses what its policy does not allow; the real server refuses the same request
    from the proxy's service account, whose RBAC came from that policy. Same Status, other user."""
    code, headers, via_proxy = real_proxy.request("GET", path)
    assert code == 403
    assert headers["Content-Type"] == "application/json"
    sa_user = "system:serviceaccount:{}:{}".format(*real_proxy.service_account)
    real_code, real = kube.request("GET", path, token=real_proxy.upstream_token)
    assert real_code == 403, real
    ours = json.loads(via_proxy)
    ours["message"] = ours["message"].replace('"peer:cluster-a"', f'"{sa_user}"')
    assert ours == real


def kube_raw(kube: KubeCluster, path: str, headers: dict[str, str], expect: int = 200) -> bytes:
    """The admin's answer straight from the apiserver, raw bytes."""
    req = urllib.request.Request(kube.url + path, headers=headers)  # noqa: S310
    req.add_header("Authorization", f"Bearer {kube.admin_token}")
    try:
        with urllib.request.urlopen(req, context=kube.ssl_context(), timeout=30) as resp:  # noqa: S310
            code, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        code, raw = err.code, err.read()
    assert code == expect
    return bytes(raw)


# ------------------------------------------------------------------ what 1.20 does not have yet


def _needs(kube_version: tuple[int, int], minor: int, what: str) -> None:
    if kube_version < (1, minor):
        pytest.skip(f"kube-apiserver {kube_version[0]}.{kube_version[1]} has no {what}")


def test_endpointslices_v1_through_the_proxy(
    real_proxy: RealProxy, kube: KubeCluster, kube_version: tuple[int, int]
) -> None:
    _needs(kube_version, 21, "discovery.k8s.io/v1 (added in 1.21)")
    kube.ensure_namespace("slices")
    kube.ok(
        "POST",
        "/apis/discovery.k8s.io/v1/namespaces/slices/endpointslices",
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"]}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    )
    code, _, raw = real_proxy.request(
        "GET", "/apis/discovery.k8s.io/v1/namespaces/slices/endpointslices"
    )
    assert code == 200
    assert [i["metadata"]["name"] for i in json.loads(raw)["items"]] == ["web-abc"]


async def test_watch_list_streams_initial_events_then_a_bookmark(
    real_proxy: RealProxy, kube: KubeCluster, kube_version: tuple[int, int]
) -> None:
    # Added in 1.27 behind the WatchList gate, which is on by default from 1.32.
    _needs(kube_version, 32, "WatchList / sendInitialEvents on by default (from 1.32)")
    await asyncio.to_thread(create_pods, kube, "watchlist", ["w-0", "w-1"])
    target = (
        "/api/v1/namespaces/watchlist/pods?watch=1&sendInitialEvents=true"
        "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=10"
    )
    code, _, raw = await asyncio.to_thread(real_proxy.request, "GET", target)
    assert code == 200, raw[:300]
    events = [json.loads(line) for line in raw.splitlines() if line.strip()]
    added = sorted(e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED")
    assert added == ["w-0", "w-1"]
    marks = [e for e in events if e["type"] == "BOOKMARK"]
    assert any(
        m["object"]["metadata"].get("annotations", {}).get("k8s.io/initial-events-end") == "true"
        for m in marks
    )


def test_aggregated_discovery_through_the_proxy(
    real_proxy: RealProxy, kube_version: tuple[int, int]
) -> None:
    _needs(kube_version, 26, "aggregated discovery (added in 1.26)")
    version = "v2" if kube_version >= (1, 30) else "v2beta1"
    code, _headers, raw = real_proxy.request(
        "GET",
        "/apis",
        headers={
            "Accept": f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
        },
    )
    assert code == 200
    body = json.loads(raw)
    assert body["kind"] == "APIGroupDiscoveryList"
    assert any(g["metadata"]["name"] == "discovery.k8s.io" for g in body["items"])
