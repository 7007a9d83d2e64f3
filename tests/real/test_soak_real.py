"""A soak through apiproxy against the real apiserver: the kind of sustained list/watch load under
which the reflect2 build of kube-apiserver died (`fatal error: fault` in mapiternext). A server or
proxy that dies fails the test loudly; nothing here skips."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from tests.real.cluster import KubeCluster
from tests.real.proxied import RealProxy

NAMESPACE = "soak"
PODS = 300
SECONDS = 20.0
ACCEPTS = (
    "application/json",
    "application/vnd.kubernetes.protobuf",
    "application/json;as=Table;v=v1;g=meta.k8s.io",
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
)


def soak_pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"soak-{i}",
            "labels": {"app": f"app-{i % 7}", "tier": "soak"},
            "annotations": {f"note-{k}": "x" * 40 for k in range(5)},
        },
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "env": [{"name": f"E{k}", "value": str(k)} for k in range(5)],
                }
            ]
        },
    }


async def test_soak_lists_and_watches_through_the_proxy(
    real_proxy: RealProxy, kube: KubeCluster
) -> None:
    await asyncio.to_thread(kube.ensure_namespace, NAMESPACE)
    admin = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kube.ssl_context(), limit=16),
        headers={"Authorization": f"Bearer {kube.admin_token}"},
    )
    peer = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=real_proxy.ssl_context(), limit=32)
    )
    base = f"/api/v1/namespaces/{NAMESPACE}/pods"
    counts = {"lists": 0, "pages": 0, "watch_events": 0, "updates": 0}
    async with admin, peer:

        async def create(i: int) -> None:
            async with admin.post(kube.url + base, json=soak_pod(i)) as resp:
                assert resp.status == 201, await resp.text()

        await asyncio.gather(*(create(i) for i in range(PODS)))
        deadline = time.monotonic() + SECONDS

        async def lister(n: int) -> None:
            while time.monotonic() < deadline:
                accept = ACCEPTS[(n + counts["lists"]) % len(ACCEPTS)]
                token = ""
                names = 0
                while True:
                    query = "limit=70" + (f"&continue={token}" if token else "")
                    if accept != "application/json":  # the server-side representations whole
                        query = "labelSelector=tier%3Dsoak"
                    async with peer.get(
                        f"{real_proxy.url}{base}?{query}", headers={"Accept": accept}
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                        raw = await resp.read()
                    counts["pages"] += 1
                    if accept.startswith("application/vnd.kubernetes.protobuf"):
                        assert raw.startswith(b"k8s\x00")
                        names = PODS
                        break
                    body = json.loads(raw)
                    names += len(body.get("rows", body.get("items", [])))
                    token = body["metadata"].get("continue", "")
                    if not token:
                        break
                assert names == PODS, (accept, names)
                counts["lists"] += 1

        async def watcher() -> None:
            while time.monotonic() < deadline:
                async with peer.get(
                    f"{real_proxy.url}{base}?limit=1", headers={"Accept": "application/json"}
                ) as resp:
                    rv = (await resp.json())["metadata"]["resourceVersion"]
                async with peer.get(
                    f"{real_proxy.url}{base}?watch=1&resourceVersion={rv}&timeoutSeconds=2"
                    "&allowWatchBookmarks=true"
                ) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        event = json.loads(line)
                        assert event["type"] in ("MODIFIED", "BOOKMARK"), event
                        counts["watch_events"] += 1

        async def updater() -> None:
            i = 0
            while time.monotonic() < deadline:
                patch = {"metadata": {"labels": {"round": str(i)}}}
                async with admin.patch(
                    f"{kube.url}{base}/soak-{i % PODS}",
                    data=json.dumps(patch),
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                counts["updates"] += 1
                i += 1

        await asyncio.gather(
            *(lister(n) for n in range(3)), *(watcher() for _ in range(3)), updater()
        )
    # Both processes still serve: a crash mid-soak fails here (and in the autouse check) loudly.
    kube.check_alive()
    real_proxy.check_alive()
    assert kube.ok("GET", "/readyz") == "ok"
    assert counts["lists"] >= 3
    assert counts["updates"] > 0
    assert counts["watch_events"] > 0, counts
