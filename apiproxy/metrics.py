"""Prometheus metrics of one proxy instance (its own registry, so tests can run several)."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# What generate_latest writes: the Prometheus text format 0.0.4.
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Resource names metrics may carry as labels (plus those the policy names): a bounded set.
KNOWN_RESOURCES = frozenset(
    [
        "bindings",
        "componentstatuses",
        "configmaps",
        "endpoints",
        "events",
        "limitranges",
        "namespaces",
        "nodes",
        "persistentvolumeclaims",
        "persistentvolumes",
        "pods",
        "podtemplates",
        "replicationcontrollers",
        "resourcequotas",
        "secrets",
        "serviceaccounts",
        "services",
        "controllerrevisions",
        "daemonsets",
        "deployments",
        "replicasets",
        "statefulsets",
        "tokenreviews",
        "subjectaccessreviews",
        "selfsubjectaccessreviews",
        "localsubjectaccessreviews",
        "horizontalpodautoscalers",
        "cronjobs",
        "jobs",
        "certificatesigningrequests",
        "leases",
        "endpointslices",
        "ingresses",
        "ingressclasses",
        "networkpolicies",
        "poddisruptionbudgets",
        "clusterrolebindings",
        "clusterroles",
        "rolebindings",
        "roles",
        "priorityclasses",
        "csidrivers",
        "csinodes",
        "storageclasses",
        "volumeattachments",
        "customresourcedefinitions",
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
        "apiservices",
        "gateways",
        "workloadentries",
        "serviceexports",
        "serviceimports",
    ]
)
KNOWN_SUBRESOURCES = frozenset(
    [
        "status",
        "log",
        "exec",
        "attach",
        "portforward",
        "proxy",
        "eviction",
        "binding",
        "scale",
        "ephemeralcontainers",
        "resize",
        "finalize",
        "token",
        "approval",
    ]
)

_M = TypeVar("_M", Counter, Gauge, Histogram)
_MAX_CHILDREN = 10_000

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
        self.requests = Counter(
            "apiproxy_requests",
            "Requests by peer, verb, resource, HTTP code and policy decision.",
            ["peer", "verb", "resource", "code", "decision"],
            registry=r,
        )
        self.latency = Histogram(
            "apiproxy_request_duration_seconds",
            "Time to the response headers (watches) or to the end of the response (others).",
            ["peer", "verb", "resource"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "apiproxy_upstream_response_headers_seconds",
            "Time from sending the request upstream to its response headers.",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.authn_failures = Counter(
            "apiproxy_authentication_failures",
            "Requests refused by authentication, by reason code.",
            ["reason"],
            registry=r,
        )
        self.open_watches = Gauge(
            "apiproxy_open_watches", "Watches being streamed, by peer.", ["peer"], registry=r
        )
        self.inflight = Gauge(
            "apiproxy_inflight_requests",
            "Non-watch requests being served, by peer.",
            ["peer"],
            registry=r,
        )
        self.watch_events = Counter(
            "apiproxy_watch_events", "Watch events forwarded, by peer.", ["peer"], registry=r
        )
        self.filtered_items = Counter(
            "apiproxy_filtered_items",
            "Objects and watch events withheld from peers by namespace filtering, by peer.",
            ["peer"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "apiproxy_response_bytes", "Response body bytes sent to peers.", ["peer"], registry=r
        )
        self.upstream_errors = Counter(
            "apiproxy_upstream_errors",
            "Upstream failures: connect, timeout, reset mid-stream.",
            ["kind"],
            registry=r,
        )
        self.limited = Counter(
            "apiproxy_rate_limited",
            "Requests refused with 429 by a per-peer limit.",
            ["peer", "limit"],
            registry=r,
        )
        self.reloads = Counter(
            "apiproxy_reloads",
            "Reloads of watched inputs by what and result (success|failure).",
            ["what", "result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "apiproxy_last_successful_reload_timestamp_seconds",
            "When each input was last loaded successfully.",
            ["what"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "apiproxy_upstream_up", "1 when the last upstream probe succeeded.", registry=r
        )
        # For alerts: a refused reload (the last good version still in force) and watches
        # approaching the per-peer limit need the state and the limit as series.
        self.reload_failing = Gauge(
            "apiproxy_reload_failing",
            "1 while the last reload of an input was refused (the last good version is served).",
            ["what"],
            registry=r,
        )
        self.max_watches = Gauge(
            "apiproxy_max_watches_per_peer",
            "Configured limit of concurrent watches per peer (--max-watches-per-peer).",
            registry=r,
        )
        self.upstream_tls_verified = Gauge(
            "apiproxy_upstream_tls_verified",
            "1 when the upstream's certificate and host name are verified; 0 when the upstream is"
            " plain http or insecure-skip-tls-verify is set (the token goes to whoever answers).",
            registry=r,
        )

    def child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, memoised: the hot path skips prometheus_client's label
        validation and locking. Label sets are the same bounded ones `labels` would create."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*values)
            if len(self._children) < _MAX_CHILDREN:  # bounded whatever clients send
                self._children[key] = found
        return found  # type: ignore[return-value]

    def render(self) -> bytes:
        """This instance's registry followed by the process-wide default registry
        (process/platform collectors and module-level metrics such as the audit writer's)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)
