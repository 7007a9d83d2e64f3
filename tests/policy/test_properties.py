# ruff: noqa: E501
"""Property tests: the compiled engine agrees with a plain RBAC-style oracle, ambiguous targets
never get through, and nothing outside the shipped allowlist is ever allowed."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apiproxy.policy import Policy, Rule
from apiproxy.request import RequestInfo, RequestRejected, classify

ROOT = Path(__file__).resolve().parents[2]
ISTIO = Policy.load(ROOT / "policies" / "istio-remote.yaml")
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def covers(rule: Rule, peer: str, info: RequestInfo) -> bool:
    """kube RBAC matching (rbac/v1 helpers), written independently of the engine's index."""
    if "*" not in rule.peers and peer not in rule.peers:
        return False
    if "*" not in rule.verbs and info.verb not in rule.verbs:
        return False
    if not info.is_resource_request:
        if rule.is_resource_rule:
            return False
        return any(
            u == "*" or u == info.path or (u.endswith("*") and info.path.startswith(u[:-1]))
            for u in rule.non_resource_urls
        )
    if not rule.is_resource_rule:
        return False
    if "*" not in rule.api_groups and info.api_group not in rule.api_groups:
        return False
    combined = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    if not any(
        r in ("*", combined) or (info.subresource != "" and r == f"*/{info.subresource}")
        for r in rule.resources
    ):
        return False
    if "*" not in rule.namespaces and info.namespace not in rule.namespaces:
        return False
    return not rule.resource_names or info.name in rule.resource_names


def check_against_oracle(policy: Policy, peer: str, info: RequestInfo) -> None:
    decision = policy.decide(peer, info)
    matching = [
        (not r.dangerous, i, r) for i, r in enumerate(policy.rules) if covers(r, peer, info)
    ]
    if not matching:
        assert not decision.allowed, (info, decision)
        assert decision.rule is None
        return
    best = min(matching, key=lambda m: (m[0], m[1]))[2]
    assert decision.allowed
    assert decision.rule == best.name
    assert decision.dangerous is best.dangerous


# Segments mixing plausible names with everything that must make a target ambiguous.
SEGMENT = st.sampled_from(
    ["api", "apis", "v1", "namespaces", "istio-system", "kube-system", "pods", "services",
     "secrets", "configmaps", "istio", "nodes", "endpointslices", "discovery.k8s.io",
     "gateway.networking.k8s.io", "status", "log", "exec", "proxy", "watch", "finalize",
     "apiextensions.k8s.io", "customresourcedefinitions", "version", "x", "*", "Pods",
     ".", "..", "", "%2e", "%2F", "a;b", "a\\b", "p\u00f6d", "a b", "a#b", "%", "~"]
)  # fmt: skip
QUERY = st.lists(
    st.sampled_from(
        ["watch=true", "watch=false", "watch=0", "watch", "fieldSelector=metadata.name%3Distio",
         "fieldSelector=metadata.name=other", "fieldSelector=status.phase!%3DFailed",
         "labelSelector=app%3Dx", "limit=500", "resourceVersion=0", "wat%63h=1", "",
         "a;b", "%zz", "fieldSelector=metadata.name%3Distio%2Cx%3Dy", "x=%0A", "continue=abc"]
    ),
    max_size=4,
)  # fmt: skip
METHOD = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
PEER = st.sampled_from(["c1", "c2", "other"])


@st.composite
def targets(draw: st.DrawFn) -> str:
    path = "/" + "/".join(draw(st.lists(SEGMENT, min_size=0, max_size=8)))
    query = draw(QUERY)
    return path + ("?" + "&".join(query) if query else "")


@SETTINGS
@given(method=METHOD, target=targets(), peer=PEER)
def test_random_targets_are_rejected_or_truly_covered(method: str, target: str, peer: str) -> None:
    try:
        info = classify(method, target)
    except RequestRejected:
        return
    # What was classified is exactly what would be forwarded: no normalisation happened.
    assert info.path == target.split("?", 1)[0]
    assert "%" not in info.path
    assert "//" not in info.path
    assert "/./" not in info.path + "/"
    assert "/../" not in info.path + "/"
    assert all(p not in ("", ".", "..") for p in info.parts)
    check_against_oracle(ISTIO, peer, info)


SENSITIVE = st.sampled_from(
    ["secrets", "configmaps", "serviceaccounts", "roles", "clusterroles", "pods/exec", "pods/log",
     "pods/attach", "pods/portforward", "nodes/proxy", "services/proxy", "pods/status"]
)  # fmt: skip


