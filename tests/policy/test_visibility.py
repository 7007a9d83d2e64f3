# ruff: noqa: E501  (one error case per line reads best)
"""Namespace selection (`namespaces` as a mapping) and `projection` in policy files: validation
errors with file:line:col, decisions, explain, rbac, and no change for policies without them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from apiproxy.policy import Policy, PolicyError
from apiproxy.policy import cli as policy_cli
from apiproxy.policy.rbac import NAMESPACE_INFORMER_RULE, rbac_documents
from apiproxy.policy.visibility import LabelSelector, Requirement, Visibility
from apiproxy.request import classify

HEAD = "apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules:\n"
RULE = (
    "  - name: r1\n"  # 4
    "    peers: ['*']\n"  # 5
    "    apiGroups: ['']\n"  # 6
    "    resources: [pods]\n"  # 7
    "    verbs: [get, list, watch]\n"  # 8
)
SELECTED = RULE + (
    "    namespaces:\n"  # 9
    "      names: [istio-system]\n"  # 10
    "      selector:\n"  # 11
    "        matchLabels: {apiproxy.io/export: 'true'}\n"  # 12
    "    projection: istiod-pod\n"  # 13
)


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        Policy.from_text(text, source="p.yaml")
    return str(caught.value)


CASES = [
    ("empty mapping", RULE + "    namespaces: {}\n", "p.yaml:9:17: namespaces is an empty mapping"),
    (
        "unknown key",
        RULE + "    namespaces: {labels: {a: b}}\n",
        "p.yaml:9:18: unknown key 'labels' in namespaces; allowed keys: names, selector",
    ),
    (
        "bad name",
        RULE + "    namespaces: {names: ['*']}\n",
        "p.yaml:9:26: namespace '*' is not valid",
    ),
    (
        "empty selector",
        RULE + "    namespaces: {selector: {}}\n",
        "p.yaml:9:28: namespaces.selector selects nothing in particular",
    ),
    (
        "bool label value",
        RULE + "    namespaces: {selector: {matchLabels: {export: true}}}\n",
        "p.yaml:9:51: matchLabels value of 'export' must be a string (YAML read 'true' as bool; put it in quotes)",
    ),
    (
        "bad label key",
        RULE + "    namespaces: {selector: {matchLabels: {'a b': x}}}\n",
        "p.yaml:9:43: label key 'a b' is not valid",
    ),
    (
        "bad label value",
        RULE + "    namespaces: {selector: {matchLabels: {a: 'x y'}}}\n",
        "p.yaml:9:46: label value 'x y' is not valid",
    ),
    (
        "bad operator",
        RULE + "    namespaces: {selector: {matchExpressions: [{key: a, operator: Has}]}}\n",
        "p.yaml:9:67: operator 'Has' is not valid; allowed: In, NotIn, Exists, DoesNotExist",
    ),
    (
        "In without values",
        RULE + "    namespaces: {selector: {matchExpressions: [{key: a, operator: In}]}}\n",
        "p.yaml:9:48: operator In needs a non-empty values list",
    ),
    (
        "Exists with values",
        RULE
        + "    namespaces: {selector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}\n",
        "p.yaml:9:75: operator Exists takes no values",
    ),
    (
        "missing key",
        RULE + "    namespaces: {selector: {matchExpressions: [{operator: Exists}]}}\n",
        "p.yaml:9:48: a matchExpressions requirement needs 'key'",
    ),
    (
        "write verb",
        RULE.replace("[get, list, watch]", "[get, list, watch, delete]")
        + "    namespaces: {names: [a]}\n",
        "p.yaml:8:31: verb 'delete' cannot be filtered",
    ),
    (
        "cluster-scoped",
        RULE.replace("[pods]", "[pods, nodes]") + "    namespaces: {names: [a]}\n",
        "p.yaml:7:23: resource 'nodes' is not a namespaced resource",
    ),
    (
        "unknown resource",
        RULE.replace("[pods]", "[widgets]") + "    namespaces: {names: [a]}\n",
        "p.yaml:7:17: resource 'widgets' is not a namespaced resource",
    ),
    (
        "subresource",
        RULE.replace("[pods]", "[pods/log]") + "    namespaces: {names: [a]}\n",
        "p.yaml:7:17: resource 'pods/log': a rule with a namespaces mapping lists plain resources",
    ),
    (
        "two groups",
        RULE.replace("['']", "['', apps]") + "    namespaces: {names: [a]}\n",
        "p.yaml:6:21: rule 'r1' has a namespaces mapping: give it exactly one API group",
    ),
    (
        "view and mapping",
        RULE + "    view: empty\n    namespaces: {names: [a]}\n",
        "p.yaml:10:5: rule 'r1' has a view and a namespaces mapping",
    ),
    (
        "unknown projection",
        RULE + "    projection: istiod\n",
        "p.yaml:9:17: projection 'istiod' is not known; allowed: istiod-node, istiod-pod",
    ),
    (
        "projection wrong resource",
        RULE.replace("[pods]", "[pods, services]") + "    projection: istiod-pod\n",
        "p.yaml:7:23: projection 'istiod-pod' applies only to 'pods'",
    ),
    (
        "projection node on pods",
        RULE + "    projection: istiod-node\n",
        "p.yaml:7:17: projection 'istiod-node' applies only to 'nodes'",
    ),
    (
        "projection and urls",
        "  - name: u\n    peers: ['*']\n    nonResourceURLs: [/version]\n    verbs: [get]\n    projection: istiod-pod\n",
        "p.yaml:8:5: rule 'u' mixes nonResourceURLs with projection",
    ),
    (
        "projection with write",
        RULE.replace("[get, list, watch]", "[get, patch]")
        + "    projection: istiod-pod\n    dangerous: true\n",
        "p.yaml:8:18: verb 'patch' cannot be filtered; a rule with a projection allows only get, list, watch",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors_name_file_line_column(text: str, expected: str) -> None:
    assert error_of(HEAD + text).startswith(expected)


def test_selector_semantics_follow_kubernetes() -> None:
    sel = LabelSelector(
        (("team", "a"),),
        (
            Requirement("env", "In", frozenset({"prod", "stage"})),
            Requirement("tier", "NotIn", frozenset({"db"})),
            Requirement("export", "Exists"),
            Requirement("legacy", "DoesNotExist"),
        ),
    )
    ok = {"team": "a", "env": "prod", "export": ""}
    assert sel.matches(ok)
    assert not sel.matches(ok | {"team": "b"})
    assert not sel.matches(ok | {"env": "dev"})
    assert not sel.matches(ok | {"tier": "db"})
    assert sel.matches(ok | {"tier": "web"})
    assert not sel.matches({k: v for k, v in ok.items() if k != "export"})
    assert not sel.matches(ok | {"legacy": "1"})
    vis = Visibility(frozenset({"istio-system"}), sel)
    assert vis.sees("istio-system", None)
    assert not vis.sees("other", None)  # unknown labels: not visible (fail closed)
    assert vis.sees("other", ok)


def test_decision_carries_visibility_and_projection() -> None:
    policy = Policy.from_text(HEAD + SELECTED, "p.yaml")
    decision = policy.decide("c1", classify("GET", "/api/v1/pods?watch=true"))
    assert decision.allowed
    assert decision.filters
    assert decision.projection == "istiod-pod"
    assert decision.visibility is not None
    assert decision.visibility.names == frozenset({"istio-system"})
    # Any namespace is admitted: the answer is filtered, a hidden object is 404 at the proxy.
    assert policy.decide("c1", classify("GET", "/api/v1/namespaces/zz/pods/p")).allowed


def test_explain_shows_namespaces_and_projection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + SELECTED)
    code = policy_cli.main(
        ["explain", "--policy", str(path), "GET", "/api/v1/namespaces/team-a/pods/p"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    decision = out["decision"]
    assert decision["projection"] == "istiod-pod"
    assert decision["visibleNamespaces"] == {
        "names": ["istio-system"],
        "selector": {"matchLabels": {"apiproxy.io/export": "true"}},
        "requestedNamespace": "team-a: visible only if its labels match selector",
    }
    code = policy_cli.main(["check", str(path)])
    assert code == 0
    assert "1 filtered to selected namespaces, 1 projected" in capsys.readouterr().out


def test_rbac_grants_cluster_wide_reads_and_the_namespace_informer() -> None:
    rules = Policy.from_text(
        HEAD + SELECTED.replace("pods", "services").replace("    projection: istiod-pod\n", ""), "p"
    ).rules
    docs = rbac_documents(rules)
    assert len(docs) == 1  # cluster-wide: a cluster-wide list is filtered, not split per namespace
    assert NAMESPACE_INFORMER_RULE in docs[0]["rules"]
    assert {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "list", "watch"],
    } in docs[0]["rules"]
    names_only = Policy.from_text(HEAD + RULE + "    namespaces: {names: [a]}\n", "p").rules
    assert NAMESPACE_INFORMER_RULE not in rbac_documents(names_only)[0]["rules"]


def _corpus() -> list[tuple[str, str]]:
    """Every policy shipped or used by tests before namespace selection existed."""
    root = Path(__file__).resolve().parents[2]
    texts = [
        (str(p), p.read_text())
        for p in sorted((root / "deploy").rglob("*.yaml"))
        if "AccessPolicy" in p.read_text()
    ]
    texts += [(p.name, p.read_text()) for p in sorted((root / "policies").glob("*.yaml"))]
    for module in ("tests/proxy/conftest.py", "tests/proxy/test_empty_view.py"):
        ns: dict[str, object] = {}
        source = (root / module).read_text()
        for name in ("POLICY", "VIEW_POLICY"):
            if f"\n{name} = " in source:
                start = source.index(f"\n{name} = ") + len(f"\n{name} = ")
                literal = source[start:].split('"""', 2)[1].removeprefix("\\\n")
                ns[name] = literal
                texts.append((f"{module}:{name}", literal))
    return texts


