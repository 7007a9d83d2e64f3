"""`apiproxy policy rbac` proven against the real RBAC authorizer, for both shipped policies and a
policy with namespaced, named, peer-specific and write rules:

(a) every request the policy allows is allowed upstream too: each one (every verb x resource x
    namespace x name the rules name, and their non-resource URLs) goes through `apiproxy serve`
    running under a service account bound only to the generated RBAC and must not meet a 403 from
    the real server; a SubjectAccessReview for the same attributes must say allowed;
(b) the generated RBAC grants nothing the policy can never use: each grant of the generated
    (Cluster)Roles is live (SAR) and used by some request the policy allows (`Policy.decide`), and
    near misses of each grant (other verbs, namespace, name, subresource) that the real authorizer
    allows beyond what every service account gets anyway are allowed by the policy too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from apiproxy.policy import Policy
from apiproxy.policy.model import RESOURCE_VERBS, Rule
from apiproxy.request import classify
from tests.real.cluster import KubeCluster
from tests.real.proxied import SA_NAMESPACE, Peers, RealProxy, generated_rbac, sa_user

ROOT = Path(__file__).resolve().parents[2]
ELSEWHERE = "rbac-elsewhere"  # a namespace no policy names
SAMPLE_NAME = "probe"
NOBODY = (SA_NAMESPACE, "rbac-nobody")  # bound to nothing: what every service account gets

SCOPED = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: team-read
  peers: [cluster-a]
  apiGroups: [""]
  resources: [services, endpoints]
  verbs: [get, list, watch]
  namespaces: [team-a, team-b]
- name: mesh-config
  peers: ["*"]
  apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
  namespaces: [istio-system]
  resourceNames: [istio, istio-canary]
- name: lock-writer
  peers: [cluster-b]
  apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, update, patch, delete]
  namespaces: [team-a]
  resourceNames: [lock]
  dangerous: true
- name: lock-create
  peers: [cluster-b]
  apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
  namespaces: [team-a]
  dangerous: true
- name: own-namespace
  peers: ["*"]
  apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
  namespaces: [team-a]
- name: pod-status
  peers: ["*"]
  apiGroups: [""]
  resources: [pods/status]
  verbs: [get]
  namespaces: [team-b]
- name: nodes
  peers: ["*"]
  apiGroups: [""]
  resources: [nodes]
  verbs: [get, list]
  namespaces: [""]
- name: health
  peers: ["*"]
  nonResourceURLs: [/healthz, /readyz/*]
  verbs: [get]
"""

POLICIES = {
    "istio-remote": (ROOT / "policies" / "istio-remote.yaml").read_text(),
    "minimal": (ROOT / "policies" / "minimal.yaml").read_text(),
    "scoped": SCOPED,
}
PEERS = ("cluster-a", "cluster-b", "unnamed-peer")
# Groups the test server does not serve (CRDs not installed): RBAC is checked before routing, so
# an allowed request for them is a 404 and a refused one a 403, as for any other group.
FALLBACK_VERSIONS = {"gateway.networking.k8s.io": "v1", "networking.istio.io": "v1"}
# Concrete paths under a wildcard non-resource URL.
URL_SAMPLES = {"/api/*": ["/api/v1"], "/apis/*": ["/apis/apps", "/apis/apps/v1"]}


# --------------------------------------------------------------------------- the real server's API


@dataclass(frozen=True)
class Api:
    versions: dict[str, str]  # group -> preferred version
    namespaced: dict[tuple[str, str], bool]  # (group, resource) -> namespaced

    def version(self, group: str) -> str:
        return self.versions.get(group) or FALLBACK_VERSIONS.get(group, "v1")

    def is_namespaced(self, group: str, resource: str) -> bool:
        return self.namespaced.get((group, resource), True)


@pytest.fixture(scope="module")
def api(kube: KubeCluster) -> Api:
    versions = {"": "v1"}
    namespaced: dict[tuple[str, str], bool] = {}
    docs = [("", kube.ok("GET", "/api/v1"))]
    for group in kube.ok("GET", "/apis")["groups"]:
        version = group["preferredVersion"]["version"]
        versions[group["name"]] = version
        docs.append((group["name"], kube.ok("GET", f"/apis/{group['name']}/{version}")))
    for group_name, doc in docs:
        for res in doc["resources"]:
            namespaced[(group_name, res["name"].split("/")[0])] = res["namespaced"]
    return Api(versions, namespaced)


# ------------------------------------------------------------------------ requests from attributes


