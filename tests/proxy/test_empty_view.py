"""`view: empty`: reads the policy answers with an empty view never reach the upstream, and real
clients (kubectl, kubernetes, kubernetes_asyncio, raw watch streams) decode what they get."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apiproxy import view
from apiproxy.policy.shipped import shipped_policy
from apiproxy.server import ProxyServer
from apiproxy_dev.sim import SimAPIServer
from tests.proxy.conftest import (
    ProxyFactory,
    World,
    audit_records,
    make_files,
    pod,
)
from tests.proxy.test_e2e_sim import kubeconfig, kubectl

SHIPPED = shipped_policy("istio-remote.yaml").read_text()

VIEW_POLICY = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: pods
  peers: ["*"]
  apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- name: empty-secrets
  peers: ["*"]
  apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
  view: empty
- name: empty-gateways
  peers: ["*"]
  apiGroups: [gateway.networking.k8s.io]
  resources: [gateways]
  verbs: [list, watch]
  view: empty
"""


_SECRETS_RULE = VIEW_POLICY[
    VIEW_POLICY.index("- name: empty-secrets") : VIEW_POLICY.index("- name: empty-gateways")
]
WITHOUT_SECRETS = VIEW_POLICY.replace(_SECRETS_RULE, "")


class RecordingSim(SimAPIServer):
    """The simulator, remembering every request target that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.raw_path)
        return await super()._handle(request)


@pytest.fixture
async def rsim() -> AsyncIterator[RecordingSim]:
    s = RecordingSim()
    async with s:
        # Exported: the shipped policy shows a peer only exported namespaces (and istio-system).
        s.store.create(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "x", "labels": {"apiproxy.io/export": "true"}},
            }
        )
        s.store.create(pod("web-0"))
        s.store.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "cacerts", "namespace": "x"},
                "stringData": {"ca-key.pem": "PRIVATE-KEY-MATERIAL"},
            }
        )
        yield s


async def proxy_for(
    sim: SimAPIServer, world: World, tmp: Path, make_proxy: ProxyFactory, policy: str, **kw: Any
) -> tuple[ProxyServer, Any]:
    files = make_files(world, tmp, policy=policy)
    files.token.write_text(sim.token)
    files.upstream_ca.write_text(sim.ca_pem)
    return await make_proxy(sim.url, files=files, **kw)


def session(world: World, tmp: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=world.client_ssl(world.client_a, tmp))
    )


def secrets_seen(sim: RecordingSim) -> list[str]:
    return [p for p in sim.seen if "secrets" in p]


async def records(proxy: ProxyServer, files: Any) -> list[dict[str, Any]]:
    await proxy.audit.flush()
    return [r for r in audit_records(files.audit) if r["stage"] == "ResponseComplete"]


async def test_kubectl_sees_no_secrets_and_the_upstream_sees_no_request(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, SHIPPED)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    code, out, err = await kubectl(kcfg, "get", "secrets", "-A")
    assert (code, out) == (0, ""), err
    assert "No resources found" in err
    code, out, err = await kubectl(kcfg, "get", "secrets", "-n", "x", "-o", "json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed["items"] == []
    code, out, err = await kubectl(kcfg, "get", "secret", "cacerts", "-n", "x")
    assert code == 1
    assert 'Error from server (NotFound): secrets "cacerts" not found' in err
    # The pods the policy forwards are still real.
    code, out, err = await kubectl(kcfg, "get", "pods", "-n", "x", "-o", "name")
    assert (code, out) == (0, "pod/web-0\n"), err
    assert secrets_seen(rsim) == []
    assert any("/pods" in p for p in rsim.seen)
    secret_records = [r for r in await records(proxy, files) if "secrets" in r["requestURI"]]
    assert len(secret_records) == 3
    for r in secret_records:
        assert r["annotations"]["authorization.k8s.io/decision"] == "allow"
        assert r["annotations"]["apiproxy.io/rule"] == "istio-remote-empty-secrets"
        assert r["annotations"][view.ANNOTATION] == "empty"
    assert sorted(r["responseStatus"]["code"] for r in secret_records) == [200, 200, 404]
    assert "PRIVATE-KEY-MATERIAL" not in files.audit.read_text()


async def test_official_client_lists_and_gets_through_the_view(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    import kubernetes

    proxy, _ = await proxy_for(rsim, world, tmp_path, make_proxy, SHIPPED)
    kcfg = kubeconfig(world, proxy, world.client_b, tmp_path / "kubeconfig")

    def run() -> tuple[Any, Any, Any]:
        api_client = kubernetes.config.new_client_from_config(config_file=str(kcfg))
        try:
            v1 = kubernetes.client.CoreV1Api(api_client)
            listed = v1.list_secret_for_all_namespaces(
                field_selector="type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token"
            )
            with pytest.raises(kubernetes.client.ApiException) as missing:
                v1.read_namespaced_secret("cacerts", "x")
            # The version the list gave is accepted back by a watch, which ends at its timeout.
            w = kubernetes.watch.Watch()
            events = list(
                w.stream(
                    v1.list_secret_for_all_namespaces,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=1,
                )
            )
            return listed, missing.value, events
        finally:
            api_client.close()

    listed, missing, events = await asyncio.to_thread(run)
    assert listed.kind == "SecretList"
    assert listed.items == []
    assert listed.metadata.resource_version == view.RESOURCE_VERSION
    assert missing.status == 404
    body = json.loads(missing.body)
    assert (body["reason"], body["details"]) == ("NotFound", {"name": "cacerts", "kind": "secrets"})
    assert events == []
    assert secrets_seen(rsim) == []


async def test_kubernetes_asyncio_watch_list_gets_the_initial_events_end_bookmark(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    from kubernetes_asyncio import client, config

    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, SHIPPED)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    api_client = await config.new_client_from_config(config_file=str(kcfg))
    async with api_client:
        v1 = client.CoreV1Api(api_client)
        resp = await v1.list_secret_for_all_namespaces(
            watch=True,
            allow_watch_bookmarks=True,
            send_initial_events=True,
            resource_version_match="NotOlderThan",
            timeout_seconds=2,
            _preload_content=False,
        )
        lines = [json.loads(line) async for line in resp.content if line.strip()]
        resp.release()
    # The stream ended by itself at timeoutSeconds, having said "no objects" at once.
    assert [ev["type"] for ev in lines] == ["BOOKMARK"]
    obj = lines[0]["object"]
    assert (obj["kind"], obj["apiVersion"]) == ("Secret", "v1")
    assert obj["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert obj["metadata"]["resourceVersion"] == view.RESOURCE_VERSION
    (rec,) = [r for r in await records(proxy, files) if "secrets" in r["requestURI"]]
    assert (
        rec["annotations"]["apiproxy.io/stream-ended-by"] == "completed"
    )  # at its own timeoutSeconds, not a cap
    assert rec["annotations"]["apiproxy.io/watch-events"] == "1"
    assert secrets_seen(rsim) == []


@pytest.mark.parametrize(
    ("accept", "kind", "api_version"),
    [
        ("", "SecretList", "v1"),
        ("application/vnd.kubernetes.protobuf,application/json", "SecretList", "v1"),
        ("application/vnd.kubernetes.protobuf", "SecretList", "v1"),
        (
            "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json",
            "PartialObjectMetadataList",
            "meta.k8s.io/v1",
        ),
        (
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            "Table",
            "meta.k8s.io/v1",
        ),
        ("application/json;as=Foo;g=meta.k8s.io;v=v1,application/json", "SecretList", "v1"),
    ],
)
async def test_list_answers_json_in_the_asked_shape(
    world: World,
    rsim: RecordingSim,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    accept: str,
    kind: str,
    api_version: str,
) -> None:
    proxy, _ = await proxy_for(rsim, world, tmp_path, make_proxy, VIEW_POLICY)
    headers = {"Accept": accept} if accept else {}
    async with (
        session(world, tmp_path) as s,
        s.get(proxy.url + "/api/v1/namespaces/x/secrets?limit=500", headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        body = await r.json()
    assert (body["kind"], body["apiVersion"]) == (kind, api_version)
    assert body["metadata"] == {"resourceVersion": view.RESOURCE_VERSION}
    assert body.get("items", body.get("rows")) == []
    assert secrets_seen(rsim) == []


async def test_group_resource_list_and_refusals(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, VIEW_POLICY)
    base = proxy.url + "/apis/gateway.networking.k8s.io/v1"
    async with session(world, tmp_path) as s:
        async with s.get(base + "/gateways") as r:
            assert r.status == 200
            assert await r.json() == {
                "kind": "GatewayList",
                "apiVersion": "gateway.networking.k8s.io/v1",
                "metadata": {"resourceVersion": "1"},
                "items": [],
            }
        # The rule allows list and watch only: a named get is refused, not viewed.
        async with s.get(base + "/namespaces/a/gateways/g") as r:
            assert r.status == 403
        async with s.get(
            proxy.url + "/api/v1/secrets", headers={"Accept": "application/yaml"}
        ) as r:
            assert r.status == 406
            assert (await r.json())["reason"] == "NotAcceptable"
        async with s.get(
            proxy.url + "/api/v1/secrets?watch=1&sendInitialEvents=true"
            "&resourceVersionMatch=NotOlderThan"
        ) as r:
            assert r.status == 422  # WatchList without allowWatchBookmarks, as the server says
            assert "allowWatchBookmarks" in (await r.json())["message"]
        async with s.get(proxy.url + "/api/v1/secrets?sendInitialEvents=true") as r:
            assert r.status == 422
        async with s.get(proxy.url + "/api/v1/secrets?watch=1&timeoutSeconds=soon") as r:
            assert r.status == 400
        async with s.get(proxy.url + "/apis/gateway.networking.k8s.io/v1beta1/gateways") as r:
            assert (await r.json())["apiVersion"] == "gateway.networking.k8s.io/v1beta1"
    assert rsim.seen == [] or all("gateway" not in p and "secrets" not in p for p in rsim.seen)
    await proxy.audit.flush()
    codes = sorted(
        r["responseStatus"]["code"]
        for r in audit_records(files.audit)
        if r["stage"] == "ResponseComplete"
    )
    assert codes == [200, 200, 400, 403, 406, 422, 422]
    base_m = f"http://127.0.0.1:{proxy.metrics_port}/metrics"
    async with aiohttp.ClientSession() as plain, plain.get(base_m) as m:
        text = await m.text()
    assert (
        'apiproxy_requests_total{code="200",decision="allow",peer="cluster-a",'
        'resource="gateways",verb="list"} 2.0' in text
    )
    assert (
        'apiproxy_requests_total{code="422",decision="allow",peer="cluster-a",'
        'resource="secrets",verb="watch"} 1.0' in text
    )


async def read_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    line = await asyncio.wait_for(resp.content.readline(), 30)
    assert line, "the stream ended"
    return dict(json.loads(line))


async def test_watch_sends_bookmarks_when_asked_and_holds_a_watch_slot(
    world: World,
    rsim: RecordingSim,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(view, "BOOKMARK_INTERVAL_SECONDS", 0.05)
    proxy, _ = await proxy_for(
        rsim, world, tmp_path, make_proxy, VIEW_POLICY, max_watches_per_peer=1
    )
    url = proxy.url + "/apis/gateway.networking.k8s.io/v1/gateways?watch=1&allowWatchBookmarks=true"
    async with session(world, tmp_path) as s, s.get(url) as r:
        assert r.status == 200
        for _ in range(2):
            ev = await read_event(r)
            assert ev["type"] == "BOOKMARK"
            assert ev["object"]["kind"] == "Gateway"
            assert "annotations" not in ev["object"]["metadata"]
        # The view watch counts against the peer's watch limit like a forwarded one.
        assert proxy.open_watches("cluster-a") == 1
        async with s.get(proxy.url + "/api/v1/namespaces/x/pods?watch=1") as second:
            assert second.status == 429
    await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0), 30)
    assert rsim.seen == [] or all("gateway" not in p for p in rsim.seen)


async def test_watch_without_bookmarks_stays_silent_until_shutdown(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, VIEW_POLICY)
    async with session(world, tmp_path) as s, s.get(proxy.url + "/api/v1/secrets?watch=1") as r:
        assert r.status == 200
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 1), 30)
        await proxy.stop()
        assert await asyncio.wait_for(r.content.read(), 30) == b""
    (rec,) = [
        x
        for x in audit_records(files.audit)
        if x["stage"] == "ResponseComplete" and "secrets" in x["requestURI"]
    ]
    assert rec["annotations"]["apiproxy.io/stream-ended-by"] == "shutdown"
    assert rec["annotations"]["apiproxy.io/watch-events"] == "0"


@pytest.mark.parametrize(
    ("new_policy", "ended_by"),
    [
        # The view rule is gone: the watch must end (the peer may no longer read at all).
        (WITHOUT_SECRETS, "revoked"),
        # Now forwarded: the open view would hide real data the client should re-list.
        (
            VIEW_POLICY.replace(
                "  view: empty\n- name: empty-gateways", "  dangerous: true\n- name: empty-gateways"
            ),
            "revoked",
        ),
    ],
)
async def test_reload_revokes_view_watches_whose_answer_changed(
    world: World,
    rsim: RecordingSim,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    new_policy: str,
    ended_by: str,
) -> None:
    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, VIEW_POLICY)
    async with (
        session(world, tmp_path) as s,
        s.get(proxy.url + "/api/v1/secrets?watch=1") as r,
        s.get(proxy.url + "/apis/gateway.networking.k8s.io/v1/gateways?watch=1") as kept,
    ):
        assert (r.status, kept.status) == (200, 200)
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 2), 30)
        files.policy.write_text(new_policy)
        assert ("policy", True) in await proxy.reload_now()
        assert await asyncio.wait_for(r.content.read(), 30) == b""
        # The gateways view is unchanged by the reload: it stays open.
        assert proxy.open_watches("cluster-a") == 1
        assert not kept.content.at_eof()
    await proxy.audit.flush()
    ends = {
        x["requestURI"].split("?")[0]: x["annotations"]["apiproxy.io/stream-ended-by"]
        for x in audit_records(files.audit)
        if x["stage"] == "ResponseComplete"
    }
    assert ends["/api/v1/secrets"] == ended_by


async def test_reload_revokes_a_forwarded_watch_that_is_now_a_view(
    world: World, rsim: RecordingSim, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(rsim, world, tmp_path, make_proxy, VIEW_POLICY)
    async with (
        session(world, tmp_path) as s,
        s.get(proxy.url + "/api/v1/namespaces/x/pods?watch=1") as r,
    ):
        first = await read_event(r)
        assert first["object"]["metadata"]["name"] == "web-0"
        files.policy.write_text(
            VIEW_POLICY.replace(
                "verbs: [get, list, watch]\n- name: empty-secrets",
                "verbs: [get, list, watch]\n  view: empty\n- name: empty-secrets",
                1,
            )
        )
        assert ("policy", True) in await proxy.reload_now()
        assert await asyncio.wait_for(r.content.read(), 30) == b""
    async with session(world, tmp_path) as s, s.get(proxy.url + "/api/v1/namespaces/x/pods") as r:
        assert (await r.json())["items"] == []
