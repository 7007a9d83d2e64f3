"""Fixtures of the real-apiserver tier: one etcd + kube-apiserver for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.cluster import KubeCluster, assets_dir, server_version


@pytest.fixture(scope="session")
def kube_assets() -> Path:
    return assets_dir()


@pytest.fixture(scope="session")
def kube_version(kube_assets: Path) -> tuple[int, int]:
    return server_version(kube_assets)


@pytest.fixture(scope="session")
def kube(kube_assets: Path) -> Iterator[KubeCluster]:
    cluster = KubeCluster(kube_assets, name="real").start()
    try:
        yield cluster
        # A server that crashed mid-suite must fail the run, not just the tests that noticed.
        cluster.check_alive()
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _kube_still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "kube" in request.fixturenames:
        request.getfixturevalue("kube").check_alive()