@dataclass(frozen=True)
class Req:
    """A request by its authorization attributes (SubjectAccessReview's resourceAttributes or
    nonResourceAttributes), and how to make it over HTTP."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""  # non-resource requests only

    def __post_init__(self) -> None:
        # Requests of these verbs always name an object; create and deletecollection never do.
        if self.resource and self.verb in ("get", "update", "patch", "delete", "proxy"):
            object.__setattr__(self, "name", self.name or SAMPLE_NAME)
        if self.verb in ("create", "deletecollection"):
            object.__setattr__(self, "name", "")
        # GET /api/v1/namespaces/x is namespace x, name x: no request has them differ.
        if self.resource == "namespaces" and self.namespace and self.name:
            object.__setattr__(self, "name", self.namespace)

    def attrs(self) -> dict[str, str]:
        if self.path:
            return {"path": self.path, "verb": self.verb}
        out = {"verb": self.verb, "group": self.group, "resource": self.resource}
        for key in ("subresource", "namespace", "name"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def http(self, api: Api) -> tuple[str, str, bytes | None, dict[str, str]]:
        """(method, target, body, headers). Writes are dry runs: authorized, never stored."""
        if self.path:
            return ("HEAD" if self.verb == "head" else "GET", self.path, None, {})
        version = api.version(self.group)
        base = f"/apis/{self.group}/{version}" if self.group else "/api/v1"
        if self.resource == "namespaces":
            coll = f"{base}/namespaces"
        elif self.namespace:
            coll = f"{base}/namespaces/{self.namespace}/{self.resource}"
        else:
            coll = f"{base}/{self.resource}"
        named = f"{coll}/{self.name}" + (f"/{self.subresource}" if self.subresource else "")
        selector = f"fieldSelector={quote('metadata.name=' + self.name)}" if self.name else ""
        json_ct = {"Content-Type": "application/json"}
        if self.verb == "get":
            return "GET", named, None, {}
        if self.verb == "list":
            return "GET", coll + (f"?{selector}" if selector else ""), None, {}
        if self.verb == "watch":
            return (
                "GET",
                f"{coll}?watch=1&timeoutSeconds=1" + (f"&{selector}" if selector else ""),
                None,
                {},
            )
        if self.verb == "create":
            body = self.object(version, "probe-created")
            return "POST", f"{coll}?dryRun=All", body, json_ct
        if self.verb == "update":
            return "PUT", f"{named}?dryRun=All", self.object(version, self.name), json_ct
        if self.verb == "patch":
            return (
                "PATCH",
                f"{named}?dryRun=All",
                b"{}",
                {"Content-Type": "application/merge-patch+json"},
            )
        if self.verb == "delete":
            return "DELETE", f"{named}?dryRun=All", None, {}
        if self.verb == "deletecollection":
            return "DELETE", f"{coll}?dryRun=All", None, {}
        if self.verb == "proxy":
            legacy = f"{base}/proxy" + (f"/namespaces/{self.namespace}" if self.namespace else "")
            return "GET", f"{legacy}/{self.resource}/{self.name}", None, {}
        raise AssertionError(f"no HTTP form for verb {self.verb}")

    def object(self, version: str, name: str) -> bytes:
        kind = {"leases": "Lease", "configmaps": "ConfigMap"}.get(self.resource, "Unknown")
        api_version = f"{self.group}/{version}" if self.group else version
        meta = {"name": name, "namespace": self.namespace}
        return json.dumps({"apiVersion": api_version, "kind": kind, "metadata": meta}).encode()


def allowed_by_policy(policy: Policy, api: Api, req: Req) -> str | None:
    """The first peer the policy lets make this request upstream, or None. A request a `view`
    rule answers is never forwarded, so it justifies no upstream grant."""
    method, target, _, _ = req.http(api)
    info = classify(method, target)
    for peer in PEERS:
        decision = policy.decide(peer, info)
        if decision.allowed and not decision.view:
            return peer
    return None


def allowed_requests(rules: tuple[Rule, ...], api: Api) -> Iterator[tuple[str, Req]]:
    """(peer, request) for every verb x group x resource x namespace x name the rules name."""
    for rule in rules:
        peer = next(p for p in PEERS if rule.peers == ("*",) or p in rule.peers)
        if not rule.is_resource_rule:
            for url in rule.non_resource_urls:
                paths = URL_SAMPLES.get(url) or [url[:-1] + "x" if url.endswith("*") else url]
                for path in paths:
                    for verb in rule.verbs:
                        yield peer, Req(verb, path=path)
            continue
        for group in rule.api_groups:
            for combined in rule.resources:
                resource, _, sub = combined.partition("/")
                namespaced = api.is_namespaced(group, resource)
                for ns in rule.namespaces:
                    spaces = (["default", ""] if namespaced else [""]) if ns == "*" else [ns]
                    for space in spaces:
                        for verb in rule.verbs:
                            yield from (
                                (peer, r)
                                for r in _requests(verb, group, resource, sub, space, rule, api)
                            )


def _requests(
    verb: str, group: str, resource: str, sub: str, ns: str, rule: Rule, api: Api
) -> Iterator[Req]:
    names = list(rule.resource_names)
    if resource == "namespaces":
        names = [ns] if ns else names or [SAMPLE_NAME]
        ns_attr = ns
    else:
        ns_attr = ns if api.is_namespaced(group, resource) else ""
    if verb in ("list", "watch", "create", "deletecollection"):
        if resource == "namespaces" and ns:
            return  # a namespace-scoped rule cannot list namespaces
        if verb in ("list", "watch") and names and resource != "namespaces":
            for name in names:
                yield Req(verb, group, resource, sub, ns_attr, name)
        else:
            yield Req(verb, group, resource, sub, ns_attr)
        return
    if api.is_namespaced(group, resource) and not ns and resource != "namespaces":
        return  # a named object of a namespaced resource always has a namespace
    for name in names or [SAMPLE_NAME]:
        yield Req(verb, group, resource, sub, ns_attr, name)


def grants(docs: list[dict[str, Any]]) -> Iterator[tuple[str, Req]]:
    """(scope, one grant) of the generated ClusterRole and Roles; scope is the Role's namespace,
    or '' for the ClusterRole (bound cluster-wide)."""
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = doc["metadata"].get("namespace", "")
        for rule in doc["rules"]:
            for verb in rule["verbs"]:
                if "nonResourceURLs" in rule:
                    for url in rule["nonResourceURLs"]:
                        for path in URL_SAMPLES.get(url) or [
                            url[:-1] + "x" if url.endswith("*") else url
                        ]:
                            yield scope, Req(verb, path=path)
                    continue
                for group in rule["apiGroups"]:
                    for combined in rule["resources"]:
                        resource, _, sub = combined.partition("/")
                        for name in rule.get("resourceNames") or [""]:
                            yield scope, Req(verb, group, resource, sub, scope, name)


def placements(req: Req, api: Api) -> list[Req]:
    """Where a ClusterRole grant can be exercised: cluster-wide and in a namespace no policy names
    (cluster-scoped resources: only cluster-wide); a Role grant only in its namespace."""
    if req.path or req.namespace:
        return [req]
    if req.resource == "namespaces":
        return [Req(req.verb, "", "namespaces", req.subresource, req.name or ELSEWHERE, req.name)]
    if not api.is_namespaced(req.group, req.resource):
        return [req]
    options = [Req(req.verb, req.group, req.resource, req.subresource, ELSEWHERE, req.name)]
    if req.verb in ("list", "watch"):
        options.append(req)
    return options


def near_misses(req: Req) -> Iterator[Req]:
    """Requests next to a grant: other verbs, another namespace, another name, a subresource."""
    if req.path:
        yield Req("post", path=req.path)
        yield Req(req.verb, path=req.path + "-other" if not req.path.endswith("/") else "/x")
        return
    g, r, s, ns, name = req.group, req.resource, req.subresource, req.namespace, req.name
    for verb in RESOURCE_VERBS:
        if verb != req.verb:
            yield Req(verb, g, r, s, ns, name if verb not in ("create", "deletecollection") else "")
    if ns:
        yield Req(req.verb, g, r, s, ELSEWHERE, name)
    if name:
        yield Req(req.verb, g, r, s, ns, "not-" + name)
        yield Req(req.verb, g, r, s, ns)
    if not s:
        yield Req(req.verb, g, r, "status", ns or ELSEWHERE, name or SAMPLE_NAME)
    yield Req(req.verb, g, "secrets", "", ns or ELSEWHERE, name)


# ------------------------------------------------------------------------------------ the checks


class Reviewer:
    """Concurrent SubjectAccessReviews against the real authorizer, cached."""

    def __init__(self, kube: KubeCluster, session: aiohttp.ClientSession) -> None:
        self.kube = kube
        self.session = session
        self.gate = asyncio.Semaphore(8)
        self.cache: dict[str, bool] = {}

    async def allowed(self, sa: tuple[str, str], req: Req) -> bool:
        attrs = req.attrs()
        key = json.dumps([sa, attrs], sort_keys=True)
        if key in self.cache:
            return self.cache[key]
        user, groups = sa_user(sa)
        kind = "nonResourceAttributes" if req.path else "resourceAttributes"
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, kind: attrs},
        }
        async with (
            self.gate,
            self.session.post(
                self.kube.url + "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                json=body,
                headers={"Authorization": f"Bearer {self.kube.admin_token}"},
            ) as resp,
        ):
            assert resp.status == 201, await resp.text()
            out = await resp.json()
        self.cache[key] = bool(out["status"].get("allowed"))
        return self.cache[key]


def seed_objects(kube: KubeCluster) -> None:
    """The objects the policies name, so allowed named requests find them (200, not 404)."""
    for ns in ("team-a", "team-b", "istio-system", ELSEWHERE):
        kube.ensure_namespace(ns)
    for name in ("istio", "istio-canary"):
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "istio-system"},
            }
        )
    kube.apply(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "lock", "namespace": "team-a"},
        }
    )


@pytest.mark.parametrize("label", sorted(POLICIES))
async def test_generated_rbac_allows_what_the_policy_allows_and_nothing_more(
    label: str, kube: KubeCluster, peers: Peers, api: Api, tmp_path: Path
) -> None:
    await asyncio.to_thread(seed_objects, kube)
    sa = (SA_NAMESPACE, f"rbac-{label}")
    proxy = RealProxy(
        kube,
        peers,
        tmp_path / "proxy",
        policy_text=POLICIES[label],
        service_account=sa,
        role_name=f"apiproxy:rbac-{label}",
    )
    await asyncio.to_thread(proxy.start)
    policy = Policy.from_text(POLICIES[label], label)
    problems: list[str] = []
    try:
        kube_ssl = kube.ssl_context()
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=kube_ssl)) as kube_session,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=proxy.ssl_context(cert=True))
            ) as as_a,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=proxy.ssl_context(cert=False)),
                headers={"Authorization": f"Bearer {peers.token_b()}"},
            ) as as_b,
        ):
            sar = Reviewer(kube, kube_session)
            # (a) allowed by the policy => allowed upstream, through the proxy and by SAR.
            wanted = list(dict.fromkeys(allowed_requests(policy.rules, api)))
            assert wanted, "the enumeration found requests"

            async def through_proxy(peer: str, req: Req) -> None:
                method, target, body, headers = req.http(api)
                decision = policy.decide(peer, classify(method, target))
                if not decision.allowed:
                    problems.append(f"enumerated {method} {target} as {peer}: {decision.reason}")
                    return
                session = as_b if peer == "cluster-b" else as_a
                async with (
                    sar.gate,
                    session.request(method, proxy.url + target, data=body, headers=headers) as resp,
                ):
                    code = resp.status
                if code == 403 or code >= 500:
                    problems.append(f"{method} {target} as {peer}: {code} through the proxy")
                if decision.view:
                    # Answered by the proxy itself: its identity must not be able to read it.
                    if await sar.allowed(sa, req):
                        problems.append(f"SAR allows {req.attrs()} that only a view answers")
                elif not await sar.allowed(sa, req):
                    problems.append(f"SAR denies {req.attrs()} that the policy allows")

            await asyncio.gather(*(through_proxy(p, r) for p, r in wanted))

            # (b) every grant is live and used by the policy; near misses are refused by both.
            docs = proxy.rbac
            for scope, grant in grants(docs):
                places = placements(grant, api)
                if not any([await sar.allowed(sa, g) for g in places]):
                    problems.append(f"generated grant is not live upstream: {grant.attrs()}")
                if not any(allowed_by_policy(policy, api, g) for g in places):
                    problems.append(
                        f"generated grant ({scope or 'cluster-wide'}) the policy never uses: "
                        f"{grant.attrs()}"
                    )
                for probe in near_misses(grant):
                    for place in placements(probe, api):
                        if (
                            await sar.allowed(sa, place)
                            and not await sar.allowed(NOBODY, place)
                            and not allowed_by_policy(policy, api, place)
                        ):
                            problems.append(
                                f"RBAC allows what the policy never does: {place.attrs()}"
                            )
    finally:
        await asyncio.to_thread(proxy.stop)
    assert not problems, "\n".join(dict.fromkeys(problems))
    # The proxy really forwarded under that identity: the enumeration reached the server.
    assert len(wanted) >= len(policy.rules)


def test_scoped_policy_rbac_is_namespaced_where_the_rules_are(tmp_path: Path) -> None:
    """The shape (b) relies on: rules limited to namespaces become Roles there, not ClusterRole
    rules, and the ClusterRole keeps only what must be cluster-wide."""
    path = tmp_path / "scoped.yaml"
    path.write_text(SCOPED)
    docs = generated_rbac(path, "apiproxy:upstream", ("apiproxy-system", "api-proxy"))
    by = {(d["kind"], d["metadata"].get("namespace", "")) for d in docs}
    assert by == {
        ("ClusterRole", ""),
        ("Role", "team-a"),
        ("RoleBinding", "team-a"),
        ("Role", "team-b"),
        ("RoleBinding", "team-b"),
        ("Role", "istio-system"),
        ("RoleBinding", "istio-system"),
    }
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    assert {r for rule in cluster["rules"] for r in rule.get("resources", [])} == {"nodes"}
    assert [
        rule.get("nonResourceURLs") for rule in cluster["rules"] if "nonResourceURLs" in rule
    ] == [["/healthz", "/readyz/*"]]
