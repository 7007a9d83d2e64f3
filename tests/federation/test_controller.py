"""The controller between two simulated clusters (exporters over real TLS, no api-proxy):
artifacts, stability, failure behaviour, UUID pinning, deletion and leader election."""

from __future__ import annotations

import asyncio
import base64

import jwt
import pytest
import yaml

from apiproxy import peers as peers_mod
from apiproxy.federation import artifacts
from apiproxy.federation.controller import PRIVATE, PUBLIC, REMOTE_API
from apiproxy.federation.kube import Kube
from apiproxy.federation.leader import LeaderElector
from tests.federation.conftest import FOREIGN_MESH, FOREIGN_NETWORKS, eventually


async def _pair(clusters, exporter_tls, test_ca, **overrides):
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls, **overrides)
    fb = await b.federation(**tls, **overrides)
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    # Each side needs the other's public metadata before it answers private requests.
    await fa.reconcile()
    await fb.reconcile()
    await fa.reconcile()
    return a, b, fa, fb


def _remote_kubeconfig(cluster, name):
    secret = cluster.get("secrets", f"istio-remote-secret-{name}", "istio-system")
    assert secret is not None
    (key,) = secret["data"]
    return key, yaml.safe_load(base64.b64decode(secret["data"][key]))


async def test_two_clusters_exchange_metadata_and_write_artifacts(clusters, exporter_tls, test_ca):
    a, b, fa, fb = await _pair(clusters, exporter_tls, test_ca)
    assert a.condition("b", PUBLIC)["status"] == "True"
    assert a.condition("b", PRIVATE)["status"] == "True"
    # No api-proxy runs in this test: the probe fails and says so.
    api = a.condition("b", REMOTE_API)
    assert api["status"] == "False"
    assert api["reason"] == "RemoteAPIUnreachable"
    # A failed check is retried on its own backoff, well before the next resync.
    assert fa.controller is not None
    assert fa.controller.peers["b"].probe_failures >= 1
    assert fa.controller._sleep_for() < fa.controller.settings.resync_interval
    imc = a.imc("b")
    assert "apiproxy.io/federation" in imc["metadata"]["finalizers"]
    assert imc["status"]["pinnedClusterUUID"] == b.uuid
    assert imc["status"]["metadataCache"]["private"]["apiHost"] == "api.bb.example:4443"

    # 1. remote secret, keyed by B's clusterID, inline credentials only
    key, kc = _remote_kubeconfig(a, "b")
    assert key == fb.identity.cluster_id
    secret = a.get("secrets", "istio-remote-secret-b", "istio-system")
    assert secret["metadata"]["labels"]["istio/multiCluster"] == "true"
    assert secret["metadata"]["annotations"]["networking.istio.io/cluster"] == key
    assert artifacts.inline_only_violations(kc) == []
    assert kc["clusters"][0]["cluster"]["server"] == "https://api.bb.example:4443"

    # 2. peers file: B's UUID, key and client CA, accepted by the proxy's own loader
    ps = a.get("secrets", "apiproxy-peers", "apiproxy-system")
    peer_set = peers_mod.parse(base64.b64decode(ps["data"]["peers.yaml"]).decode())
    (peer,) = peer_set.peers
    assert (peer.name, peer.cluster_uuid) == ("b", b.uuid)
    assert peer.client_ca
    assert peer_set.key_for_subject(b.uuid) is not None

    # 3-4. mesh trust and networks; foreign entries preserved
    mesh, networks = a.mesh()
    assert mesh["trustDomain"] == FOREIGN_MESH["trustDomain"]
    assert mesh["defaultConfig"] == FOREIGN_MESH["defaultConfig"]
    assert mesh["caCertificates"][0] == FOREIGN_MESH["caCertificates"][0]
    assert mesh["caCertificates"][1] == {"pem": b.root.cert_pem, "trustDomains": ["cluster.local"]}
    net = networks["networks"][fb.identity.network]
    assert net["endpoints"] == [{"fromRegistry": fb.identity.cluster_id}, {"fromRegistry": "b"}]
    assert net["gateways"] == [{"address": "192.0.2.2", "port": 15443}]
    assert networks["networks"]["net-foreign"] == FOREIGN_NETWORKS["networks"]["net-foreign"]

    # Unchanged inputs rewrite nothing (istiod re-lists on every secret change).
    rv = secret["metadata"]["resourceVersion"]
    report = await fa.reconcile()
    assert report.writes == []
    assert (
        a.get("secrets", "istio-remote-secret-b", "istio-system")["metadata"]["resourceVersion"]
        == rv
    )

    # Events were recorded on transitions, without credentials.
    events = a.store.list("events", namespace="default")
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "b"}
    assert {"PublicMetadataExchangeReadyTrue", "PrivateMetadataExchangeReadyTrue"} <= reasons
    assert not any("eyJ" in e["message"] for e in events)


