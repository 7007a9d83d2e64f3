"""Where peers reach our east-west gateway: operator override, or the gateway Service.

Rules follow Deckhouse's metadata-exporter: a LoadBalancer Service advertises its first
load-balancer IP or hostname with the service port; a NodePort Service advertises the
ExternalIP (else InternalIP) of every Ready, schedulable node running a gateway pod with the
node port. The port used is the one named `tls` (else 15443).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from apiproxy.federation.kube import Kube, KubeError
from apiproxy.federation.metadata import Gateway, valid_address
from apiproxy.log import get_logger

log = get_logger("apiproxy.federation.gateways")

TLS_PORT = 15443


def _tls_port(service: dict[str, Any]) -> dict[str, Any] | None:
    ports = (service.get("spec") or {}).get("ports") or []
    for p in ports:
        if p.get("name") == "tls":
            return dict(p)
    for p in ports:
        if p.get("port") == TLS_PORT:
            return dict(p)
    return None


def _node_ready(node: dict[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("key") == "node.kubernetes.io/unschedulable":
            return False
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def _node_address(node: dict[str, Any]) -> str | None:
    """The first *usable* ExternalIP, else InternalIP (an empty or malformed ExternalIP used to
    hide a good InternalIP and drop the node)."""
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("ExternalIP", "InternalIP"):
        for a in addresses:
            addr = a.get("address")
            if a.get("type") == kind and isinstance(addr, str) and valid_address(addr):
                return addr
    return None


class GatewaySource:
    def __init__(
        self,
        kube: Kube,
        *,
        service: tuple[str, str] | None,
        static: tuple[Gateway, ...] = (),
        ttl: float = 10.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.kube = kube
        self.service = service
        self.static = static
        self.ttl = ttl
        self.on_error = on_error  # called with "served_last_good" or "unavailable"
        self._cache: tuple[Gateway, ...] | None = None  # the last good list
        self._at = -1e9

    async def get(self) -> tuple[Gateway, ...]:
        """The gateways; while the lookup fails (kube API error) the last good list, for the
        TTL before the next try. Raises KubeError only if there never was a good list."""
        if self.static:
            return self.static
        now = time.monotonic()
        if self._cache is not None and now - self._at < self.ttl:
            return self._cache
        try:
            found = await self._discover()
        except KubeError as exc:
            if self._cache is None:
                self._report("unavailable")
                raise
            # A kube-apiserver hiccup is not "no gateways": peers would drop our network.
            self._at = now
            self._report("served_last_good")
            log.warning(
                "gateway_discovery_failed",
                error=str(exc),
                gateways=len(self._cache),
            )
            return self._cache
        self._cache, self._at = found, now
        return found

    def _report(self, outcome: str) -> None:
        if self.on_error is not None:
            self.on_error(outcome)

    async def _discover(self) -> tuple[Gateway, ...]:
        if self.service is None:
            return ()
        ns, name = self.service
        svc = await self.kube.get(f"/api/v1/namespaces/{ns}/services/{name}")
        if svc is None:
            return ()
        port = _tls_port(svc)
        if port is None:
            return ()
        spec = svc.get("spec") or {}
        found: set[Gateway] = set()
        if spec.get("type") == "LoadBalancer":
            for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
                addr = ing.get("ip") or ing.get("hostname")
                if isinstance(addr, str) and valid_address(addr := addr.lower()):
                    found.add(Gateway(addr, int(port["port"])))
                    break
        elif spec.get("type") == "NodePort" and port.get("nodePort"):
            found |= await self._node_port(ns, spec.get("selector") or {}, int(port["nodePort"]))
        return tuple(sorted(found, key=lambda g: (g.address, g.port)))

    async def _node_port(self, ns: str, selector: dict[str, str], node_port: int) -> set[Gateway]:
        if not selector:
            return set()
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = await self.kube.list(f"/api/v1/namespaces/{ns}/pods", label_selector=sel)
        node_names = {
            (p.get("spec") or {}).get("nodeName")
            for p in pods.get("items") or []
            if (p.get("status") or {}).get("phase") == "Running"
        }
        found: set[Gateway] = set()
        for node_name in sorted(n for n in node_names if isinstance(n, str) and n):
            node = await self.kube.get(f"/api/v1/nodes/{node_name}")
            if node is None or not _node_ready(node):
                continue
            addr = _node_address(node)
            if addr:
                found.add(Gateway(addr, node_port))
        return found
