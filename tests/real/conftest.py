"""Fixtures of the real-apiserver tier: one etcd + kube-apiserver for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.cluster import KubeCluster, assets_dir, server_version
from tests.real.proxied import Peers, RealProxy

# PodTemplates skip the watch cache, so their watches and paginated lists are served by etcd
# itself: that is where a compaction shows (410 Gone) the way it does in a long-lived cluster.
# Nothing else in the suite uses PodTemplates, so the rest sees a stock apiserver.
UNCACHED = "podtemplates"


@pytest.fixture(scope="session")
def kube_assets() -> Path:
    return assets_dir()


@pytest.fixture(scope="session")
def kube_version(kube_assets: Path) -> tuple[int, int]:
    return server_version(kube_assets)


@pytest.fixture(scope="session")
def kube(kube_assets: Path) -> Iterator[KubeCluster]:
    cluster = KubeCluster(
        kube_assets, name="real", extra_args=[f"--watch-cache-sizes={UNCACHED}#0"]
    ).start()
    try:
        yield cluster
        # A server that crashed mid-suite must fail the run, not just the tests that noticed.
        cluster.check_alive()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def peers() -> Peers:
    return Peers.make()


@pytest.fixture(scope="session")
def real_proxy(
    kube: KubeCluster, peers: Peers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealProxy]:
    """`apiproxy serve` (the CLI) in front of `kube`, forwarding under a TokenRequest token of a
    ServiceAccount bound only to the RBAC that `apiproxy policy rbac` generates for its policy."""
    proxy = RealProxy(kube, peers, tmp_path_factory.mktemp("real-proxy")).start()
    try:
        yield proxy
        proxy.check_alive()
    finally:
        proxy.stop()


@pytest.fixture(autouse=True)
def _kube_still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "kube" in request.fixturenames:
        request.getfixturevalue("kube").check_alive()
    if "real_proxy" in request.fixturenames:
        request.getfixturevalue("real_proxy").check_alive()