async def test_unreachable_peer_keeps_artifacts_and_recovers(clusters, exporter_tls, test_ca):
    a, b, fa, fb = await _pair(clusters, exporter_tls, test_ca)
    before = a.get("secrets", "istio-remote-secret-b", "istio-system")
    mesh_before = a.mesh()
    port = fb.exporter_port
    await fb.exporter.stop()
    await fa.reconcile()
    cond = a.condition("b", PUBLIC)
    assert cond["status"] == "False"
    assert cond["reason"] == "FetchFailed"
    assert a.get("secrets", "istio-remote-secret-b", "istio-system")["data"] == before["data"]
    assert a.mesh() == mesh_before
    assert a.imc("b")["status"]["metadataCache"]["public"]["clusterUUID"] == b.uuid
    metric = fa.metrics_registry.get_sample_value(
        "apiproxy_federation_metadata_fetch_errors_total",
        {"peer": "b", "document": "public", "reason": "FetchFailed"},
    )
    assert metric >= 1
    # B comes back on the same port: the condition returns to True.
    await fb.exporter.start("127.0.0.1", port, fb._exporter_ssl())
    await fa.reconcile()
    assert a.condition("b", PUBLIC)["status"] == "True"
    assert a.condition("b", PRIVATE)["status"] == "True"


async def test_changed_peer_uuid_is_refused_and_pinned(clusters, exporter_tls, test_ca):
    a, b, fa, _fb = await _pair(clusters, exporter_tls, test_ca)
    c = await clusters("ccc")
    fc = await c.federation(exporter_tls_cert=exporter_tls[0], exporter_tls_key=exporter_tls[1])
    before = a.get("secrets", "istio-remote-secret-b", "istio-system")["data"]
    imc = a.imc("b")
    imc["spec"]["metadataEndpoint"] = fc.exporter_url
    a.store.update(imc)
    await fa.reconcile()
    cond = a.condition("b", PUBLIC)
    assert cond["status"] == "False"
    assert cond["reason"] == "ClusterUUIDMismatch"
    assert c.uuid in cond["message"]
    status = a.imc("b")["status"]
    assert status["pinnedClusterUUID"] == b.uuid
    assert status["metadataCache"]["public"]["clusterUUID"] == b.uuid
    assert a.get("secrets", "istio-remote-secret-b", "istio-system")["data"] == before
    assert fa.registry.key_for(c.uuid) is None


def _peer_gauges(fed, peer):
    """The state series alerts read for `peer` (None when not exported)."""
    get = fed.metrics_registry.get_sample_value
    return {
        "expiry": get("apiproxy_federation_credentials_expiry_timestamp_seconds", {"peer": peer}),
        "rotation": get(
            "apiproxy_federation_credentials_rotation_due_timestamp_seconds", {"peer": peer}
        ),
        "public": get("apiproxy_federation_condition", {"peer": peer, "type": PUBLIC}),
    }