@pytest.mark.parametrize(("source", "text"), _corpus(), ids=lambda v: str(v)[:40])
def test_policies_without_the_new_fields_decide_as_before(source: str, text: str) -> None:
    """A rule without a namespaces mapping or projection never filters, so the proxy forwards
    its answers byte for byte (forward.forward, untouched); RBAC output has no namespace grant
    unless a rule asks for a selector."""
    policy = Policy.from_text(text, source)
    legacy = [r for r in policy.rules if r.visibility is None and not r.projection]
    requests = [
        ("GET", "/api/v1/pods"),
        ("GET", "/api/v1/pods?watch=true"),
        ("GET", "/api/v1/namespaces/x/pods/a"),
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/secrets"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices"),
        ("GET", "/version"),
        ("DELETE", "/api/v1/namespaces/x/pods/a"),
    ]
    for method, target in requests:
        decision = policy.decide("cluster-a", classify(method, target))
        if decision.rule is not None and any(r.name == decision.rule for r in legacy):
            assert not decision.filters
            assert decision.visibility is None
            assert decision.projection == ""
    docs = rbac_documents(tuple(legacy))
    assert all(r != NAMESPACE_INFORMER_RULE for r in docs[0]["rules"])
    yaml.safe_dump_all(docs, io.StringIO())
