"""Two `Federation` replicas on one simulated cluster with leader election: only the Lease
holder writes, the standby takes over when the leader cannot renew (or stops) and reconciles,
and the ex-leader writes nothing once it stopped leading."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from apiproxy.federation import identity as ident
from apiproxy.federation.controller import PRIVATE, PUBLIC
from apiproxy.federation.kube import Kube, KubeError
from apiproxy.federation.main import Federation, FederationConfig
from tests.federation.conftest import Cluster, eventually

LEASE = ("leases.coordination.k8s.io", "apiproxy-federation", "apiproxy-system")
IDENTITY_PATHS = (ident.IDENTITY_SECRET, ident.CLIENT_CA_SECRET)


@dataclass
class Write:
    at: float
    method: str
    path: str
    could_write: bool  # the replica's own can_write() when it sent the request
    holder: str  # the Lease holder in the store at that moment


class RecordingKube(Kube):
    """The replica's Kube client: records every write with the Lease holder at that moment, and
    can cut the replica off from the Lease (a partition that lets everything else through)."""

    def __init__(self, api_client: Any, cluster: Cluster) -> None:
        super().__init__(api_client)
        self.cluster = cluster
        self.fed: Federation | None = None
        self.writes: list[Write] = []
        self.lease_cut = False

    async def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        is_lease = "/leases" in path
        if is_lease and self.lease_cut:
            raise KubeError(0, "kube-apiserver unreachable: partitioned in the test")
        name = str(((kw.get("body") or {}).get("metadata") or {}).get("name") or "")
        # The identity Secrets are created once by every replica at start-up, before any
        # election (create, 409, read back); everything else must come from the holder.
        identity_create = method == "POST" and name in IDENTITY_PATHS
        if method != "GET" and not is_lease and not identity_create:
            lease = self.cluster.get(*LEASE) or {}
            assert self.fed is not None
            self.writes.append(
                Write(
                    time.monotonic(),
                    method,
                    path,
                    self.fed.can_write(),
                    str((lease.get("spec") or {}).get("holderIdentity") or ""),
                )
            )
        return await super().request(method, path, **kw)


async def _replica(
    cluster: Cluster, name: str, tls: tuple[str, str]
) -> tuple[Federation, RecordingKube]:
    cfg = FederationConfig(
        exporter_tls_cert=tls[0] or None,
        exporter_tls_key=tls[1] or None,
        cluster_domain="cluster.local",
        api_host="api.a.example:4443",
        exporter_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        ingress_gateways=["192.0.2.1:15443"],
        leader_elect=True,
        identity=name,
        lease_duration=1.5,
        renew_deadline=1.0,
        retry_period=0.2,
        backoff_base=0.2,
        backoff_max=1.0,
        fetch_timeout=3.0,
    )
    fed = Federation(cfg, cluster.client)
    kube = RecordingKube(cluster.client, cluster)
    kube.fed = fed
    fed.kube = kube
    await fed.start()
    cluster.feds.append(fed)
    return fed, kube


async def _readyz(fed: Federation) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(trust_env=False) as s,
        s.get(f"http://127.0.0.1:{fed.metrics_port}/readyz") as resp,
    ):
        return resp.status, await resp.text()


def _bump(cluster: Cluster, name: str) -> int:
    """A spec change (a new generation, same meaning) that every replica's watch sees."""
    obj = cluster.imc(name)
    assert obj is not None
    meta = dict(obj["spec"].get("metadata") or {})
    if "insecureSkipVerify" in meta:
        del meta["insecureSkipVerify"]
    else:
        meta["insecureSkipVerify"] = False
    obj["spec"]["metadata"] = meta
    updated = cluster.store.update(obj)
    return int(updated["metadata"]["generation"])


def _reconciled(cluster: Cluster, generation: int) -> bool:
    status = (cluster.imc("b") or {}).get("status") or {}
    return status.get("observedGeneration") == generation


