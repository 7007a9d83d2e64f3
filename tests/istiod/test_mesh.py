"""A real istiod discovers its peer through apiproxy.

Cluster `alpha` runs an istiod that reads cluster `beta` through beta's `apiproxy serve`, with the
remote secret alpha's `apiproxy federate` wrote; and the other way round. What is asserted is what
istiod itself reports on its debug endpoints, what beta's proxy audited, and what beta's
kube-apiserver audited. Tests run in file order: the last ones rotate credentials, remove the
peer and add a refused one.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.request
from functools import partial
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import pki, tokens
from tests.istiod.conftest import CHANGE_BOUND, JOIN_BOUND, Mesh, peer_synced
from tests.istiod.mesh import Istiod, Side, wait_until

NS = "shop"
HOST = f"web.{NS}.svc.cluster.local"
PROXY_USER = "system:serviceaccount:apiproxy-system:api-proxy"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shop(mesh: Mesh) -> dict[str, str]:
    """Service web in beta with two ready pods; waits until alpha's istiod holds both."""
    b = mesh.b
    b.service(NS, "web", "web")
    pods = {"web-1": "10.20.0.11", "web-2": "10.20.0.12"}
    for name, ip in pods.items():
        b.run_pod(NS, name, "web", ip)
    expect(mesh.a, b, set(pods.values()), JOIN_BOUND)
    return pods


def expect(side: Side, peer: Side, ips: set[str], bound: float = CHANGE_BOUND) -> float:
    """Wait until `side`'s istiod holds exactly `ips` as healthy endpoints of web from `peer`."""
    assert side.istiod is not None
    istiod = side.istiod
    _, took = wait_until(
        lambda: istiod.ready_ips(HOST, NS, peer.cluster_id) == ips or None,
        bound,
        f"{side.name}'s istiod holds {sorted(ips)} for {HOST} from {peer.name}",
    )
    return took


def remote_kubeconfig(side: Side, peer_imc: str) -> tuple[str, dict[str, Any]]:
    secret = side.kube.ok(
        "GET", f"/api/v1/namespaces/istio-system/secrets/istio-remote-secret-{peer_imc}"
    )
    ((cid, value),) = secret["data"].items()
    return cid, yaml.safe_load(base64.b64decode(value))


