"""The Kind of each (API group, resource) the proxy may answer itself (policy `view: empty`).

An answer the proxy makes up must carry the exact `kind` a client decodes (`SecretList` for
`/api/v1/secrets`): typed clients refuse any other. The proxy has no discovery of its own, so a
view is allowed only for the resources listed here; the policy refuses the rest.
"""

from __future__ import annotations

__all__ = ["CLUSTER_SCOPED", "KINDS", "kind_of", "namespaced"]

_BY_GROUP: dict[str, dict[str, str]] = {
    "": {
        "configmaps": "ConfigMap",
        "endpoints": "Endpoints",
        "events": "Event",
        "limitranges": "LimitRange",
        "namespaces": "Namespace",
        "nodes": "Node",
        "persistentvolumeclaims": "PersistentVolumeClaim",
        "persistentvolumes": "PersistentVolume",
        "pods": "Pod",
        "podtemplates": "PodTemplate",
        "replicationcontrollers": "ReplicationController",
        "resourcequotas": "ResourceQuota",
        "secrets": "Secret",
        "serviceaccounts": "ServiceAccount",
        "services": "Service",
    },
    "apps": {
        "daemonsets": "DaemonSet",
        "deployments": "Deployment",
        "replicasets": "ReplicaSet",
        "statefulsets": "StatefulSet",
    },
    "batch": {"cronjobs": "CronJob", "jobs": "Job"},
    "coordination.k8s.io": {"leases": "Lease"},
    "discovery.k8s.io": {"endpointslices": "EndpointSlice"},
    "events.k8s.io": {"events": "Event"},
    "networking.k8s.io": {
        "ingressclasses": "IngressClass",
        "ingresses": "Ingress",
        "networkpolicies": "NetworkPolicy",
    },
    "apiextensions.k8s.io": {"customresourcedefinitions": "CustomResourceDefinition"},
    "gateway.networking.k8s.io": {
        "gatewayclasses": "GatewayClass",
        "gateways": "Gateway",
        "grpcroutes": "GRPCRoute",
        "httproutes": "HTTPRoute",
        "referencegrants": "ReferenceGrant",
        "tcproutes": "TCPRoute",
        "tlsroutes": "TLSRoute",
        "udproutes": "UDPRoute",
    },
    "networking.istio.io": {
        "destinationrules": "DestinationRule",
        "gateways": "Gateway",
        "proxyconfigs": "ProxyConfig",
        "serviceentries": "ServiceEntry",
        "sidecars": "Sidecar",
        "virtualservices": "VirtualService",
        "workloadentries": "WorkloadEntry",
        "workloadgroups": "WorkloadGroup",
    },
    "security.istio.io": {
        "authorizationpolicies": "AuthorizationPolicy",
        "peerauthentications": "PeerAuthentication",
        "requestauthentications": "RequestAuthentication",
    },
    "telemetry.istio.io": {"telemetries": "Telemetry"},
    "extensions.istio.io": {"wasmplugins": "WasmPlugin"},
    "multicluster.x-k8s.io": {"serviceexports": "ServiceExport", "serviceimports": "ServiceImport"},
}

KINDS: dict[tuple[str, str], str] = {
    (group, resource): kind
    for group, resources in _BY_GROUP.items()
    for resource, kind in resources.items()
}


def kind_of(group: str, resource: str) -> str | None:
    return KINDS.get((group, resource))


# The cluster-scoped ones among KINDS; every other listed resource is namespaced.
CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset(
    {
        ("", "namespaces"),
        ("", "nodes"),
        ("", "persistentvolumes"),
        ("networking.k8s.io", "ingressclasses"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("gateway.networking.k8s.io", "gatewayclasses"),
    }
)


def namespaced(group: str, resource: str) -> bool | None:
    """True/False for a known resource, None for one the proxy does not know."""
    if (group, resource) not in KINDS:
        return None
    return (group, resource) not in CLUSTER_SCOPED