async def test_credential_expiry_and_rotation_time_are_exported(clusters, exporter_tls, test_ca):
    a, _b, fa, _fb = await _pair(clusters, exporter_tls, test_ca)
    _key, kc = _remote_kubeconfig(a, "b")
    token = kc["users"][0]["user"]["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    g = _peer_gauges(fa, "b")
    assert g["expiry"] == claims["exp"]
    # rotated at two thirds of the lifetime, which is what the alert compares against
    ttl = claims["exp"] - claims["iat"]
    assert g["rotation"] == pytest.approx(claims["iat"] + ttl * 2 / 3, abs=1)
    assert g["public"] == 1


async def test_a_rotation_whose_write_failed_does_not_look_done(clusters, exporter_tls, test_ca):
    a, _b, fa, _fb = await _pair(clusters, exporter_tls, test_ca)
    before = _peer_gauges(fa, "b")
    # A shorter lifetime makes the next pass re-issue; istiod's Secret cannot be written.
    fa.controller.settings.credential_ttl = 600
    secret = "/api/v1/namespaces/istio-system/secrets/istio-remote-secret-b"
    a.sim.faults.fail(500, method="PUT", path=secret)
    await fa.reconcile()
    assert _peer_gauges(fa, "b") == before  # what istiod holds is still the old credential
    a.sim.faults.clear()
    await fa.reconcile()
    after = _peer_gauges(fa, "b")
    _key, kc = _remote_kubeconfig(a, "b")
    claims = jwt.decode(kc["users"][0]["user"]["token"], options={"verify_signature": False})
    assert after["expiry"] == claims["exp"] < before["expiry"]
    assert after["rotation"] < before["rotation"]


async def test_deleting_the_peer_removes_exactly_its_artifacts(clusters, exporter_tls, test_ca):
    a, _b, fa, _fb = await _pair(clusters, exporter_tls, test_ca)
    assert None not in _peer_gauges(fa, "b").values()
    a.store.delete("istiomulticlusters.deckhouse.io", "b")
    assert a.imc("b")["metadata"].get("deletionTimestamp")  # held by our finalizer
    await fa.reconcile()
    assert a.imc("b") is None
    assert a.get("secrets", "istio-remote-secret-b", "istio-system") is None
    ps = a.get("secrets", "apiproxy-peers", "apiproxy-system")
    assert yaml.safe_load(base64.b64decode(ps["data"]["peers.yaml"]))["peers"] == []
    mesh, networks = a.mesh()
    assert mesh == FOREIGN_MESH
    assert networks == FOREIGN_NETWORKS
    # Identity secrets are not per-peer and stay.
    assert a.get("secrets", "apiproxy-identity", "apiproxy-system") is not None
    # No series of a removed peer stays behind for an alert to fire on.
    assert set(_peer_gauges(fa, "b").values()) == {None}


async def test_watch_triggers_a_pass_when_an_object_appears(clusters, exporter_tls, test_ca):
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls)
    fb = await b.federation(**tls)
    await eventually(lambda: fa.watch_synced.is_set())
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)
    # No explicit reconcile: the watch event drives the pass.
    await eventually(lambda: (a.condition("b", PUBLIC) or {}).get("status") == "True")


async def test_only_one_replica_writes(clusters):
    a = await clusters("a")
    kube = Kube(a.client)
    common = {
        "namespace": "apiproxy-system",
        "name": "apiproxy-federation",
        "lease_duration": 1.5,
        "renew_deadline": 1.0,
        "retry_period": 0.2,
    }
    e1 = LeaderElector(kube, identity="one", **common)
    e2 = LeaderElector(kube, identity="two", **common)
    t1 = asyncio.create_task(e1.run())
    t2 = asyncio.create_task(e2.run())
    try:
        leader = await eventually(lambda: e1 if e1.can_write else e2 if e2.can_write else None)
        standby = e2 if leader is e1 else e1
        lease = a.get("leases.coordination.k8s.io", "apiproxy-federation", "apiproxy-system")
        assert lease["spec"]["holderIdentity"] == leader.identity
        # Never both, sampled over several renew periods.
        for _ in range(20):
            assert not (e1.can_write and e2.can_write)
            await asyncio.sleep(0.05)
        # The leader stops renewing (crash without release): the standby takes over only after
        # the leader's own write window closed.
        (t1 if leader is e1 else t2).cancel()
        await eventually(lambda: standby.can_write, timeout=10)
        assert not leader.can_write
        lease = a.get("leases.coordination.k8s.io", "apiproxy-federation", "apiproxy-system")
        assert lease["spec"]["holderIdentity"] == standby.identity
        assert lease["spec"]["leaseTransitions"] >= 1
    finally:
        for t in (t1, t2):
            t.cancel()
        await asyncio.gather(t1, t2, return_exceptions=True)