def metric(side: Side, name: str, labels: str = "") -> float:
    """One sample of the proxy's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{side.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            m = re.match(rf"{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
            if m:
                total += float(m.group(1))
    return total


# ---------------------------------------------------------------------------- joined and synced


def test_each_istiod_lists_its_peer_as_synced_through_the_remote_secret(mesh: Mesh) -> None:
    for side, peer, imc in ((mesh.a, mesh.b, "beta"), (mesh.b, mesh.a, "alpha")):
        assert side.istiod is not None
        clusters = {c["id"]: c for c in side.istiod.debug("clusterz")}
        assert clusters[peer.cluster_id]["syncStatus"] == "synced", clusters
        assert clusters[peer.cluster_id]["secretName"] == f"istio-system/istio-remote-secret-{imc}"
        # Its own cluster is the config cluster; nothing else was added.
        assert set(clusters) == {side.cluster_id, peer.cluster_id}, clusters
        # The remote secret federation wrote points at the peer's proxy, not its apiserver.
        cid, kc = remote_kubeconfig(side, imc)
        assert cid == peer.cluster_id
        (cluster,) = kc["clusters"]
        assert cluster["cluster"]["server"] == f"https://127.0.0.1:{peer.proxy_port}"
        assert peer.kube.url != cluster["cluster"]["server"]
    assert mesh.join_seconds < JOIN_BOUND


def test_istiod_holds_the_peers_service_with_the_peers_pod_ips(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    a, b = mesh.sides
    assert a.istiod is not None
    eps = a.istiod.endpoints(HOST, NS, b.cluster_id)
    assert {ip for ep in eps for ip in ep["Addresses"]} == set(shop.values())
    for ep in eps:
        # The named targetPort "web" was resolved from the pods' container ports.
        assert ep["EndpointPort"] == 8080, ep
        assert ep["ServicePortName"] == "http", ep
        # The peer's cluster ID and the network federation wrote into meshNetworks for it.
        assert ep["Locality"]["ClusterID"] == b.cluster_id, ep
        assert ep["Network"] == b.network, ep
    # Nothing of web from alpha itself: the service exists only in beta.
    assert a.istiod.endpoints(HOST, NS, a.cluster_id) == []
    # registryz is istiod's service view, which can trail its endpoint shards by a push.
    service, _ = wait_until(
        lambda: next((s for s in a.istiod.debug("registryz") if s["hostname"] == HOST), None),
        CHANGE_BOUND,
        f"{HOST} in alpha's registryz",
    )
    assert b.cluster_id in service["clusterVIPs"]["Addresses"], service


def test_istiod_sees_nothing_of_a_namespace_the_peer_does_not_export(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    """The shipped policy shows a peer only istio-system and exported namespaces: a Service and
    a ready pod in an unexported namespace never reach the peer's istiod, while a change in the
    exported one made after them does (so istiod has read past them)."""
    a, b = mesh.sides
    assert a.istiod is not None
    istiod = a.istiod
    b.service("payroll", "ledger", "ledger", export=False)
    b.run_pod("payroll", "ledger-1", "ledger", "10.20.0.41")
    b.service(NS, "canary", "canary")
    b.run_pod(NS, "canary-1", "canary", "10.20.0.42")
    try:
        wait_until(
            lambda: (
                istiod.ready_ips(f"canary.{NS}.svc.cluster.local", NS, b.cluster_id)
                == {"10.20.0.42"}
                or None
            ),
            CHANGE_BOUND,
            "alpha's istiod holds the exported canary pod",
        )
        hidden = "ledger.payroll.svc.cluster.local"
        assert istiod.endpoints(hidden, "payroll", b.cluster_id) == []
        assert "payroll" not in json.dumps(istiod.debug("endpointShardz") or {})
    finally:
        b.delete_pod(NS, "canary-1")
        b.delete_pod("payroll", "ledger-1")


def _gateways_with(istiod: Istiod, network: str) -> list[dict[str, Any]] | None:
    gateways = list(istiod.debug("networkz") or [])
    return gateways if any(g["Network"] == network for g in gateways) else None


def _mesh_with_roots(istiod: Istiod) -> dict[str, Any] | None:
    mesh = dict(istiod.debug("mesh"))
    return mesh if mesh.get("caCertificates") else None


def test_istiod_lists_the_peers_network_with_its_east_west_gateway(mesh: Mesh) -> None:
    for side, peer in ((mesh.a, mesh.b), (mesh.b, mesh.a)):
        istiod = side.istiod
        assert istiod is not None
        # meshNetworks reaches istiod through its ConfigMap watch: wait for the peer's network.
        gateways, _ = wait_until(
            partial(_gateways_with, istiod, peer.network),
            CHANGE_BOUND,
            f"{side.name}'s networkz lists {peer.network}",
        )
        addr, port = peer.gateway.rsplit(":", 1)
        assert {"Network": peer.network, "Addr": addr, "Port": int(port)}.items() <= {
            k: v for g in gateways if g["Network"] == peer.network for k, v in g.items()
        }.items(), gateways
        # And only the peer's: no gateway of its own network came from federation.
        assert all(g["Network"] != side.network for g in gateways), gateways


def test_istiod_trusts_the_peers_root_from_the_mesh_config_it_loaded(mesh: Mesh) -> None:
    for side, peer in ((mesh.a, mesh.b), (mesh.b, mesh.a)):
        istiod = side.istiod
        assert istiod is not None
        # The mesh ConfigMap reaches istiod through its watch: wait until a root is loaded.
        loaded, _ = wait_until(
            partial(_mesh_with_roots, istiod), CHANGE_BOUND, f"{side.name}'s mesh has a root"
        )
        pems = [c.get("pem", "") for c in loaded.get("caCertificates") or []]
        assert [p.strip() for p in pems] == [peer.root.cert_pem.strip()], loaded


def test_every_istiod_request_is_audited_under_the_peer_and_no_secret_reaches_upstream(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    a, b = mesh.sides
    # Every stage: istiod's informers watch (WatchList: no LIST at all), and a watch that is still
    # open has its ResponseStarted record only.
    records = b.proxy_audit()
    users = {r["user"]["username"] for r in records}
    assert users == {"peer:alpha"}, users
    resources = {(r.get("objectRef") or {}).get("resource") for r in records}
    # istiod's informer set, every one of them through the proxy.
    assert {"pods", "services", "endpointslices", "namespaces", "nodes"} <= resources, resources
    secrets = [r for r in records if (r.get("objectRef") or {}).get("resource") == "secrets"]
    # istiod asked for secrets (its credentials controller) and was answered by the empty view.
    assert secrets, "istiod's secrets informer never reached the proxy"
    assert all(r["annotations"].get("apiproxy.io/view") == "empty" for r in secrets), secrets
    # beta's apiserver never received a secrets request from the proxy's identity ...
    upstream = [e for e in b.kube.audit_records() if e["user"]["username"] == PROXY_USER]
    assert upstream, "the proxy's requests are missing from the apiserver's audit log"
    assert not [e for e in upstream if (e.get("objectRef") or {}).get("resource") == "secrets"]
    # ... nor any write, while istiod reports the cluster synced.
    assert {e["verb"] for e in upstream} <= {"get", "list", "watch"}, {e["verb"] for e in upstream}
    assert peer_synced(a, b)


def test_pods_added_readied_and_deleted_in_the_peer_change_istiods_endpoints(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    a, b = mesh.sides
    base = set(shop.values())
    b.run_pod(NS, "web-3", "web", "10.20.0.13", ready=False)
    # Not ready: istiod holds it, but not as healthy.
    expect(a, b, base)
    assert a.istiod is not None
    wait_until(
        lambda: (
            any(
                "10.20.0.13" in ep["Addresses"] for ep in a.istiod.endpoints(HOST, NS, b.cluster_id)
            )
            or None
        ),
        CHANGE_BOUND,
        "the unready pod reaches istiod",
    )
    b.set_ready(NS, "web-3", "10.20.0.13", True)
    expect(a, b, base | {"10.20.0.13"})
    b.delete_pod(NS, "web-3")
    expect(a, b, base)
    # Gone, not only unhealthy (a deleted pod may pass through terminating first).
    wait_until(
        lambda: (
            not any(
                "10.20.0.13" in ep["Addresses"] for ep in a.istiod.endpoints(HOST, NS, b.cluster_id)
            )
            or None
        ),
        CHANGE_BOUND,
        "the deleted pod leaves istiod",
    )


def test_proxy_restart_leaves_istiod_resynced_with_no_endpoint_lost(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    a, b = mesh.sides
    assert b.proxy is not None
    assert a.istiod is not None
    port = b.proxy_port
    b.proxy.stop(sig=9)
    # While the proxy is down istiod keeps what it had.
    assert a.istiod.ready_ips(HOST, NS, b.cluster_id) == set(shop.values())
    b.start_proxy(port=port)
    assert b.proxy_port == port
    # A change made after the restart arrives: istiod's watches were re-established.
    b.run_pod(NS, "web-4", "web", "10.20.0.14")
    took = expect(a, b, set(shop.values()) | {"10.20.0.14"})
    assert peer_synced(a, b)
    b.delete_pod(NS, "web-4")
    expect(a, b, set(shop.values()))
    print(f"after a proxy restart, a new pod reached istiod in {took:.1f}s")


def test_policy_narrowing_stops_pod_updates_and_istiod_keeps_what_it_had(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    """Measured behaviour of istiod once the proxy refuses pods: its cluster stays synced, the
    endpoints it had stay, and a new pod's endpoint is skipped: istiod builds an endpoint only for
    a pod in its cache ("Endpoint without pod", pilot's endpoint_no_pod metric)."""
    a, b = mesh.sides
    assert a.istiod is not None
    policy = b.workdir / "policy.yaml"
    original = policy.read_text()
    doc = yaml.safe_load(original)
    for rule in doc["rules"]:
        if "pods" in (rule.get("resources") or []):
            rule["resources"] = [r for r in rule["resources"] if r != "pods"]
    # A rule left without resources (the shipped istio-pods) goes: an empty list is refused.
    doc["rules"] = [r for r in doc["rules"] if r.get("resources", ["-"])]
    narrowed = yaml.safe_dump(doc, sort_keys=False)
    try:
        policy.write_text(narrowed)
        # The proxy reloads and ends the pod watch; istiod's re-list is refused.
        wait_until(
            lambda: (
                any(
                    r.get("stage") == "ResponseComplete"
                    and r["responseStatus"]["code"] == 403
                    and (r.get("objectRef") or {}).get("resource") == "pods"
                    for r in b.proxy_audit()
                )
                or None
            ),
            60,
            "istiod's pod re-list is refused",
        )
        b.run_pod(NS, "web-5", "web", "10.20.0.15")
        # The EndpointSlice carries web-5 (slices are still forwarded) ...
        wait_until(
            lambda: "10.20.0.15" in json.dumps(a_slices(b)) or None,
            CHANGE_BOUND,
            "beta's EndpointSlice lists web-5",
        )
        # ... and istiod still holds exactly the endpoints it had, synced.
        time_checked = time.monotonic()
        while time.monotonic() - time_checked < 5:
            assert a.istiod.ready_ips(HOST, NS, b.cluster_id) == set(shop.values())
            assert peer_synced(a, b)
            time.sleep(0.5)
    finally:
        policy.write_text(original)
    # Pods allowed again: client-go's backoff retries the list, and web-5 arrives.
    expect(a, b, set(shop.values()) | {"10.20.0.15"}, bound=90)
    b.delete_pod(NS, "web-5")
    expect(a, b, set(shop.values()))


def a_slices(side: Side) -> Any:
    return side.kube.ok("GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices")


def test_credential_rotation_keeps_istiod_synced_with_the_peers_endpoints(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    """alpha's federation re-issues its credentials for beta every 2/3 of a short TTL; istiod swaps
    each new remote secret in only after the new cluster synced (1.30+), so the peer's endpoints
    never go away across two rotations. clusterz shows the new cluster `syncing` meanwhile."""
    a, b = mesh.sides
    assert a.federate is not None
    assert a.istiod is not None

    def clusters_built() -> int:
        # Each Cluster istiod builds from a remote secret opens its own namespaces watch first.
        return sum(
            1
            for r in b.proxy_audit()
            if r.get("stage") == "ResponseStarted"
            and r["verb"] == "watch"
            and (r.get("objectRef") or {}).get("resource") == "namespaces"
        )

    built = clusters_built()
    a.federate.stop()
    a.credential_ttl = "24s"
    a.start_federate()
    seen: list[str] = []
    syncing_since = longest = 0.0
    deadline = time.monotonic() + 120
    while len(seen) < 3:
        assert time.monotonic() < deadline, f"only {len(seen) - 1} rotations in 120s"
        _, kc = remote_kubeconfig(a, "beta")
        cred = json.dumps(kc["users"], sort_keys=True)
        if not seen or seen[-1] != cred:
            seen.append(cred)
        # At every moment every endpoint of the peer is present. While a new cluster syncs,
        # clusterz reports it `syncing` (the old one keeps serving): measured, and bounded.
        assert a.istiod.ready_ips(HOST, NS, b.cluster_id) == set(shop.values())
        status = a.istiod.clusters().get(b.cluster_id)
        assert status in ("synced", "syncing"), a.istiod.clusters()
        if status == "syncing":
            syncing_since = syncing_since or time.monotonic()
            longest = max(longest, time.monotonic() - syncing_since)
        else:
            syncing_since = 0.0
        time.sleep(0.5)
    wait_until(lambda: peer_synced(a, b) or None, CHANGE_BOUND, "the last new cluster syncs")
    assert longest < 10, f"clusterz said syncing for {longest:.1f}s in a row"
    print(f"rotation: clusterz said syncing for at most {longest:.1f}s while a new cluster synced")
    # istiod built a new cluster from each new secret (it swaps one in only once it synced).
    assert clusters_built() - built >= len(seen) - 1, (built, clusters_built(), len(seen))
    # The swapped-out clusters' watches ended, and their audit records count what they carried:
    # a forwarded (unfiltered) WatchList CRD watch delivers the IstioMulticluster CRD and the
    # initial-events-end bookmark (kube-apiserver 1.37 gzips WatchList streams for client-go;
    # the proxy counts through the gzip).
    ended = [
        r
        for r in b.proxy_audit()
        if r.get("stage") == "ResponseComplete"
        and r["verb"] == "watch"
        and (r.get("objectRef") or {}).get("resource") == "customresourcedefinitions"
        and "sendInitialEvents=true" in r["requestURI"]
    ]
    assert ended, "no CRD watch of a replaced cluster ended"
    for r in ended:
        assert int(r["annotations"]["apiproxy.io/watch-events"]) >= 2, r["annotations"]
    assert peer_synced(a, b)
    a.federate.stop()
    a.credential_ttl = "24h"
    a.start_federate()


def test_removing_the_peer_makes_istiod_drop_its_cluster_and_endpoints(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    a, b = mesh.sides
    assert a.istiod is not None
    a.leave("beta")
    wait_until(
        lambda: b.cluster_id not in a.istiod.clusters() or None,
        CHANGE_BOUND,
        "alpha's istiod drops beta's cluster",
    )
    wait_until(
        lambda: not a.istiod.endpoints(HOST, NS, b.cluster_id) or None,
        CHANGE_BOUND,
        "alpha's istiod drops beta's endpoints",
    )
    wait_until(
        lambda: not (a.istiod.debug("mesh").get("caCertificates") or []) or None,
        CHANGE_BOUND,
        "alpha's istiod no longer trusts beta's root",
    )
    # beta's istiod still reads alpha: removal is one-sided.
    assert peer_synced(b, a)


def test_refused_peers_show_unsynced_in_istiod_and_refused_in_the_proxy(
    mesh: Mesh, shop: dict[str, str]
) -> None:
    """Remote secrets whose credentials the proxy does not know: a token signed by a key no peer
    has (a revoked or foreign peer) and a client certificate from a CA no peer has (a wrong CA).
    istiod keeps retrying and reports both unsynced; the proxy refuses each: the token with an
    audited 401, the certificate in the TLS handshake (no request, so only the connection
    metric). Neither side crashes."""
    a, b = mesh.sides
    assert a.istiod is not None
    authn_before = metric(b, "apiproxy_authentication_failures_total")
    tls_before = metric(b, "apiproxy_connections_closed_total", 'reason="handshake_failed"')
    rogue = tokens.mint(
        ed25519.Ed25519PrivateKey.generate(),
        subject=a.uuid,
        audience=b.uuid,
        scope="api",
        ttl_seconds=600,
    )
    foreign = pki.issue(
        pki.make_ca("a CA no peer has"),
        "istiod",
        uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",),
        client=True,
    )

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def kubeconfig(user: dict[str, str]) -> str:
        return b64(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "rogue",
                            "cluster": {
                                "server": f"https://127.0.0.1:{b.proxy_port}",
                                "certificate-authority-data": b64(mesh.ca.cert_pem),
                            },
                        }
                    ],
                    "users": [{"name": "rogue", "user": user}],
                    "contexts": [
                        {"name": "rogue", "context": {"cluster": "rogue", "user": "rogue"}}
                    ],
                    "current-context": "rogue",
                }
            )
        )

    a.kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "istio-remote-secret-rogue",
                "namespace": "istio-system",
                "labels": {"istio/multiCluster": "true"},
            },
            "data": {
                "rogue-token": kubeconfig({"token": rogue}),
                "rogue-ca": kubeconfig(
                    {
                        "client-certificate-data": b64(foreign.cert_pem),
                        "client-key-data": b64(foreign.key_pem),
                    }
                ),
            },
        }
    )
    rogues = ("rogue-token", "rogue-ca")
    try:
        wait_until(
            lambda: all(a.istiod.clusters().get(r) for r in rogues) or None,
            CHANGE_BOUND,
            "istiod adds both rogue clusters",
        )
        # istiod retries; the proxy refuses every attempt, each in its own way.
        wait_until(
            lambda: (
                (
                    metric(b, "apiproxy_authentication_failures_total") >= authn_before + 3
                    and metric(b, "apiproxy_connections_closed_total", 'reason="handshake_failed"')
                    >= tls_before + 3
                )
                or None
            ),
            CHANGE_BOUND,
            "the proxy refuses both, repeatedly",
        )
        refused = [
            r
            for r in b.proxy_audit()
            if r.get("responseStatus", {}).get("code") == 401
            and "apiproxy.io/authn-failure" in (r.get("annotations") or {})
        ]
        assert refused, "no audited refusal"
        assert {r["user"]["username"] for r in refused} == {"system:anonymous"}
        # Neither credential shows in the audit log.
        text = b.audit_file.read_text()
        assert rogue not in text
        assert foreign.key_pem.splitlines()[1] not in text
        # Unsynced (`syncing`, `timeout` after PILOT_REMOTE_CLUSTER_TIMEOUT); the other direction
        # is untouched, and both processes live on (checked after every test).
        clusters = a.istiod.clusters()
        assert {clusters[r] for r in rogues} <= {"syncing", "timeout"}, clusters
        assert peer_synced(b, a)
    finally:
        a.kube.ok("DELETE", "/api/v1/namespaces/istio-system/secrets/istio-remote-secret-rogue")
    wait_until(
        lambda: not set(rogues) & set(a.istiod.clusters()) or None,
        CHANGE_BOUND,
        "istiod drops the rogue clusters",
    )
    # This test runs last on purpose: in this istiod, removing a remote cluster that never synced
    # can leave its secret controller blocked, so later remote-secret changes go unprocessed until
    # istiod restarts (docs/istiod.md, "Measured").
    assert peer_synced(b, a)
