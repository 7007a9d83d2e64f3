"""suggest: minimal, loadable rules that allow exactly the policy-denied requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apiproxy.audit import events as ev
from apiproxy.audit.review import Filter
from apiproxy.audit.suggest import render, suggest
from apiproxy.policy import Policy
from apiproxy.request import classify

APIPROXY = str(Path(sys.executable).with_name("apiproxy"))
METHOD = {
    "get": "GET",
    "list": "GET",
    "watch": "GET",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "deletecollection": "DELETE",
}


def nonresource_denied(synth, peer: str, path: str) -> dict:
    return synth.request(
        peer, "get", path, None, code=403, decision=ev.DECISION_FORBID, rule=None, bytes_sent=0
    )


@pytest.fixture
def records(synth):
    return [
        synth.allowed_list(),  # allowed: never suggested
        synth.denied("cluster-b", "get", "configmaps", "istio-system", "istio"),
        synth.denied("cluster-b", "list", "configmaps", "istio-system", ""),
        synth.denied("cluster-b", "watch", "configmaps", "istio-system", ""),
        synth.denied("cluster-b", "get", "serviceaccounts", "istio-system", "istiod"),
        synth.denied("cluster-b", "list", "serviceaccounts", "istio-system", ""),
        synth.denied("cluster-b", "watch", "serviceaccounts", "istio-system", ""),
        synth.denied("cluster-b", "list", "namespaces", "", ""),  # cluster-scoped
        synth.denied("cluster-b", "list", "gateways", "", "", group="networking.istio.io"),
        synth.denied("cluster-b", "get", "configmaps", "team-a", "x"),
        synth.denied("cluster-b", "get", "serviceaccounts", "team-a", "y"),
        synth.denied("cluster-c", "list", "namespaces", "", ""),
        synth.denied("cluster-b", "get", "secrets", "istio-system", "cacerts"),
        synth.denied("cluster-b", "create", "pods", "istio-system", "p", subresource="exec"),
        synth.denied("cluster-b", "patch", "services", "default", "web"),
        nonresource_denied(synth, "cluster-b", "/metrics"),
        synth.authn_failure(),  # not a policy question
        synth.request(  # a 400 with decision forbid: a bad request, not a policy question
            "cluster-b",
            "get",
            "/api/v1/namespaces/a/nodes",
            {"resource": "nodes", "namespace": "a"},
            code=400,
            decision=ev.DECISION_FORBID,
        ),
    ]


def decide(policy: Policy, record: dict) -> bool:
    info = classify(METHOD[record["verb"]], record["requestURI"])
    peer = ev.peer_of(record["user"]["username"])
    assert peer is not None
    return policy.decide(peer, info).allowed


def uncomment(text: str) -> str:
    """What an operator gets by uncommenting every suggested rule."""
    out = []
    for line in text.splitlines():
        if line.startswith(("  # - ", "  #   ")):
            out.append("  " + line[4:])
        else:
            out.append(line)
    return "\n".join(out).replace("rules: []  # no read-only rule to suggest", "rules:")


def test_suggested_policy_loads_and_allows_exactly_the_denied_reads(tmp_path, records, log_writer):
    path = log_writer(tmp_path / "audit.log", records)
    result = suggest([str(path)])
    text = render(result, [str(path)])
    policy = Policy.from_text(text, "suggested.yaml")
    denied = [r for r in records if r["responseStatus"]["code"] == 403]
    assert result.denied == len(denied) == 15
    dangerous = {"pods", "services"}  # create pods/exec, patch services
    for record in denied:
        expect = (
            record["objectRef"].get("resource") not in dangerous if "objectRef" in record else True
        )
        assert decide(policy, record) is expect, record["requestURI"]
    # The read of a secret is allowed only as an empty view: the proxy answers, nothing leaks.
    secret = policy.decide(
        "cluster-b", classify("GET", "/api/v1/namespaces/istio-system/secrets/cacerts")
    )
    assert (secret.allowed, secret.view) == (True, "empty")
    assert (
        policy.decide(
            "cluster-b", classify("GET", "/api/v1/namespaces/istio-system/configmaps/istio")
        ).view
        == ""
    )
    # Exact, not wider: other namespaces, names' neighbours and other peers stay denied.
    assert not policy.decide(
        "cluster-c", classify("GET", "/api/v1/namespaces/istio-system/configmaps")
    ).allowed
    assert not policy.decide(
        "cluster-b", classify("GET", "/api/v1/namespaces/kube-system/configmaps")
    ).allowed
    assert not policy.decide(
        "cluster-b", classify("DELETE", "/api/v1/namespaces/istio-system/configmaps/x")
    ).allowed
    assert not policy.decide(
        "cluster-b", classify("GET", "/apis/networking.istio.io/v1/namespaces")
    ).allowed
    assert not policy.decide("cluster-b", classify("GET", "/metrics/extra")).allowed
    # With the commented rules uncommented (an operator's deliberate act) everything is allowed.
    everything = Policy.from_text(uncomment(text), "uncommented.yaml")
    for record in denied:
        assert decide(everything, record), record["requestURI"]
    assert sum(r.dangerous for r in everything.rules) == 2


def test_rules_are_merged_exactly(tmp_path, records, log_writer):
    result = suggest([str(log_writer(tmp_path / "audit.log", records))])
    rules = {tuple(r.resources or r.non_resource_urls): r for r in result.rules}
    # Per (peer, apiGroup, resource) verbs and namespaces are unioned; resources of one group
    # whose unions are identical then share one rule.
    both = rules[("configmaps", "serviceaccounts")]
    assert both.peers == ["cluster-b"]
    assert both.verbs == ["get", "list", "watch"]
    assert both.namespaces == ["istio-system", "team-a"]
    assert both.seen.count == 8
    # Identical bodies for two peers share one rule.
    assert rules[("namespaces",)].peers == ["cluster-b", "cluster-c"]
    assert rules[("namespaces",)].namespaces == [""]
    # Other apiGroups and other verb/namespace sets stay separate (no cross product).
    assert rules[("gateways",)].api_group == "networking.istio.io"
    assert rules[("/metrics",)].api_group is None
    assert {r.name for r in result.commented} == {
        "suggested-dangerous-cluster-b-pods-exec",
        "suggested-dangerous-cluster-b-services",
    }
    # A read of secrets becomes an active empty-view rule, not a commented dangerous grant.
    views = [r for r in result.active if r.view]
    assert [(r.name, r.resources, r.view) for r in views] == [
        ("suggested-empty-view-cluster-b-secrets", ["secrets"], "empty")
    ]
    assert len({r.name for r in result.rules}) == len(result.rules)


def test_yaml_shape_and_provenance_comments(tmp_path, records, log_writer):
    path = log_writer(tmp_path / "audit.log", records)
    result = suggest([str(path)])
    text = render(result, [str(path)])
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "apiproxy/v1"
    assert doc["kind"] == "AccessPolicy"
    assert len(doc["rules"]) == len(result.active) == 5
    for rule in doc["rules"]:
        assert set(rule) <= {
            "name",
            "peers",
            "apiGroups",
            "resources",
            "verbs",
            "namespaces",
            "nonResourceURLs",
            "view",
        }
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        if any(r.startswith("secrets") for r in rule.get("resources", [])):
            assert rule["view"] == "empty"
    first_id = records[1]["auditID"]
    last_id = records[10]["auditID"]
    assert f"first auditID {first_id}, last auditID {last_id}" in text
    assert "# from 8 denied request(s) (get x4, list x2, watch x2)" in text
    assert text.count("# WARNING: DANGEROUS") == 2
    assert text.count("# answered by the proxy with an empty view") == 1
    assert "REVIEW BEFORE ADDING" in text


def test_nothing_denied_is_still_a_valid_empty_policy(tmp_path, synth, log_writer):
    path = log_writer(tmp_path / "audit.log", [synth.allowed_list(), synth.authn_failure()])
    result = suggest([str(path)])
    assert result.rules == []
    assert Policy.from_text(render(result, [str(path)])).rules == ()


def test_only_dangerous_denials_leave_rules_empty_but_loadable(tmp_path, synth, log_writer):
    path = log_writer(tmp_path / "audit.log", [synth.denied(verb="delete", resource="secrets")])
    text = render(suggest([str(path)]), [str(path)])
    assert Policy.from_text(text).rules == ()
    assert len(Policy.from_text(uncomment(text)).rules) == 1


def test_secret_reads_become_an_empty_view_and_writes_stay_dangerous(tmp_path, synth, log_writer):
    records = [
        synth.denied("cluster-b", "list", "secrets", "", ""),
        synth.denied("cluster-b", "watch", "secrets", "", ""),
        synth.denied("cluster-b", "update", "secrets", "a", "s"),
    ]
    path = log_writer(tmp_path / "audit.log", records)
    text = render(suggest([str(path)]), [str(path)])
    policy = Policy.from_text(text)
    (rule,) = policy.rules
    assert (rule.view, rule.verbs, rule.dangerous) == ("empty", ("list", "watch"), False)
    watch = policy.decide("cluster-b", classify("GET", "/api/v1/secrets?watch=1"))
    assert (watch.allowed, watch.view) == (True, "empty")
    assert not policy.decide("cluster-b", classify("PUT", "/api/v1/namespaces/a/secrets/s")).allowed
    everything = Policy.from_text(uncomment(text))
    update = everything.decide("cluster-b", classify("PUT", "/api/v1/namespaces/a/secrets/s"))
    assert (update.allowed, update.view, update.dangerous) == (True, "", True)


def test_peer_filter(tmp_path, records, log_writer):
    path = str(log_writer(tmp_path / "audit.log", records))
    result = suggest([path], Filter(peers=frozenset({"cluster-c"})))
    assert result.denied == 1
    assert [r.peers for r in result.rules] == [["cluster-c"]]


def test_cli_suggest_from_rotated_gzip_and_stdin(tmp_path, records, log_writer):
    log_writer(tmp_path / "audit.log.1.gz", records[:8], compress=True)
    log_writer(tmp_path / "audit.log", records[8:])
    files = [str(tmp_path / "audit.log.1.gz"), str(tmp_path / "audit.log")]
    result = subprocess.run(
        [APIPROXY, "audit", "suggest", *files, "--peer", "cluster-b"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    policy = Policy.from_text(result.stdout.decode(), "cli.yaml")
    assert all(r.peers == ("cluster-b",) for r in policy.rules)
    denied_reads = [
        r
        for r in records
        if r["responseStatus"]["code"] == 403
        and r["verb"] in ("get", "list", "watch")
        and r.get("objectRef", {}).get("resource") != "secrets"
        and "cluster-b" in r["user"]["username"]
    ]
    for record in denied_reads:
        assert decide(policy, record), record["requestURI"]
    piped = subprocess.run(
        [APIPROXY, "audit", "suggest", "-"],
        input=(tmp_path / "audit.log.1.gz").read_bytes(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert "read from: <stdin>" in piped.stdout.decode()
    Policy.from_text(piped.stdout.decode())
