"""East-west gateway discovery (`gateways.py`) from real Service, Pod and Node objects in the
simulator, and what a peer makes of a cluster that advertises no usable gateway."""

from __future__ import annotations

from typing import Any

import pytest

from apiproxy.federation.controller import PRIVATE, PUBLIC
from apiproxy.federation.gateways import GatewaySource
from apiproxy.federation.kube import Kube, KubeError
from apiproxy.federation.metadata import Gateway

NS = "istio-system"
SVC = "istio-eastwestgateway"
SELECTOR = {"istio": "eastwestgateway"}


def _service(svc_type: str, ports: list[dict[str, Any]], ingress: list[dict[str, Any]] | None):
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SVC, "namespace": NS},
        "spec": {"type": svc_type, "selector": SELECTOR, "ports": ports},
    }
    if ingress is not None:
        body["status"] = {"loadBalancer": {"ingress": ingress}}
    return body


def _node(name: str, *, ready: str = "True", addresses=(), taints=(), unschedulable=False):
    spec: dict[str, Any] = {"taints": list(taints)}
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": spec,
        "status": {
            "conditions": [{"type": "Ready", "status": ready}],
            "addresses": [{"type": t, "address": a} for t, a in addresses],
        },
    }


def _pod(store, name: str, node: str, *, phase: str = "Running", labels=None) -> None:
    store.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels or dict(SELECTOR)},
            "spec": {"nodeName": node, "containers": [{"name": "istio-proxy", "image": "x"}]},
        }
    )
    pod = store.get("pods", name, NS)
    pod["status"] = {"phase": phase}
    store.update(pod, subresource="status")


def _put_service(store, body: dict[str, Any]) -> None:
    status = body.pop("status", None)
    created = store.create(body)
    if status is not None:
        created["status"] = status
        store.update(created, subresource="status")


async def test_load_balancer_uses_the_first_ingress_and_the_tls_port(clusters):
    a = await clusters("a")
    kube = Kube(a.client)
    _put_service(
        a.store,
        _service(
            "LoadBalancer",
            [
                {"name": "status-port", "port": 15021, "nodePort": 30021},
                {"name": "tls-legacy", "port": 15443, "nodePort": 30443},
                {"name": "tls", "port": 443, "nodePort": 31443},
            ],
            [{"ports": [{"port": 443}]}, {"hostname": "GW.a.example"}, {"ip": "203.0.113.7"}],
        ),
    )
    source = GatewaySource(kube, service=(NS, SVC), ttl=0)
    # The entry without an address is skipped; the first usable one (a hostname, compared in
    # lower case like DNS) wins; the port is the one named `tls` even though another is 15443.
    assert await source.get() == (Gateway("gw.a.example", 443),)

    svc = a.store.get("services", SVC, NS)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "gw"}]}}
    a.store.update(svc, subresource="status")
    assert await source.get() == (Gateway("203.0.113.7", 443),)

    # Cached for the TTL: one discovery per window however many requests arrive.
    cached = GatewaySource(kube, service=(NS, SVC), ttl=60)
    first = await cached.get()
    svc = a.store.get("services", SVC, NS)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
    a.store.update(svc, subresource="status")
    assert await cached.get() == first
    assert await source.get() == (Gateway("198.51.100.9", 443),)


async def test_node_port_uses_ready_schedulable_nodes_running_gateway_pods(clusters):
    a = await clusters("a")
    kube = Kube(a.client)
    _put_service(
        a.store,
        _service(
            "NodePort",
            [
                {"name": "status-port", "port": 15021, "nodePort": 30021},
                {"name": "tls", "port": 15443, "nodePort": 31443},
            ],
            None,
        ),
    )
    nodes = [
        _node("n1", addresses=[("InternalIP", "10.0.0.1"), ("ExternalIP", "198.51.100.1")]),
        _node("n2", addresses=[("Hostname", "n2"), ("InternalIP", "10.0.0.2")]),
        _node("n3", ready="False", addresses=[("ExternalIP", "198.51.100.3")]),
        _node(
            "n4",
            addresses=[("ExternalIP", "198.51.100.4")],
            taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}],
        ),
        _node("n5", addresses=[("ExternalIP", "198.51.100.5")]),  # gateway pod not Running
        _node("n6", addresses=[("ExternalIP", "198.51.100.6")]),  # runs another app only
        _node("n7", ready="Unknown", addresses=[("ExternalIP", "198.51.100.7")]),
        # An unusable ExternalIP does not hide a good InternalIP.
        _node("n9", addresses=[("ExternalIP", ""), ("InternalIP", "10.0.0.9")]),
    ]
    for node in nodes:
        a.store.create(node)
    for i in (1, 2, 3, 4, 7, 9):
        _pod(a.store, f"gw-{i}", f"n{i}")
    _pod(a.store, "gw-1b", "n1")  # a second gateway on n1 does not duplicate the address
    _pod(a.store, "gw-5", "n5", phase="Pending")
    _pod(a.store, "app-6", "n6", labels={"app": "other"})
    _pod(a.store, "gw-8", "n8")  # its node is gone
    source = GatewaySource(kube, service=(NS, SVC), ttl=0)
    assert await source.get() == (
        Gateway("10.0.0.2", 31443),
        Gateway("10.0.0.9", 31443),
        Gateway("198.51.100.1", 31443),
    )

    # n3 becomes Ready: it joins; n1 is cordoned (the taint): it leaves.
    n3 = a.store.get("nodes", "n3")
    n3["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    a.store.update(n3, subresource="status")
    n1 = a.store.get("nodes", "n1")
    n1["spec"]["taints"] = [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
    a.store.update(n1)
    assert await source.get() == (
        Gateway("10.0.0.2", 31443),
        Gateway("10.0.0.9", 31443),
        Gateway("198.51.100.3", 31443),
    )


async def test_operator_override_wins_over_the_service(clusters):
    a = await clusters("a")
    _put_service(
        a.store,
        _service("LoadBalancer", [{"name": "tls", "port": 15443}], [{"ip": "203.0.113.7"}]),
    )
    kube = Kube(a.client)
    assert await GatewaySource(kube, service=(NS, SVC), ttl=0).get() == (
        Gateway("203.0.113.7", 15443),
    )
    static = (Gateway("192.0.2.50", 443),)
    assert await GatewaySource(kube, service=(NS, SVC), static=static, ttl=0).get() == static

    # Wired through the factory: --ingress-gateway is what the private document advertises.
    fed = await a.federation(ingress_gateways=["192.0.2.50:443"])
    assert fed.exporter is not None
    assert await fed.exporter.gateways.get() == static


async def _peer_without_gateways(clusters, exporter_tls, test_ca, *, enable: bool):
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls)
    # B discovers its gateway from a LoadBalancer Service still waiting for an address.
    _put_service(
        b.store, _service("LoadBalancer", [{"name": "tls", "port": 15443}], [{"hostname": ""}])
    )
    fb = await b.federation(ingress_gateways=[], **tls)
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem, enableIngressGateway=enable)
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    await fa.reconcile()
    await fb.reconcile()
    await fa.reconcile()
    return a, b, fa, fb


