"""What an operator installs in a real cluster before apiproxy runs there: deploy/base's objects,
plus what Istio would have left in istio-system. Shared by the federation and istiod tiers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from apiproxy import pki
from tests.real.cluster import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
IMC = "/apis/deckhouse.io/v1alpha1/istiomulticlusters"
SHIPPED = (
    "namespace.yaml",
    "crd-istiomulticluster.yaml",
    "api-proxy-serviceaccount.yaml",
    "api-proxy-rbac.yaml",
    "api-proxy-clusterrolebinding.yaml",
    "federation-serviceaccount.yaml",
    "federation-rbac.yaml",
    "federation-lease.yaml",
)


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def provision(kube: KubeCluster, root: pki.KeyPair) -> None:
    """deploy/base, the istio-system namespace, Istio's root-cert and mesh ConfigMaps."""
    kube.ensure_namespace("istio-system")
    for name in SHIPPED:
        for doc in docs(name):
            kube.apply(doc)
            if doc["kind"] == "CustomResourceDefinition":
                wait_established(kube, doc["metadata"]["name"])
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "istio-system"},
            "data": {"root-cert.pem": root.cert_pem},
        }
    )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": "trustDomain: cluster.local\n", "meshNetworks": "networks: {}\n"},
        }
    )


def wait_established(kube: KubeCluster, name: str) -> None:
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
    deadline = time.monotonic() + 30
    while True:
        out = kube.ok("GET", path)
        conds = {c["type"]: c["status"] for c in (out.get("status") or {}).get("conditions") or []}
        if conds.get("Established") == "True":
            return
        assert time.monotonic() < deadline, conds
        time.sleep(0.1)  # urllib would read a watch to its end; the condition comes in ms


def ready_node(kube: KubeCluster, name: str, ip: str) -> None:
    """A Node reported Ready with an InternalIP; no kubelet runs, so the admin writes its status."""
    kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    kube.ok(
        "PATCH",
        f"/api/v1/nodes/{name}/status",
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": ip}],
            }
        },
        content_type="application/merge-patch+json",
    )