@SETTINGS
@given(
    method=METHOD,
    resource=SENSITIVE,
    namespace=st.sampled_from(["", "istio-system", "kube-system", "default"]),
    name=st.sampled_from(["", "istio", "x"]),
    legacy=st.sampled_from(["", "watch/", "proxy/"]),
    query=QUERY,
)
def test_nothing_outside_the_istio_allowlist_is_allowed(
    method: str, resource: str, namespace: str, name: str, legacy: str, query: list[str]
) -> None:
    base, _, sub = resource.partition("/")
    if sub and not name:
        name = "x"
    path = f"/api/v1/{legacy}" + (f"namespaces/{namespace}/" if namespace else "") + base
    path += f"/{name}" if name else ""
    path += f"/{sub}" if sub else ""
    target = path + ("?" + "&".join(query) if query else "")
    try:
        info = classify(method, target)
    except RequestRejected:
        return
    decision = ISTIO.decide("c1", info)
    if decision.allowed and decision.view:
        # Secrets and other configmaps are read only through the proxy's empty view: no data.
        assert decision.view == "empty"
        assert (info.resource, info.subresource) in (("secrets", ""), ("configmaps", ""))
        assert info.verb in ("get", "list", "watch")
    elif decision.allowed:
        # The only configmap forwarded is the mesh config "istio" in istio-system, read-only.
        assert (info.resource, info.namespace, info.name) == ("configmaps", "istio-system", "istio")
        assert info.verb in ("get", "list", "watch")
        assert decision.rule == "istio-mesh-config"


# Random policies built from a small vocabulary, checked against the oracle on random requests.
WORDS = {
    "groups": ["", "apps", "discovery.k8s.io", "*"],
    "resources": ["pods", "pods/log", "services", "*/status", "pods/status", "deployments", "*"],
    "verbs": ["get", "list", "watch", "create", "delete", "deletecollection", "proxy", "*"],
    "namespaces": ["*", "", "a", "b"],
    "names": ["n1", "n2"],
    "peers": ["*", "c1", "c2"],
    "urls": ["/version", "/api", "/apis/*", "/healthz", "/api/*"],
}


@st.composite
def rules(draw: st.DrawFn, index: int) -> Rule:
    def pick(key: str, min_size: int = 1) -> tuple[str, ...]:
        values = draw(
            st.lists(st.sampled_from(WORDS[key]), min_size=min_size, max_size=3, unique=True)
        )
        return ("*",) if "*" in values else tuple(values)

    if draw(st.booleans()):
        return Rule(name=f"r{index}", peers=pick("peers"), verbs=pick("verbs"), api_groups=pick("groups"),
                    resources=pick("resources"), namespaces=pick("namespaces"),
                    resource_names=pick("names", 0), dangerous=draw(st.booleans()))  # fmt: skip
    verbs = draw(
        st.lists(st.sampled_from(["get", "head", "post", "*"]), min_size=1, max_size=2, unique=True)
    )
    return Rule(name=f"r{index}", peers=pick("peers"), verbs=tuple(verbs),
                non_resource_urls=pick("urls"), dangerous=draw(st.booleans()))  # fmt: skip


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(min_value=0, max_value=6))
    return Policy(tuple(draw(rules(i)) for i in range(count)))


REQUESTS = st.sampled_from(
    ["/api/v1/pods", "/api/v1/namespaces/a/pods", "/api/v1/namespaces/a/pods/n1",
     "/api/v1/namespaces/b/pods/n2/log", "/api/v1/namespaces/a/pods/n1/status",
     "/apis/apps/v1/namespaces/a/deployments/n1/status", "/apis/apps/v1/deployments",
     "/api/v1/namespaces/a/services?fieldSelector=metadata.name%3Dn1&watch=1",
     "/api/v1/watch/namespaces/b/services", "/api/v1/proxy/namespaces/a/pods/n1/x",
     "/apis/discovery.k8s.io/v1/namespaces/c/endpointslices", "/api/v1/namespaces/a",
     "/version", "/api", "/apis/apps", "/apis", "/healthz", "/api/v1"]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    policy=policies(),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
    target=REQUESTS,
    peer=PEER,
)
def test_engine_matches_oracle_on_random_policies(
    policy: Policy, method: str, target: str, peer: str
) -> None:
    try:
        info = classify(method, target)
    except RequestRejected:
        assert method != "GET"  # only the 'watch' on a non-GET case is refused here
        return
    check_against_oracle(policy, peer, info)
