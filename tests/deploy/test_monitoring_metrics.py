"""Every metric the alert rules and the dashboard use is exported by a running `serve` or
`federate` (the one its `job` names), so a renamed metric breaks this test, not the pager.

A proxy in front of the simulated kube-apiserver serves a little traffic (allowed, denied,
unauthenticated, a watch, a refused reload), and two federation controllers exchange metadata
over real TLS; then both /metrics endpoints are scraped over HTTP and parsed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apiproxy_dev.sim import SimAPIServer
from tests.federation import conftest as federation_fixtures
from tests.federation.conftest import Cluster
from tests.proxy import conftest as proxy_fixtures
from tests.proxy.conftest import ProxyFactory, World, make_files

from .monitoring import dashboard_queries, rule_exprs, selectors, substitute

# The proxy's and the federation's own fixtures: a simulated cluster behind a proxy, and
# simulated clusters with federation controllers.
world = proxy_fixtures.world
sim = proxy_fixtures.sim
make_proxy = proxy_fixtures.make_proxy
clusters = federation_fixtures.clusters
exporter_tls = federation_fixtures.exporter_tls

# Labels Prometheus adds to every scraped series (target labels), not exported by the process.
TARGET_LABELS = frozenset({"job", "namespace", "instance", "pod", "service", "endpoint"})
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


@dataclass
class Exported:
    """What one /metrics page exports: series names as Prometheus stores them, the label names
    seen on each, and the values of `le` (histogram buckets)."""

    names: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=dict)
    le: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exported:
        out = cls()
        for family in text_string_to_metric_families(text):
            # A family without samples yet (labelled, never used) still exports its names.
            out.names |= {family.name + s for s in SUFFIXES[family.type]}
            for sample in family.samples:
                out.names.add(sample.name)
                out.labels.setdefault(sample.name, set()).update(sample.labels)
                if "le" in sample.labels:
                    out.le.setdefault(sample.name, set()).add(sample.labels["le"])
        return out


def problems(exprs: list[str], exported: dict[str, Exported]) -> list[str]:
    found: list[str] = []
    for expr in exprs:
        for sel in selectors(expr):
            job = sel.matchers.get("job")
            where = [exported[job]] if job else list(exported.values())
            if job is not None and job not in exported:
                found.append(f"{sel.metric}: unknown job {job!r}")
                continue
            have = [e for e in where if sel.metric in e.names]
            if not have:
                found.append(f"{sel.metric} (job {job}) is not exported")
                continue
            for label, value in sel.matchers.items():
                if label in TARGET_LABELS:
                    continue
                seen = set().union(*(e.labels.get(sel.metric, set()) for e in have))
                if label not in seen:
                    found.append(f"{sel.metric} has no label {label!r} (seen: {sorted(seen)})")
                if label == "le" and not any(value in e.le.get(sel.metric, ()) for e in have):
                    found.append(f"{sel.metric} has no bucket le={value}")
    return found


async def scrape(port: int | None) -> str:
    assert port
    async with (
        aiohttp.ClientSession(trust_env=False) as s,
        s.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        assert r.status == 200
        return await r.text()


async def serve_metrics(
    world: World, sim: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> Exported:
    files = make_files(world, tmp_path)
    files.token.write_text(sim.token)
    files.upstream_ca.write_text(sim.ca_pem)
    proxy, _ = await make_proxy(sim.url, files=files)
    ssl_a = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_a)) as s:
        async with s.get(proxy.url + "/api/v1/namespaces/x/pods") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/api/v1/namespaces/x/secrets") as r:
            assert r.status == 403
        watch = await s.get(proxy.url + "/api/v1/namespaces/x/pods?watch=1")
        assert watch.status == 200
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 1), 10)
        watch.close()
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=world.client_ssl(None, tmp_path))
        ) as anon,
        anon.get(proxy.url + "/api/v1/pods") as r,
    ):
        assert r.status == 401
    files.policy.write_text("rules: [\n")
    assert await proxy.reload_now() == [("policy", False)]
    assert await proxy.probe_upstream()
    await proxy.audit.flush()
    return Exported.parse(await scrape(proxy.metrics_port))


async def federate_metrics(
    clusters: Callable[[str], Awaitable[Cluster]], exporter_tls: tuple[str, str], test_ca: object
) -> Exported:
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(metrics_listen="127.0.0.1:0", **tls)
    fb = await b.federation(**tls)
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)  # type: ignore[attr-defined]
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)  # type: ignore[attr-defined]
    await fa.reconcile()
    await fb.reconcile()
    await fa.reconcile()
    assert (a.condition("b", "PrivateMetadataExchangeReady") or {}).get("status") == "True"
    return Exported.parse(await scrape(fa.metrics_port))


@pytest.fixture
async def exported(
    world: World,
    sim: SimAPIServer,
    make_proxy: ProxyFactory,
    clusters: Callable[[str], Awaitable[Cluster]],
    exporter_tls: tuple[str, str],
    test_ca: object,
    tmp_path: Path,
) -> dict[str, Exported]:
    return {
        "api-proxy": await serve_metrics(world, sim, make_proxy, tmp_path),
        "apiproxy-federation": await federate_metrics(clusters, exporter_tls, test_ca),
    }


async def test_rules_use_only_exported_metrics(exported: dict[str, Exported]) -> None:
    exprs = rule_exprs()
    assert len({s.metric for e in exprs for s in selectors(e)}) >= 12
    assert problems(exprs, exported) == []


async def test_dashboard_uses_only_exported_metrics(exported: dict[str, Exported]) -> None:
    exprs = [substitute(q) for q in dashboard_queries()]
    assert len({s.metric for e in exprs for s in selectors(e)}) >= 20
    assert problems(exprs, exported) == []


async def test_the_check_catches_renames_wrong_jobs_labels_and_buckets(
    exported: dict[str, Exported],
) -> None:
    proxy = 'job="api-proxy"'
    assert problems([f"rate(apiproxy_request_total{{{proxy}}}[5m])"], exported)  # renamed
    assert problems([f"apiproxy_requests{{{proxy}}}"], exported)  # counter without _total
    assert problems([f"apiproxy_upstream_up_total{{{proxy}}}"], exported)  # gauge as counter
    assert problems(['apiproxy_upstream_up{job="apiproxy-federation"}'], exported)  # wrong job
    assert problems([f'apiproxy_requests_total{{{proxy}, result="forbid"}}'], exported)  # label
    assert problems(
        [f'apiproxy_request_duration_seconds_bucket{{{proxy}, le="0.003"}}'], exported
    )  # a bucket that does not exist
    assert problems(["process_resident_memory_bytes_total"], exported)  # not ours, no job either
    # and the real names pass
    assert not problems([f'apiproxy_requests_total{{{proxy}, decision="forbid"}}'], exported)
    assert not problems(
        [f'apiproxy_audit_queue_wait_seconds_bucket{{{proxy}, le="0.001"}}'], exported
    )
