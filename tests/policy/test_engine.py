"""Decision semantics: namespaces, resourceNames, peers, subresources, wildcards, priority."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from apiproxy.policy import Decision, Policy
from apiproxy.request import classify

HEADER = "apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules:\n"


def policy(rules_yaml: str) -> Policy:
    return Policy.from_text(HEADER + textwrap.dedent(rules_yaml), source="test.yaml")


def decide(p: Policy, method: str, target: str, peer: str = "c1") -> Decision:
    return p.decide(peer, classify(method, target))


TEAM = policy(
    """
    - name: team-a-pods
      peers: ["*"]
      apiGroups: [""]
      resources: [pods]
      verbs: [get, list, watch]
      namespaces: [team-a]
    """
)


def test_namespace_restricted_rule_does_not_allow_cluster_wide_list() -> None:
    assert decide(TEAM, "GET", "/api/v1/namespaces/team-a/pods").allowed
    assert decide(TEAM, "GET", "/api/v1/namespaces/team-a/pods/p1").allowed
    assert decide(TEAM, "GET", "/api/v1/namespaces/team-a/pods?watch=1").allowed
    assert not decide(TEAM, "GET", "/api/v1/pods").allowed
    assert not decide(TEAM, "GET", "/api/v1/pods?watch=true").allowed
    assert not decide(TEAM, "GET", "/api/v1/watch/pods").allowed
    assert not decide(TEAM, "GET", "/api/v1/namespaces/team-b/pods").allowed
    # A namespace literally named "*" in the URL is a name, never a wildcard.
    assert not decide(TEAM, "GET", "/api/v1/namespaces/*/pods").allowed


def test_star_and_default_namespaces_match_everything_including_none() -> None:
    for extra in ('    namespaces: ["*"]\n', ""):
        p = policy(
            "- name: r\n  peers: ['*']\n  apiGroups: ['']\n  resources: [pods, nodes]\n"
            "  verbs: [list]\n" + extra.replace("    ", "  ")
        )
        assert decide(p, "GET", "/api/v1/pods").allowed
        assert decide(p, "GET", "/api/v1/nodes").allowed
        assert decide(p, "GET", "/api/v1/namespaces/x/pods").allowed


def test_empty_namespace_means_no_namespace() -> None:
    p = policy(
        """
        - name: cluster-scoped
          peers: ["*"]
          apiGroups: [""]
          resources: [nodes]
          verbs: [get, list]
          namespaces: [""]
        """
    )
    assert decide(p, "GET", "/api/v1/nodes").allowed
    assert decide(p, "GET", "/api/v1/nodes/n1").allowed
    assert not decide(p, "GET", "/api/v1/namespaces/x/nodes").allowed


CONFIGMAP = policy(
    """
    - name: mesh-config
      peers: ["*"]
      apiGroups: [""]
      resources: [configmaps]
      verbs: [get, list, watch]
      namespaces: [istio-system]
      resourceNames: [istio]
    """
)


def test_resource_names_need_a_pinned_name_on_lists() -> None:
    base = "/api/v1/namespaces/istio-system/configmaps"
    assert decide(CONFIGMAP, "GET", f"{base}/istio").allowed
    assert decide(CONFIGMAP, "GET", f"{base}?fieldSelector=metadata.name%3Distio").allowed
    assert decide(CONFIGMAP, "GET", f"{base}?fieldSelector=metadata.name=istio&watch=1").allowed
    assert not decide(CONFIGMAP, "GET", base).allowed
    assert not decide(CONFIGMAP, "GET", f"{base}?watch=true").allowed
    assert not decide(CONFIGMAP, "GET", f"{base}/other").allowed
    assert not decide(CONFIGMAP, "GET", f"{base}?fieldSelector=metadata.name!%3Distio").allowed
    assert not decide(CONFIGMAP, "GET", f"{base}?fieldSelector=metadata.name%3Distio,a=b").allowed
    assert not decide(CONFIGMAP, "GET", f"{base}?fieldSelector=metadata.name%3Dother").allowed
    assert not decide(CONFIGMAP, "GET", "/api/v1/namespaces/default/configmaps/istio").allowed
    # The legacy /watch/ prefix ignores selectors: the name comes only from the path.
    assert not decide(
        CONFIGMAP,
        "GET",
        "/api/v1/watch/namespaces/istio-system/configmaps?fieldSelector=metadata.name=istio",
    ).allowed


def test_subresources_are_separate_resources() -> None:
    p = policy(
        """
        - name: pods
          peers: ["*"]
          apiGroups: [""]
          resources: [pods]
          verbs: [get]
        - name: status
          peers: ["*"]
          apiGroups: ["*"]
          resources: ["*/status"]
          verbs: [get]
        """
    )
    assert decide(p, "GET", "/api/v1/namespaces/a/pods/x").rule == "pods"
    assert not decide(p, "GET", "/api/v1/namespaces/a/pods/x/log").allowed
    assert not decide(p, "GET", "/api/v1/namespaces/a/pods/x/exec?command=sh").allowed
    assert decide(p, "GET", "/api/v1/namespaces/a/pods/x/status").rule == "status"
    assert decide(p, "GET", "/apis/apps/v1/namespaces/a/deployments/x/status").rule == "status"
    assert not decide(p, "GET", "/apis/apps/v1/namespaces/a/deployments/x").allowed


def test_peers_restrict_rules() -> None:
    p = policy(
        """
        - name: only-c2
          peers: [c2]
          apiGroups: [""]
          resources: [services]
          verbs: [list]
        """
    )
    assert decide(p, "GET", "/api/v1/services", peer="c2").allowed
    assert not decide(p, "GET", "/api/v1/services", peer="c1").allowed
    assert not decide(p, "GET", "/api/v1/services", peer="").allowed
    assert decide(p, "GET", "/api/v1/services", peer="").reason.startswith("denied")


def test_verbs_groups_and_uppercase_are_exact() -> None:
    p = policy(
        """
        - name: slices
          peers: ["*"]
          apiGroups: [discovery.k8s.io]
          resources: [endpointslices]
          verbs: [list, watch]
        """
    )
    assert decide(p, "GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=1").allowed
    assert decide(p, "HEAD", "/apis/discovery.k8s.io/v1/endpointslices").allowed
    assert not decide(p, "GET", "/apis/discovery.k8s.io/v1/endpointslices/x").allowed
    assert not decide(p, "GET", "/apis/discovery.k8s.io/v1/EndpointSlices").allowed
    assert not decide(p, "GET", "/apis/other.k8s.io/v1/endpointslices").allowed
    assert not decide(p, "GET", "/api/v1/endpointslices").allowed
    assert not decide(p, "DELETE", "/apis/discovery.k8s.io/v1/endpointslices").allowed


def test_non_resource_urls_exact_and_prefix() -> None:
    p = policy(
        """
        - name: discovery
          peers: ["*"]
          nonResourceURLs: ["/api", "/apis/*", "/version"]
          verbs: [get]
        """
    )
    assert decide(p, "GET", "/api").allowed
    assert decide(p, "GET", "/apis/discovery.k8s.io").allowed
    assert decide(p, "GET", "/version").allowed
    assert not decide(p, "HEAD", "/version").allowed  # HEAD is verb "head" on non-resource URLs
    assert not decide(p, "GET", "/apis").allowed
    assert not decide(p, "GET", "/api/v1").allowed
    assert not decide(p, "GET", "/versionx").allowed
    assert not decide(p, "GET", "/metrics").allowed
    assert not decide(p, "POST", "/version").allowed
    # Resource requests never match non-resource rules, even under a matching prefix.
    assert not decide(p, "GET", "/apis/apps/v1/deployments").allowed


def test_dangerous_rules_win_and_are_reported() -> None:
    p = policy(
        """
        - name: read
          peers: ["*"]
          apiGroups: [""]
          resources: [pods, pods/exec]
          verbs: [get]
          dangerous: true
        - name: plain
          peers: ["*"]
          apiGroups: [""]
          resources: [pods]
          verbs: [get]
        """
    )
    exec_ = decide(p, "GET", "/api/v1/namespaces/a/pods/x/exec?command=ls")
    assert exec_ == Decision(True, "read", "allowed by rule 'read'", True)
    assert decide(p, "GET", "/api/v1/namespaces/a/pods/x").dangerous is True


def test_first_rule_wins_among_equals_and_reason_names_it() -> None:
    p = policy(
        """
        - name: first
          peers: [c1]
          apiGroups: [""]
          resources: [services]
          verbs: [list]
        - name: second
          peers: ["*"]
          apiGroups: ["*"]
          resources: ["*"]
          verbs: [list]
          dangerous: true
        - name: third
          peers: ["*"]
          apiGroups: [""]
          resources: [services]
          verbs: [list]
        """
    )
    # 'second' is dangerous, so it is preferred: the proxy sees dangerous=True.
    assert decide(p, "GET", "/api/v1/services").rule == "second"
    assert decide(p, "GET", "/api/v1/namespaces/a/secrets").rule == "second"
    denied = decide(p, "GET", "/api/v1/namespaces/a/services/x")
    assert denied == Decision(
        False,
        None,
        "denied: no rule allows peer 'c1' to get services (v1) named 'x' in namespace 'a'",
    )


def test_empty_rules_deny_everything() -> None:
    p = Policy.from_text("apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules: []\n")
    assert p.rules == ()
    assert not decide(p, "GET", "/version").allowed
    assert not decide(p, "GET", "/api/v1/pods").allowed


def test_load_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules:\n"
        "- {name: v, peers: ['*'], nonResourceURLs: [/version], verbs: [get]}\n"
    )
    p = Policy.load(path)
    assert p.source == str(path)
    assert decide(p, "GET", "/version").rule == "v"


@pytest.mark.parametrize("verb", ["get", "list", "watch"])
def test_star_verbs_expand_to_every_resource_verb(verb: str) -> None:
    p = policy(
        """
        - name: all
          peers: ["*"]
          apiGroups: [""]
          resources: [configmaps]
          verbs: ["*"]
          dangerous: true
        """
    )
    target = {"get": "/api/v1/namespaces/a/configmaps/x", "list": "/api/v1/configmaps",
              "watch": "/api/v1/configmaps?watch=1"}[verb]  # fmt: skip
    assert decide(p, "GET", target).allowed
    assert decide(p, "DELETE", "/api/v1/namespaces/a/configmaps").allowed
    assert decide(p, "GET", "/api/v1/proxy/namespaces/a/configmaps/x").allowed


# -- to the letter: each test below kills mutants scripts/mutate found surviving -------------------


def test_a_better_rule_found_early_is_kept_when_later_buckets_hold_worse_ones() -> None:
    p = policy(
        """
        - name: core-pods
          peers: ["*"]
          apiGroups: [""]
          resources: [pods]
          verbs: [get]
        - name: any-group-pods
          peers: ["*"]
          apiGroups: ["*"]
          resources: [pods]
          verbs: [get]
        """
    )
    d = decide(p, "GET", "/api/v1/namespaces/a/pods/x")
    assert (d.allowed, d.rule) == (True, "core-pods")
    assert decide(p, "GET", "/apis/g/v1/namespaces/a/pods/x").rule == "any-group-pods"


def test_no_peer_is_a_plain_denial() -> None:
    d = TEAM.decide("", classify("GET", "/api/v1/namespaces/team-a/pods"))
    assert d == Decision(False, None, "denied: the request has no authenticated peer")
    assert d.allowed is False


def test_denials_describe_the_request() -> None:
    cases = [
        (
            "/api/v1/namespaces/b/pods/x/log",
            "get pods/log (v1) named 'x' in namespace 'b'",
        ),
        ("/apis/apps/v1/deployments", "list deployments (apps/v1) cluster-wide"),
        ("/api/v1/nodes/n", "get nodes (v1) named 'n' cluster-wide"),
        ("/metrics", "get the non-resource URL /metrics"),
    ]
    for target, what in cases:
        d = decide(TEAM, "GET", target)
        assert d.reason == f"denied: no rule allows peer 'c1' to {what}"