async def test_leader_handover_inside_running_federations(clusters, exporter_tls, test_ca):
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fb = await b.federation(**tls)
    f1, k1 = await _replica(a, "one", exporter_tls)
    f2, k2 = await _replica(a, "two", exporter_tls)
    kubes = {id(f1): k1, id(f2): k2}

    leader = await eventually(lambda: f1 if f1.can_write() else f2 if f2.can_write() else None)
    standby = f2 if leader is f1 else f1
    lk, sk = kubes[id(leader)], kubes[id(standby)]
    assert (a.get(*LEASE) or {})["spec"]["holderIdentity"] == leader.config.identity

    # B may reach either replica's exporter; here the standby's, which learns the peers the
    # leader accepted from the peers Secret (re-read on every IstioMulticluster event).
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)
    await eventually(lambda: (a.condition("b", PUBLIC) or {}).get("status") == "True")
    b.create_imc("a", standby.exporter_url, test_ca.cert_pem)
    await eventually(lambda: standby.registry.names() == ["b"])
    await fb.reconcile()  # B fetches A's public document: A is known to B
    leader.trigger()
    await eventually(lambda: (a.condition("b", PRIVATE) or {}).get("status") == "True")
    assert a.get("secrets", "istio-remote-secret-b", "istio-system") is not None

    # Only the leader wrote, always while it held the Lease; the standby wrote nothing.
    assert lk.writes
    assert [
        w for w in lk.writes if not (w.could_write and w.holder == leader.config.identity)
    ] == []
    assert sk.writes == []
    # Both are ready: the standby serves the exporter.
    status, body = await _readyz(standby)
    assert status == 200, body
    assert f"standby (Lease held by {leader.config.identity})" in body
    status, body = await _readyz(leader)
    assert status == 200, body
    assert "[+]leader-election ok: leader" in body

    # The leader is cut off from the Lease (it keeps running, watching and serving): it stops
    # writing within its renew deadline; the standby takes over after the lease duration.
    lk.lease_cut = True
    cut_at = time.monotonic()
    await eventually(lambda: standby.can_write(), timeout=10)
    assert not leader.can_write()
    assert (a.get(*LEASE) or {})["spec"]["holderIdentity"] == standby.config.identity
    # The new leader reconciles: a lost artifact is rewritten, a spec change is observed.
    a.store.delete("secrets", "istio-remote-secret-b", "istio-system")
    generation = _bump(a, "b")
    await eventually(lambda: _reconciled(a, generation), timeout=10)
    await eventually(lambda: a.get("secrets", "istio-remote-secret-b", "istio-system"))
    assert sk.writes
    assert all(w.could_write and w.holder == standby.config.identity for w in sk.writes)
    # The ex-leader saw the same watch events and wrote nothing after it stopped leading. (A
    # pass already running at the cut may finish inside the leader's write window, which lasts
    # up to the renew deadline: such writes carry could_write=True and are allowed.)
    late = [w for w in lk.writes if w.at >= cut_at and not w.could_write]
    assert late == []
    assert not [w for w in lk.writes if w.at >= cut_at + 1.5]  # renew deadline + margin
    assert all(w.holder == leader.config.identity for w in lk.writes)

    # The partition heals: the ex-leader stays a standby (the Lease is held and renewed).
    lk.lease_cut = False
    await eventually(lambda: _ready_as_standby(leader, standby.config.identity), timeout=10)
    assert not leader.can_write()

    # The new leader stops gracefully: it releases the Lease, the first one takes over at once
    # (no lease-duration wait) and reconciles the next change.
    await standby.stop()
    a.feds.remove(standby)
    stopped_at = time.monotonic()
    await eventually(lambda: leader.can_write(), timeout=5)
    generation = _bump(a, "b")
    await eventually(lambda: _reconciled(a, generation), timeout=10)
    assert [w for w in sk.writes if w.at >= stopped_at] == []
    assert any(w.at >= stopped_at for w in lk.writes)
    assert all(w.could_write and w.holder == leader.config.identity for w in lk.writes)


async def _ready_as_standby(fed: Federation, holder: str) -> bool:
    status, body = await _readyz(fed)
    return status == 200 and f"standby (Lease held by {holder})" in body


async def test_election_survives_dropped_connections(clusters):
    """aiohttp's ServerDisconnectedError is no OSError; it used to escape the Lease update and
    end the election loop for good (that replica never led again)."""
    a = await clusters("a")
    fed, _kube = await _replica(a, "one", ("", ""))
    await fed.wait_leader(timeout=5)
    rule = a.sim.faults.drop_connections(path="/apis/coordination.k8s.io")
    await eventually(lambda: rule.fired >= 3 and not fed.can_write(), timeout=10)
    assert fed._elector_task is not None
    assert not fed._elector_task.done()
    a.sim.faults.clear()
    # Writing resumes as a new leadership gain (waiters woken, a pass forced).
    await fed.wait_leader(timeout=5)
    status, body = await _readyz(fed)
    assert status == 200, body


async def test_a_stopping_leader_gives_the_lease_back(clusters):
    """Federation.stop() cancels the election loop, which drops leadership at once, then
    releases the Lease: the release must still happen (it used to see "not leading" and skip,
    so a standby waited out the lease duration; found by running the image, tests/deploy)."""
    a = await clusters("a")
    fed, _kube = await _replica(a, "one", ("", ""))
    await fed.wait_leader(timeout=5)
    await eventually(lambda: _readyz_ok(fed), timeout=10)
    assert (a.get(*LEASE) or {})["spec"]["holderIdentity"] == "one"
    await fed.stop()
    a.feds.remove(fed)
    spec = (a.get(*LEASE) or {})["spec"]
    assert spec["holderIdentity"] == ""
    assert spec["leaseDurationSeconds"] == 1


async def _readyz_ok(fed: Federation) -> bool:
    status, _body = await _readyz(fed)
    return status == 200
