"""Fixtures of the istiod tier: two real clusters, each with apiproxy and a real istiod, joined
into one mesh by two IstioMulticluster objects. Nothing here skips: a binary that does not build or
a part that does not come up fails the run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apiproxy import pki
from tests.istiod.mesh import Side, istiod_binary, start_clusters, wait_until
from tests.real.cluster import KubeCluster, assets_dir

# The bound within which a joined peer must show as synced, with its endpoints, in istiod. Measured
# here at a few seconds (federation's 2 s resync, istiod's informer start); the bound leaves room
# for a loaded CI machine.
JOIN_BOUND = 90.0
# The bound for one change in the peer (a pod added, readied, deleted) to reach istiod.
CHANGE_BOUND = 30.0

pytestmark = pytest.mark.slow


@dataclass
class Mesh:
    a: Side
    b: Side
    ca: pki.KeyPair
    join_seconds: float

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.a, self.b

    def check_alive(self) -> None:
        self.a.check_alive()
        self.b.check_alive()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    istiod = istiod_binary()
    assets = assets_dir()
    ca = pki.make_ca("mesh test CA")
    tls = pki.server_cert_for_loopback(ca)
    kubes = [KubeCluster(assets, name=n, audit=True) for n in ("mesh-a", "mesh-b")]
    sides: list[Side] = []
    try:
        start_clusters(kubes)
        gateways = ("192.0.2.10", "192.0.2.20")  # TEST-NET: advertised, never dialled
        for kube, name, gw in zip(kubes, ("alpha", "beta"), gateways, strict=True):
            side = Side(
                name, kube, tmp_path_factory.mktemp(name), tls, pki.make_ca(f"istio root {name}")
            )
            sides.append(side)
            side.prepare(gw)
            side.start_proxy()
            side.start_federate()
            side.start_istiod(istiod)
        a, b = sides
        a.join(b, "beta", ca.cert_pem)
        b.join(a, "alpha", ca.cert_pem)
        _, took = wait_until(
            lambda: all(s.istiod and peer_synced(s, o) for s, o in ((a, b), (b, a))),
            JOIN_BOUND,
            "each istiod lists its peer as synced",
        )
        m = Mesh(a, b, ca, took)
        yield m
        m.check_alive()
    finally:
        for side in sides:
            side.stop()
        for kube in kubes:
            if hasattr(kube, "workdir"):
                kube.stop()


def peer_synced(side: Side, peer: Side) -> bool:
    assert side.istiod is not None
    return side.istiod.clusters().get(peer.cluster_id) == "synced"


@pytest.fixture(autouse=True)
def _mesh_still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "mesh" in request.fixturenames:
        request.getfixturevalue("mesh").check_alive()


@pytest.fixture(scope="session")
def istiod_path() -> Path:
    return istiod_binary()