async def test_no_usable_gateway_is_missing_ingress_gateways(clusters, exporter_tls, test_ca):
    a, _b, _fa, _fb = await _peer_without_gateways(clusters, exporter_tls, test_ca, enable=True)
    assert a.condition("b", PUBLIC)["status"] == "True"
    cond = a.condition("b", PRIVATE)
    assert cond["status"] == "False"
    assert cond["reason"] == "MissingIngressGateways"
    assert a.get("secrets", "istio-remote-secret-b", "istio-system") is None


async def test_no_gateway_is_fine_when_ingress_gateway_is_disabled(clusters, exporter_tls, test_ca):
    a, _b, _fa, fb = await _peer_without_gateways(clusters, exporter_tls, test_ca, enable=False)
    assert a.condition("b", PRIVATE)["status"] == "True"
    assert a.get("secrets", "istio-remote-secret-b", "istio-system") is not None
    # No network entry without gateways to reach it.
    _mesh, networks = a.mesh()
    assert fb.identity is not None
    assert fb.identity.network not in networks["networks"]


async def test_lookup_errors_serve_the_last_good_list(clusters):
    a = await clusters("a")
    kube = Kube(a.client)
    _put_service(
        a.store, _service("NodePort", [{"name": "tls", "port": 15443, "nodePort": 31443}], None)
    )
    a.store.create(_node("n1", addresses=[("InternalIP", "10.0.0.1")]))
    _pod(a.store, "gw-1", "n1")
    outcomes: list[str] = []
    source = GatewaySource(kube, service=(NS, SVC), ttl=0, on_error=outcomes.append)
    good = (Gateway("10.0.0.1", 31443),)
    assert await source.get() == good
    # Service, Pod and Node lookups each fail in turn (500): the last good list is served.
    for path in (
        f"/api/v1/namespaces/{NS}/services",
        f"/api/v1/namespaces/{NS}/pods",
        "/api/v1/nodes",
    ):
        rule = a.sim.faults.fail(500, path=path)
        assert await source.get() == good, path
        assert rule.fired >= 1, path
        a.sim.faults.clear()
    assert outcomes == ["served_last_good"] * 3
    # Never a good list: the error surfaces (the exporter answers 503).
    a.sim.faults.fail(500, path=f"/api/v1/namespaces/{NS}/services")
    fresh = GatewaySource(kube, service=(NS, SVC), ttl=0, on_error=outcomes.append)
    with pytest.raises(KubeError):
        await fresh.get()
    assert outcomes[-1] == "unavailable"


async def test_exporter_serves_last_good_gateways_then_503(clusters, exporter_tls, test_ca):
    a, b = await clusters("a"), await clusters("bb")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls)
    _put_service(
        b.store, _service("LoadBalancer", [{"name": "tls", "port": 15443}], [{"ip": "203.0.113.7"}])
    )
    fb = await b.federation(ingress_gateways=[], **tls)
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    await fa.reconcile()
    await fb.reconcile()
    await fa.reconcile()
    assert a.condition("b", PRIVATE)["status"] == "True"
    cached = a.imc("b")["status"]["metadataCache"]["private"]["ingressGateways"]
    assert cached == [{"address": "203.0.113.7", "port": 15443}]
    networks = a.mesh()[1]

    fb.exporter.gateways.ttl = 0  # look up on every request
    b.sim.faults.fail(500, path=f"/api/v1/namespaces/{NS}/services")
    await fa.reconcile()
    assert a.condition("b", PRIVATE)["status"] == "True"
    assert a.imc("b")["status"]["metadataCache"]["private"]["ingressGateways"] == cached
    served = fb.metrics_registry.get_sample_value(
        "apiproxy_federation_gateway_discovery_errors_total", {"outcome": "served_last_good"}
    )
    assert served is not None
    assert served >= 1

    # A replica that never had a good list answers 503; A keeps its cache and network.
    fb.exporter.gateways = GatewaySource(Kube(b.client), service=(NS, SVC), ttl=0)
    await fa.reconcile()
    cond = a.condition("b", PRIVATE)
    assert (cond["status"], cond["reason"]) == ("False", "NonOKResponse")
    assert "503" in cond["message"]
    assert a.imc("b")["status"]["metadataCache"]["private"]["ingressGateways"] == cached
    assert a.mesh()[1] == networks
