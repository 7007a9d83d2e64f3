"""istiod's informer set, opened by the real client-go through the proxy with the shipped policy
against the simulator: every informer syncs, no request is refused, secrets come back empty and
never reach the upstream, with WatchList on and off."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests import informers
from tests.proxy.conftest import ProxyFactory, World, audit_records
from tests.proxy.test_e2e_sim import kubeconfig
from tests.proxy.test_empty_view import SHIPPED, RecordingSim, proxy_for, secrets_seen


@pytest.fixture(scope="module")
def clientgo() -> Path:
    return informers.binary()


@pytest.fixture
async def cluster() -> AsyncIterator[RecordingSim]:
    s = RecordingSim()
    async with s:
        for crd in informers.CRDS:
            s.store.create(crd)
        for obj in informers.objects():
            s.store.create(obj)
        s.seen.clear()
        yield s


async def expected_counts(sim: RecordingSim) -> dict[str, int]:
    """What each informer must hold: the upstream's own answer to istiod's queries, except
    secrets (an empty view) and the mesh ConfigMap (forwarded by name)."""
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
    ctx = ssl.create_default_context(cadata=sim.ca_pem)
    out: dict[str, int] = {"secrets": 0}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx),
        headers={"Authorization": f"Bearer {sim.token}"},
    ) as s:
        async with s.get(sim.url + "/api/v1/namespaces") as r:
            namespaces = (await r.json())["items"]
        for name, path in queries.items():
            async with s.get(sim.url + path) as r:
                assert r.status == 200, (path, await r.text())
                items = (await r.json())["items"]
                out[name] = informers.shipped_visible(name, items, namespaces)
        selector = informers.SECRETS_SELECTOR.replace("!", "%21").replace("=", "%3D")
        async with s.get(sim.url + f"/api/v1/secrets?fieldSelector={selector}") as r:
            real_secrets = len((await r.json())["items"])
    # The fixture holds a secret istiod's selector keeps, and a failed pod its selector drops:
    # the counts below would be wrong if the view or a selector were lost on the way.
    assert real_secrets >= 1
    assert out["pods"] == 1
    sim.seen.clear()
    return out


@pytest.mark.parametrize("watchlist", [False, True], ids=["list-watch", "watch-list"])
async def test_istiod_informer_set_syncs_through_the_shipped_policy(
    world: World,
    cluster: RecordingSim,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    clientgo: Path,
    watchlist: bool,
) -> None:
    expected = await expected_counts(cluster)
    proxy, files = await proxy_for(cluster, world, tmp_path, make_proxy, SHIPPED)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    report = await informers.run(clientgo, kcfg, watchlist=watchlist)
    assert report["synced"], (report["unsynced"], report["watchErrors"], report["stderr"])
    assert report["watchList"] is watchlist
    assert report["watching"], report["requests"]
    assert report["counts"] == expected
    refused = [r for r in report["requests"] if r["status"] >= 400 or r.get("error")]
    assert refused == [], refused
    # Every informer took the path asked for; a silent fallback from WatchList would fail here.
    for name in informers.INFORMERS:
        reqs = informers.requests_for(report, name)
        assert reqs, f"no request for {name}"
        if watchlist:
            assert informers.used_watch_list(report, name), (name, reqs)
        else:
            assert informers.used_list_then_watch(report, name), (name, reqs)
    # istiod's Accept reached the proxy on the typed informers: protobuf first, JSON fallback.
    (pods_first, *_) = informers.requests_for(report, "pods")
    assert pods_first["accept"] == "application/vnd.kubernetes.protobuf,application/json"
    assert secrets_seen(cluster) == []
    await proxy.audit.flush()
    decisions = {
        r["annotations"]["authorization.k8s.io/decision"]
        for r in audit_records(files.audit)
        if "annotations" in r and "authorization.k8s.io/decision" in r["annotations"]
    }
    assert decisions == {"allow"}
    views = {
        r["objectRef"]["resource"]
        for r in audit_records(files.audit)
        if r.get("annotations", {}).get("apiproxy.io/view") == "empty"
    }
    assert views == {"secrets"}
